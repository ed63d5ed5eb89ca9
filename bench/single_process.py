"""The same OPSD step in one process with plain torch + transformers: the reference for (b).

Generate with ``model.generate`` (KV cache) from the problem-only prompt, with the seeds the
rollout actor uses; score the response under the privileged prompt (α = 1) with a frozen copy of
the step-0 model; forward/backward of the student with the project's loss (``distill_loss``, the
same code the student actor runs); clip and step AdamW. No Ray, no FSDP, no weight sync: the model
that generates is the model that trains. Its linear layers are the rollout engine's
(:func:`~workers.few_row_linear.use_few_row_linear`), so that (b) compares orchestration, not
decode kernels. What the distributed step does on top (the rollout's
log-probs and grades, the probe NLL, the controller; for ATESD also the teacher's grounding g) is
not repeated here: it is part of the overhead being measured.
"""

from __future__ import annotations

import copy
import time

import torch
from transformers import GenerationConfig

from atesd_ray.config import Config
from atesd_ray.losses import TeacherTargets, distill_loss
from atesd_ray.models import eos_token_ids, load_model, load_tokenizer
from atesd_ray.prompts import render_chat, student_messages, teacher_messages
from atesd_ray.sampling import rollout_seed
from atesd_ray.sequences import join, left_pad, response_slice, right_pad
from workers.few_row_linear import use_few_row_linear


class SingleProcessStep:
    def __init__(self, cfg: Config, batch: list[dict]):
        self.cfg = cfg
        self.batch = batch
        self.tokenizer = load_tokenizer(cfg.model)
        self.student = use_few_row_linear(load_model(cfg.model, vocab_size=len(self.tokenizer)))
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        t = cfg.trainer
        self.optimizer = torch.optim.AdamW(
            [p for p in self.student.parameters() if p.requires_grad],
            lr=t.lr,
            betas=tuple(t.betas),
            weight_decay=t.weight_decay,
        )
        r = cfg.rollout
        self.generation = GenerationConfig(
            max_new_tokens=r.max_new_tokens,
            do_sample=True,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            eos_token_id=eos_token_ids(self.student, self.tokenizer),
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def _encode(self, messages: list[dict], thinking: bool) -> list[int]:
        return self.tokenizer(render_chat(self.tokenizer, messages, thinking), add_special_tokens=False)[
            "input_ids"
        ]

    def run(self, step: int) -> dict:
        cfg, pad = self.cfg, self.tokenizer.pad_token_id
        t0 = time.perf_counter()
        prompts = [
            self._encode(student_messages(r["problem"], cfg.prompts), cfg.model.student_thinking)
            for r in self.batch
        ]
        p_ids, p_mask = left_pad(prompts, pad)
        self.student.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(rollout_seed(cfg.seed, step, 0) * 1_000_003)
            out = self.student.generate(
                input_ids=p_ids, attention_mask=p_mask, generation_config=self.generation
            )
        eos = set(self.generation.eos_token_id)
        responses = []
        for row in out[:, p_ids.shape[1] :].tolist():
            end = next((i for i, tok in enumerate(row) if tok in eos), None)
            responses.append(row if end is None else row[: end + 1])
        r_ids, r_mask = right_pad(responses, pad)
        t1 = time.perf_counter()

        temperature = cfg.algorithm.loss.temperature
        teacher_prompts = [
            self._encode(
                teacher_messages(r["problem"], r["reference"], r["answer"], 1.0, cfg.prompts),
                cfg.model.teacher_thinking,
            )
            for r in self.batch
        ]
        with torch.no_grad():
            tp_ids, tp_mask = left_pad(teacher_prompts, pad)
            ids, mask, pos, _ = join(tp_ids, tp_mask, r_ids, r_mask)
            logits = self.teacher(
                input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=r_ids.shape[1] + 1
            ).logits
            logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
            sampled = logp.gather(-1, r_ids.unsqueeze(-1)).squeeze(-1)
        valid = r_mask.bool()
        targets = TeacherTargets(logp[valid], None, sampled[valid])
        t2 = time.perf_counter()

        self.student.train()
        ids, mask, pos, start = join(p_ids, p_mask, r_ids, r_mask)
        hidden = self.student.get_decoder()(
            input_ids=ids, attention_mask=mask, position_ids=pos
        ).last_hidden_state
        h = response_slice(hidden, start, r_ids.shape[1])[valid]
        head = self.student.get_output_embeddings()
        loss, stats = distill_loss(h, targets, cfg.algorithm.loss, tokens=r_ids[valid], project=head)
        (loss / max(int(valid.sum()), 1)).backward()
        torch.nn.utils.clip_grad_norm_(
            [p for p in self.student.parameters() if p.requires_grad], cfg.trainer.grad_clip
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return {
            "step_time_s": t3 - t0,
            "rollout_s": t1 - t0,
            "teacher_s": t2 - t1,
            "student_update_s": t3 - t2,
            "tokens": int(valid.sum()),
            "loss": float(stats.loss) / max(int(valid.sum()), 1),
        }
