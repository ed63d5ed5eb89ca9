"""Teacher actor: scores the student's response tokens under the privileged prompt at exposure α.

For every response position it returns the teacher's log-probs (top-k ids and values, or the full
vocabulary when ``teacher.topk`` is 0 or >= vocab) at the loss temperature, the log-prob of the
token the student sampled, and per sequence the teacher-grounded signal g of DESIGN §4: the mean
log-prob the exposure-α teacher gives the reference's answer line when that line is withheld.

g is computed only when a consumer of the run declared it (``signals``: the controller, the sweep).

Teacher weights (``teacher.weights``): ``frozen`` keeps the step-0 model (with LoRA: the same
network with the adapter switched off); ``live`` takes every student sync; ``ema`` keeps an
exponential moving average of the synced weights.

The teacher is the privileged self-teacher, or a separate model (``teacher.model``, a preset) that
sees the student's problem-only prompt. MOTAB and SKD (DESIGN §5) also ask it for the value and
entropy of candidate steps (:meth:`TeacherWorker.step_values`) and to write on from a state
(:meth:`TeacherWorker.continue_from`). States and steps travel in the student's tokens; a separate
teacher with another vocabulary works on their text instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import torch
from verl import DataProto

from atesd_ray.config import Config, model_preset
from atesd_ray.models import base_weights, load_model, load_tokenizer
from atesd_ray.objective import scatter_rows
from atesd_ray.prompts import encode_chat, grounding_messages, render_chat, student_messages, teacher_messages
from atesd_ray.runtime.weight_delta import Parts
from atesd_ray.runtime.weight_sync import WeightReceiver
from atesd_ray.runtime.weights import blend_into, load_into, patch_into
from atesd_ray.sampling import SamplingParams
from atesd_ray.sequences import response_logprobs, rows_to_lists, slices, token_logprobs
from atesd_ray.teacher_signal import (
    contrast_shift,
    entropy,
    gate_weight,
    negative_contexts,
    outside,
    privileged_contexts,
)
from atesd_ray.trajectories import step_end, topk_entropy
from workers.common import setup_actor
from workers.engines import HFEngine


class TeacherWorker(WeightReceiver):
    def __init__(
        self,
        cfg: Config,
        replica: int = 0,
        signals: frozenset[str] = frozenset(),
        model: str | None = None,
        engine=None,
    ):
        """``model``: a preset other than ``teacher.model`` (a routed teacher); ``engine``: score on
        the rollout engine of the same process (``teacher.engine=rollout``: an HF engine's network,
        or a vLLM engine with the adapter off or on) instead of loading a model of its own."""
        if engine is None:
            self.threads, self.device = setup_actor(cfg, cfg.cluster.teacher, f"teacher {replica}")
        else:
            self.device = engine.device
        self.cfg = cfg
        self.replica = replica
        self.grounding = "grounding" in signals
        separate = model_preset(model) if model else cfg.teacher.model_config()
        self.privileged = separate is None
        self.model_cfg = separate or cfg.model
        self.tokenizer = load_tokenizer(self.model_cfg)
        self.student_tokenizer = self.tokenizer if self.privileged else load_tokenizer(cfg.model)
        self.shared_vocab = (
            self.privileged or self.student_tokenizer.get_vocab() == self.tokenizer.get_vocab()
        )
        self.mode = cfg.teacher.weights
        self.mirrors_student = self.mode == "live"  # an EMA teacher holds a blend; a frozen one takes no sync
        self.vllm = None
        if cfg.teacher_engine == "vllm":  # the privileged self-teacher, scoring only (checked in the config)
            from workers.vllm_engine import VLLMTeacherScorer

            self.vllm = VLLMTeacherScorer(
                cfg, self.tokenizer, self.device, engine, adapter=self.mode == "live"
            )
            self.payload_format = self.vllm.engine.weight_format
            self.vocab = len(self.tokenizer)
        else:
            self.model = (
                engine.model
                if engine is not None
                else load_model(
                    self.model_cfg, vocab_size=len(self.tokenizer), lora=self.privileged, device=self.device
                )
            )
            self.model.eval()
            self.vocab = self.model.get_output_embeddings().weight.shape[0]
        k = cfg.teacher.topk
        self.topk = None if k == 0 or k >= self.vocab else k

    # -- weights ---------------------------------------------------------------------------------
    def _synced_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def open_weights(self) -> None:
        if self.vllm is not None:
            self.vllm.engine.begin_load()

    def close_weights(self) -> None:
        if self.vllm is not None:
            self.vllm.engine.finish_load()

    def score_check(self, prompt: list[int], response: list[int]) -> list[float]:
        if self.vllm is not None:
            return self.vllm.engine.score([prompt], [response], 1.0)[0]
        with torch.no_grad():
            ((_, logp, r_ids, _),) = self._forward(self.model, [prompt], [response])
            return token_logprobs(logp, r_ids)[0, : len(response)].tolist()

    def apply_weights(self, named: dict[str, torch.Tensor], shared: bool = False) -> None:
        if self.vllm is not None:  # a live teacher (the config allows no EMA in vLLM)
            self.vllm.engine.load_weights(named)
        elif self.mode == "live":
            load_into(self.model, named, share=shared)
        elif self.mode == "ema":
            blend_into(self.model, named, 1.0 - self.cfg.teacher.ema_decay)

    def apply_delta(self, parts: Parts) -> None:  # a live teacher (the config refuses deltas beside EMA)
        self.vllm.engine.load_delta(parts) if self.vllm is not None else patch_into(self.model, parts)

    def save(self, directory: str) -> bool:
        """Checkpoint the EMA weights; frozen and live teachers are rebuilt from the student."""
        if self.mode == "ema":
            from safetensors.torch import save_file

            named = {k: v.detach().cpu().contiguous() for k, v in self._synced_parameters().items()}
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
        return encode_chat(self.tokenizer, messages, self.model_cfg.teacher_thinking)

    def _messages(self, problem: str, reference: str, answer: str, alpha: float) -> list[dict]:
        """The privileged prompt at exposure ``alpha``; a separate teacher model sees the student's prompt."""
        if self.privileged:
            return teacher_messages(problem, reference, answer, alpha, self.cfg.prompts)
        return student_messages(problem, self.cfg.prompts)

    def _row_alphas(self, uids, alpha: float | Mapping[str, float]) -> list[float]:
        """One exposure per row: ``alpha`` itself, or its entry for the row's record id."""
        return (
            [float(alpha[uid]) for uid in uids] if isinstance(alpha, Mapping) else [float(alpha)] * len(uids)
        )

    def _tokens(self, ids: list[int], text: str) -> list[int]:
        """Student tokens in this teacher's vocabulary (the same ids, or the text re-encoded)."""
        return ids if self.shared_vocab else self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_text(self, problem: str, reference: str, answer: str, alpha: float) -> str:
        messages = teacher_messages(problem, reference, answer, alpha, self.cfg.prompts)
        return render_chat(self.tokenizer, messages, self.cfg.model.teacher_thinking)

    # -- scoring ---------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, rollout: DataProto, alpha: float | Mapping[str, float]) -> DataProto:
        """Teacher targets for every response token of ``rollout`` at exposure ``alpha``: one value
        for the batch, or a per-problem mapping from record id to exposure; with the grounding
        signal, g per row (an extra forward pass over the grounding prompts)."""
        if not self.shared_vocab:
            raise ValueError(
                f"teacher model {self.model_cfg.name} has another vocabulary than the student {self.cfg.model.name}: "
                "it cannot give per-token targets (use it for mode=motab_synthesize, or a teacher of the same family)"
            )
        if self.cfg.teacher.routes and not self.privileged:
            return self._score_routed(rollout, alpha)
        return self._targets(rollout, alpha)

    def _targets(self, rollout: DataProto, alpha: float | Mapping[str, float]) -> DataProto:
        t0 = time.perf_counter()
        nt = rollout.non_tensor_batch
        alphas = self._row_alphas(nt["uid"], alpha)
        peers = self.cfg.teacher.context == "hindsight" or self.cfg.teacher.signal.contrast == "wrong_hint"
        rewards = rollout.batch["reward"].tolist() if peers else None  # the peers' grades
        contexts, hindsight = privileged_contexts(nt, rewards, self.cfg.teacher.context == "hindsight")
        prompts = [
            self._encode(self._messages(nt["problem"][i], text, answer, a))
            for i, ((text, answer), a) in enumerate(zip(contexts, alphas, strict=True))
        ]
        contrast = self.cfg.teacher.signal.contrast
        negatives = (
            None
            if contrast == "none"
            else [
                None if n is None else self._encode(teacher_messages(*n, a, self.cfg.prompts))
                for n, a in zip(negative_contexts(nt, rewards, contexts, contrast), alphas, strict=True)
            ]
        )
        response_ids, response_mask = rollout.batch["response_ids"], rollout.batch["response_mask"]
        responses = rows_to_lists(response_ids, response_mask)
        width, valid = response_ids.shape[1], response_mask.bool()
        if self.vllm is not None:  # plain signal (the config refuses the transforms on vLLM)
            values, indices, sampled = self.vllm.targets(prompts, responses, width)
            tensors = {"teacher_logprobs": values, "teacher_sampled_logprob": sampled}
            if indices is not None:
                tensors["teacher_ids"] = indices  # the loss derives the tail from the top-k
            g = self.vllm.answer_logprob(*self._grounding_inputs(nt, alphas)) if self.grounding else None
        else:
            with self._weights() as model:
                tensors = self._hf_targets(model, prompts, responses, width, negatives)
                g = self._grounding(model, nt, alphas) if self.grounding else None
        for key in ("teacher_sampled_logprob", "teacher_tail", "teacher_weight"):
            if key in tensors:
                tensors[key] = tensors[key].masked_fill(~valid, 0.0)
        if g is not None:
            tensors["grounding"] = g
        if self.cfg.teacher.context == "hindsight":
            tensors["hindsight"] = torch.tensor(hindsight, dtype=torch.float32)
        if negatives is not None:
            tensors["contrast_row"] = torch.tensor([n is not None for n in negatives], dtype=torch.float32)
        return DataProto.from_dict(tensors=tensors, meta_info={"time_s": time.perf_counter() - t0})

    def _score_routed(self, rollout: DataProto, alpha: float | Mapping[str, float]) -> DataProto:
        """Multi-teacher OPD: the targets of the rows ``teacher.routes`` sends to this model, zeros on
        the others, and ``teacher_rows`` [B] saying which are which (``objective.merge_routed``)."""
        t = self.cfg.teacher
        rows = torch.tensor(
            [t.route(v) == self.model_cfg.name for v in rollout.non_tensor_batch[t.route_key]]
        )
        return scatter_rows(
            self._targets(rollout.select_idxs(rows.numpy()), alpha) if rows.any() else None, rows
        )

    def _forward(
        self, model, prompts: list, responses: list, temperature: float = 1.0, width: int | None = None
    ):
        """Per micro-batch: its rows and :func:`~atesd_ray.sequences.response_logprobs` of them."""
        for part in slices(len(prompts), self.cfg.teacher.micro_batch):
            pad = self.tokenizer.pad_token_id
            yield part, *response_logprobs(model, prompts[part], responses[part], pad, temperature, width)

    def _hf_targets(
        self, model, prompts: list, responses: list, width: int, negatives: list | None = None
    ) -> dict[str, torch.Tensor]:
        """The ``objective.TEACHER_KEYS`` tensors, [rows, width, ...]: top-k (or full) log-probs at the
        teacher temperature, the exact log-mass outside the top-k (``losses.outside``: what a tail
        bucket needs), sampled-token log-probs; with ``negatives`` (one prompt or None per row) the
        contrast's shift from a second pass over the same tokens, with the entropy gate its weights."""
        n, k, signal = len(prompts), self.topk or self.vocab, self.cfg.teacher.signal
        out = {"teacher_logprobs": torch.zeros(n, width, k), "teacher_sampled_logprob": torch.zeros(n, width)}
        if self.topk:
            out["teacher_ids"] = torch.zeros(n, width, k, dtype=torch.int32)
            out["teacher_tail"] = torch.full((n, width), -math.inf)
        if negatives is not None:
            out["teacher_shift"] = torch.zeros(n, width, k)
            out["teacher_contrast"] = torch.zeros(n, width)
            if self.topk:
                out["teacher_shift_tail"] = torch.zeros(n, width)
        if signal.entropy_gate:
            out["teacher_weight"] = torch.zeros(n, width)
        temperature = self.cfg.algorithm.loss.teacher_t
        for part, logp, r_ids, _ in self._forward(model, prompts, responses, temperature, width):
            out["teacher_sampled_logprob"][part] = token_logprobs(logp, r_ids)
            indices = None
            if self.topk:
                top = logp.topk(self.topk, dim=-1)
                indices = top.indices
                out["teacher_logprobs"][part], out["teacher_ids"][part] = top.values, indices.to(torch.int32)
                out["teacher_tail"][part] = outside(logp, indices)
            else:
                out["teacher_logprobs"][part] = logp
            if negatives is not None and any(negatives[i] is not None for i in range(n)[part]):
                rows = range(n)[part]
                negative = [negatives[i] or prompts[i] for i in rows]  # a row without one keeps p_T
                logp_n, _, _ = response_logprobs(
                    model, negative, responses[part], self.tokenizer.pad_token_id, temperature, width
                )
                shift, shift_tail = contrast_shift(logp, logp_n, signal.contrast_weight, indices)
                out["teacher_shift"][part] = shift
                if shift_tail is not None:
                    out["teacher_shift_tail"][part] = shift_tail
                on = torch.tensor([negatives[i] is not None for i in rows], dtype=torch.float32)
                out["teacher_contrast"][part] = on[:, None].expand(-1, width)
            if signal.entropy_gate:
                out["teacher_weight"][part] = gate_weight(
                    entropy(logp), signal.gate_temperature, signal.gate_floor
                )
        return out

    @torch.no_grad()
    def reference_logprobs(self, rollout: DataProto, temperature: float) -> DataProto:
        """GRPO's KL reference: the log-prob of each response token after the rollout's own
        problem-only prompt under the frozen step-0 model, at ``temperature`` (the rollout's, so it
        compares with the student's log-probs of the same tokens)."""
        if self.mode != "frozen":
            raise ValueError(
                f"reference log-probs need the frozen step-0 model; teacher.weights is {self.mode}"
            )
        t0 = time.perf_counter()
        b = rollout.batch
        prompts = rows_to_lists(b["prompt_ids"], b["prompt_mask"])
        responses = rows_to_lists(b["response_ids"], b["response_mask"])
        out = torch.zeros(b["response_ids"].shape, dtype=torch.float32)
        with self._weights() as model:
            for part, logp, r_ids, _ in self._forward(model, prompts, responses, temperature, out.shape[1]):
                out[part] = token_logprobs(logp, r_ids)
        out = out.masked_fill(~b["response_mask"].bool(), 0.0)
        return DataProto.from_dict(
            tensors={"ref_logprobs": out}, meta_info={"time_s": time.perf_counter() - t0}
        )

    def _grounding_inputs(self, nt: dict, alphas: list[float]) -> tuple[list[list[int]], list[list[int]]]:
        """Per row, the grounding prompt (reference truncated at exposure alpha) and the withheld answer line."""
        prompts, answers = [], []
        for i, a in enumerate(alphas):
            messages, answer_text = grounding_messages(
                nt["problem"][i], nt["reference"][i], nt["answer"][i], a, self.cfg.prompts
            )
            prompts.append(self._encode(messages))
            answers.append(self.tokenizer(answer_text, add_special_tokens=False)["input_ids"])
        return prompts, answers

    def _grounding(self, model, nt: dict, alphas: list[float]) -> torch.Tensor:
        """g per row: mean log-prob (temperature 1) of the withheld answer line."""
        g = torch.zeros(len(alphas))
        for part, logp, a_ids, a_mask in self._forward(model, *self._grounding_inputs(nt, alphas)):
            g[part] = (token_logprobs(logp, a_ids) * a_mask).sum(-1) / a_mask.sum(-1).clamp(min=1)
        return g

    # -- MOTAB / SKD -----------------------------------------------------------------------------
    def _state_prompts(self, items: list[dict], alpha: float | Mapping[str, float]) -> list[list[int]]:
        """Per item: this teacher's prompt, then the trajectory so far (``prefix_ids`` / ``prefix_text``)."""
        alphas = self._row_alphas([it["uid"] for it in items], alpha)
        return [
            self._encode(self._messages(it["problem"], it["reference"], it["answer"], a))
            + self._tokens(it["prefix_ids"], it["prefix_text"])
            for it, a in zip(items, alphas, strict=True)
        ]

    @torch.no_grad()
    def step_values(self, items: list[dict], alpha: float | Mapping[str, float]) -> list[dict]:
        """Per candidate step (``step_ids`` / ``step_text`` after the state of :meth:`_state_prompts`):
        ``value``, the geometric-mean probability of its tokens, and ``entropy``, the renormalized
        top-``motab.entropy_topk`` entropy of the next token at the state; both at temperature 1."""
        states = self._state_prompts(items, alpha)
        steps = [self._tokens(it["step_ids"], it["step_text"]) for it in items]
        k = self.cfg.algorithm.motab.entropy_topk
        out: list[dict] = []
        with self._weights() as model:
            for _, logp, r_ids, r_mask in self._forward(
                model, states, steps
            ):  # column j predicts step token j
                values = ((token_logprobs(logp, r_ids) * r_mask).sum(-1) / r_mask.sum(-1).clamp(min=1)).exp()
                entropies = topk_entropy(logp[:, 0], k)
                out += [
                    {"value": float(v), "entropy": float(h)} for v, h in zip(values, entropies, strict=True)
                ]
        return out

    @torch.no_grad()
    def continue_from(
        self, items: list[dict], alpha: float | Mapping[str, float], params: SamplingParams, seed: int
    ) -> list[dict]:
        """The teacher writes on from each state (MOTAB's takeover after a rewind; SKD's rewritten step).
        Returns per item the piece's ``ids`` in the student's tokens (an EOS that ended it left out),
        its ``text`` and how it ``ended``."""
        states = self._state_prompts(items, alpha)
        with self._weights() as model:
            engine = HFEngine(model, self.tokenizer, micro_batch=self.cfg.teacher.micro_batch)
            completions = engine.generate(states, params, seed)
        out = []
        for c in completions:
            ended = step_end(c.finish_reason, c.token_ids, engine.eos_ids)
            ids = c.token_ids[:-1] if ended == "eos" else c.token_ids
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            ids = (
                ids
                if self.shared_vocab
                else self.student_tokenizer(text, add_special_tokens=False)["input_ids"]
            )
            out.append({"ids": ids, "text": text, "ended": ended})
        return out
