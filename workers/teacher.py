"""Teacher actor: scores the student's response tokens under the privileged prompt at exposure α.

For every response position it returns the teacher's log-probs (top-k ids and values, or the full
vocabulary when ``teacher.topk`` is 0 or >= vocab) at the loss temperature, the log-prob of the
token the student sampled, and per sequence the teacher-grounded signal g of DESIGN §4: the mean
log-prob the exposure-α teacher gives the reference's answer line when that line is withheld.

Teacher weights (``teacher.weights``): ``frozen`` keeps the step-0 model (with LoRA: the same
network with the adapter switched off); ``live`` takes every student sync; ``ema`` keeps an
exponential moving average of the synced weights.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from verl import DataProto

from atesd_ray.config import Config
from atesd_ray.models import base_weights, load_model, load_tokenizer
from atesd_ray.prompts import grounding_messages, render_chat, teacher_messages
from atesd_ray.runtime.weights import load_into
from atesd_ray.sequences import join, left_pad, right_pad
from workers.common import WeightReceiver, setup_actor


class TeacherWorker(WeightReceiver):
    def __init__(self, cfg: Config, replica: int = 0):
        self.threads = setup_actor(cfg, f"teacher{replica}")
        self.cfg = cfg
        self.replica = replica
        self.tokenizer = load_tokenizer(cfg.model)
        self.model = load_model(cfg.model, vocab_size=len(self.tokenizer)).eval()
        self.mode = cfg.teacher.weights
        self.vocab = self.model.get_output_embeddings().weight.shape[0]
        k = cfg.teacher.topk
        self.topk = None if k == 0 or k >= self.vocab else k

    # -- weights ---------------------------------------------------------------------------------
    def _synced_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def _apply_weights(self, named: dict[str, torch.Tensor], version: int) -> None:
        own = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named.items():
                if self.mode == "ema":
                    own[name].lerp_(tensor.to(own[name].dtype), 1.0 - self.cfg.teacher.ema_decay)
                elif self.mode == "live":
                    own[name].copy_(tensor)

    def save(self, directory: str) -> bool:
        """Checkpoint the EMA weights; frozen and live teachers are rebuilt from the student."""
        if self.mode == "ema":
            from safetensors.torch import save_file

            named = {k: v.contiguous() for k, v in self._synced_parameters().items()}
            save_file(named, str(Path(directory) / "teacher_ema.safetensors"))
        return True

    def load(self, directory: str, version: int) -> int:
        """Restore the EMA weights at ``version``; a live teacher instead takes the next sync."""
        if self.mode == "ema":
            from safetensors.torch import load_file

            load_into(self.model, load_file(str(Path(directory) / "teacher_ema.safetensors")))
            self.weight_version = version
        return self.weight_version

    def _weights(self):
        """The frozen teacher of a LoRA student is the base network: the adapter is switched off."""
        return base_weights(self.model) if self.mode == "frozen" else nullcontext(self.model)

    # -- prompts ---------------------------------------------------------------------------------
    def _encode(self, messages: list[dict]) -> list[int]:
        text = render_chat(self.tokenizer, messages, self.cfg.model.teacher_thinking)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_text(self, problem: str, reference: str, answer: str, alpha: float) -> str:
        messages = teacher_messages(problem, reference, answer, alpha, self.cfg.prompts)
        return render_chat(self.tokenizer, messages, self.cfg.model.teacher_thinking)

    # -- scoring ---------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, rollout: DataProto, alpha: float | Mapping[str, float], grounding: bool = True) -> DataProto:
        """Teacher targets for every response token of ``rollout`` at exposure ``alpha``: one value
        for the batch, or a per-problem mapping from record id to exposure."""
        t0 = time.perf_counter()
        nt = rollout.non_tensor_batch
        rows = len(rollout)
        if isinstance(alpha, Mapping):
            alphas = [float(alpha[uid]) for uid in nt["uid"]]
        else:
            alphas = [float(alpha)] * rows
        prompts = [
            self._encode(teacher_messages(nt["problem"][i], nt["reference"][i], nt["answer"][i], alphas[i], self.cfg.prompts))
            for i in range(rows)
        ]
        response_ids = rollout.batch["response_ids"]
        response_mask = rollout.batch["response_mask"]
        temperature = self.cfg.algorithm.loss.temperature
        width = response_ids.shape[1]
        k = self.topk or self.vocab
        values = torch.zeros(rows, width, k, dtype=torch.float32)
        indices = torch.zeros(rows, width, k, dtype=torch.int32) if self.topk else None
        sampled = torch.zeros(rows, width, dtype=torch.float32)
        mb = self.cfg.teacher.micro_batch
        with self._weights() as model:
            for s in range(0, rows, mb):
                p_ids, p_mask = left_pad(prompts[s : s + mb], self.tokenizer.pad_token_id)
                ids, mask, pos, _ = join(p_ids, p_mask, response_ids[s : s + mb], response_mask[s : s + mb])
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=width + 1).logits
                logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
                sampled[s : s + mb] = logp.gather(-1, response_ids[s : s + mb].unsqueeze(-1)).squeeze(-1)
                if self.topk:
                    top = logp.topk(self.topk, dim=-1)
                    values[s : s + mb] = top.values
                    indices[s : s + mb] = top.indices.to(torch.int32)
                else:
                    values[s : s + mb] = logp
            g = self._grounding(model, nt, alphas) if grounding else torch.zeros(rows)
        mask = response_mask.bool()
        sampled = sampled.masked_fill(~mask, 0.0)
        tensors = {"teacher_logprobs": values, "teacher_sampled_logprob": sampled, "grounding": g}
        if indices is not None:
            tensors["teacher_ids"] = indices
        return DataProto.from_dict(
            tensors=tensors,
            non_tensors={"alpha": np.array(alphas, dtype=object)},
            meta_info={"teacher_version": self.weight_version, "topk": self.topk or 0, "time_s": time.perf_counter() - t0},
        )

    def _grounding(self, model, nt: dict, alphas: list[float]) -> torch.Tensor:
        """g per row: mean log-prob (temperature 1) of the withheld answer line."""
        prompts, answers = [], []
        for i, a in enumerate(alphas):
            messages, answer_text = grounding_messages(nt["problem"][i], nt["reference"][i], nt["answer"][i], a, self.cfg.prompts)
            prompts.append(self._encode(messages))
            answers.append(self.tokenizer(answer_text, add_special_tokens=False)["input_ids"])
        g = torch.zeros(len(prompts))
        mb = self.cfg.teacher.micro_batch
        for s in range(0, len(prompts), mb):
            p_ids, p_mask = left_pad(prompts[s : s + mb], self.tokenizer.pad_token_id)
            a_ids, a_mask = right_pad(answers[s : s + mb], self.tokenizer.pad_token_id)
            ids, mask, pos, _ = join(p_ids, p_mask, a_ids, a_mask)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=a_ids.shape[1] + 1).logits
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, a_ids.unsqueeze(-1)).squeeze(-1)
            g[s : s + mb] = (lp * a_mask).sum(-1) / a_mask.sum(-1).clamp(min=1)
        return g
