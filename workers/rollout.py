"""Rollout actor: the student's responses to problem-only prompts, on the latest synced weights."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from verl import DataProto

from atesd_ray.config import Config
from atesd_ray.grading import grade_many
from atesd_ray.models import DTYPES, load_model, load_tokenizer, synced_parameters
from atesd_ray.prompts import encode_chat, student_messages
from atesd_ray.rollout_batch import rollout_batch
from atesd_ray.runtime.checkpoint import fingerprint, read_state, read_student_weights
from atesd_ray.runtime.weight_delta import Parts
from atesd_ray.runtime.weight_formats import stream_weights
from atesd_ray.runtime.weight_sync import WeightReceiver
from atesd_ray.runtime.weights import load_into
from atesd_ray.sampling import SamplingParams, rollout_seed
from atesd_ray.trajectories import step_end, step_value
from workers.common import setup_actor

log = logging.getLogger(__name__)


def sampling_params(cfg: Config) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        stop=list(r.stop),
        n=r.n_samples,
    )


class RolloutWorker(WeightReceiver):
    """With ``teacher.engine=rollout`` it is the teacher too: the teacher's calls run a
    :class:`~workers.teacher.TeacherWorker` on this actor's engine (the LoRA adapter off for a frozen
    teacher), so the base weights are held once."""

    def __init__(self, cfg: Config, replica: int = 0, signals: frozenset[str] = frozenset()):
        self.threads, self.device = setup_actor(cfg, cfg.cluster.rollout, f"rollout {replica}")
        self.cfg = cfg
        self.replica = replica
        self.tokenizer = load_tokenizer(cfg.model)
        if cfg.rollout.engine == "vllm":
            from workers.vllm_engine import VLLMEngine

            # the teacher's top-k too, when it scores here (teacher.engine=rollout)
            topk = cfg.teacher.topk if cfg.teacher.engine == "rollout" else 0
            self.engine = VLLMEngine(cfg, self.tokenizer, cfg.rollout.vllm, self.device, max(20, topk))
        else:
            from workers.engines import HFEngine

            model = load_model(cfg.model, vocab_size=len(self.tokenizer), device=self.device)
            self.engine = HFEngine(model, self.tokenizer, micro_batch=cfg.rollout.micro_batch)
        self.payload_format = self.engine.weight_format
        self.teacher = None
        if cfg.teacher.engine == "rollout":  # an HF engine (checked in the config)
            from workers.teacher import TeacherWorker

            self.teacher = TeacherWorker(cfg, replica, signals, engine=self.engine)

    # -- the teacher's calls, with teacher.engine=rollout -----------------------------------------
    def score(self, rollout: DataProto, alpha) -> DataProto:
        return self.teacher.score(rollout, alpha)

    def reference_logprobs(self, rollout: DataProto, temperature: float) -> DataProto:
        return self.teacher.reference_logprobs(rollout, temperature)

    def step_values(self, items: list[dict], alpha) -> list[dict]:
        return self.teacher.step_values(items, alpha)

    def continue_from(self, items: list[dict], alpha, params: SamplingParams, seed: int) -> list[dict]:
        return self.teacher.continue_from(items, alpha, params, seed)

    def save(self, directory: str) -> bool:
        return self.teacher.save(directory)

    def load(self, directory: str, version: int) -> int:
        return self.weight_version

    # -- weights ---------------------------------------------------------------------------------
    def open_weights(self) -> None:
        self.engine.begin_load()

    def apply_weights(self, named: dict[str, torch.Tensor], shared: bool = False) -> None:
        self.engine.load_weights(named, shared)

    def apply_delta(self, parts: Parts) -> None:
        self.engine.load_delta(parts)

    def close_weights(self) -> None:
        self.engine.finish_load()

    def score_check(self, prompt: list[int], response: list[int]) -> list[float]:
        return self.engine.score([prompt], [response], 1.0)[0]

    def load_checkpoint(self, checkpoint: str) -> int:
        """Serve a trained student: the student tensors of ``checkpoint`` (checkpoints/step_<N>) over
        the configured model; a checkpoint written for another model is refused. Returns N.

        The HF engine's network is the student's, so the tensors go straight into it; a vLLM engine
        gets them from a student network built for the purpose, merged (LoRA folded in) or, with
        ``rollout.vllm.lora=adapter``, the adapter alone."""
        path = Path(checkpoint)
        m = self.cfg.model
        hf = hasattr(self.engine, "model")  # the HF engine holds the student's network itself
        student = self.engine.model if hf else load_model(m, vocab_size=len(self.tokenizer))
        mine = fingerprint(m.name, m.lora.enabled, synced_parameters(student))
        load_into(student, read_student_weights(path, mine))
        if not hf:  # a vLLM engine: merged weights, or the adapter alone
            fmt = self.engine.weight_format
            self.engine.begin_load()
            self.engine.load_weights(
                dict(stream_weights(student, fmt, DTYPES[m.dtype], "cpu", m.lora.alpha / m.lora.r))
            )
            self.engine.finish_load()
        self.weight_version = read_state(path)["step"]
        return self.weight_version

    # -- generation ------------------------------------------------------------------------------
    def prompt_ids(self, problems: list[str], thinking: bool | None = None) -> list[list[int]]:
        thinking = self.cfg.model.student_thinking if thinking is None else thinking
        return [
            encode_chat(self.tokenizer, student_messages(p, self.cfg.prompts), thinking) for p in problems
        ]

    def generate(
        self,
        records: list[dict],
        step: int,
        chunk: int,
        min_version: int,
        params: SamplingParams | None = None,
        thinking: bool | None = None,
    ) -> DataProto:
        """Sample ``params.n`` responses per record; refuse weights older than ``min_version``."""
        self.check_weights(min_version, f"rollout {self.replica}", f"step {step}")
        t0 = time.perf_counter()
        params = params or sampling_params(self.cfg)
        prompts = self.prompt_ids([r["problem"] for r in records], thinking)
        completions = self.engine.generate(prompts, params, rollout_seed(self.cfg.seed, step, chunk))
        expanded = [(r, p, s) for r, p in zip(records, prompts, strict=True) for s in range(params.n)]
        texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        grades = grade_many(texts, [str(r["answer"]) for r, _, _ in expanded], self.cfg.eval.grade_timeout_s)
        return rollout_batch(
            records=[r for r, _, _ in expanded],
            samples=[s for _, _, s in expanded],
            prompts=[p for _, p, _ in expanded],
            responses=[c.token_ids for c in completions],
            pad_id=self.tokenizer.pad_token_id,
            finish_reasons=[c.finish_reason for c in completions],
            texts=texts,
            grades=grades,
            logprobs=[c.logprobs for c in completions],
            meta={
                "weight_version": self.weight_version,
                "step": step,
                "chunk": chunk,
                "time_s": time.perf_counter() - t0,
            },
        )

    def score_responses(
        self, prompts: list[list[int]], responses: list[list[int]], temperature: float = 1.0
    ) -> list[list[float]]:
        """Log-probs of fixed responses under the current weights (used to check weight syncs)."""
        return self.engine.score(prompts, responses, temperature)

    def next_steps(self, states: list[dict], min_version: int, seed: int) -> list[dict]:
        """MOTAB / SKD: one reasoning step after each state ``{"problem", "response_ids"}`` (the
        student prompt, then the trajectory so far). A step ends at ``motab.step_delimiter``, at EOS
        or after ``motab.max_step_tokens``; returns per state the step's ``ids`` (an EOS that ended it
        left out, so a step may be empty), ``text``, how it ``ended`` and ``value``, the student's own
        geometric-mean probability of it at temperature 1."""
        self.check_weights(min_version, f"rollout {self.replica}")
        r, m = self.cfg.rollout, self.cfg.algorithm.motab
        params = SamplingParams(
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=m.max_step_tokens,
            stop=[m.step_delimiter],
            logprobs=False,
        )
        prompts = [
            p + s["response_ids"]
            for p, s in zip(self.prompt_ids([s["problem"] for s in states]), states, strict=True)
        ]
        completions = self.engine.generate(prompts, params, seed)
        logprobs = self.engine.score(prompts, [c.token_ids for c in completions], 1.0)
        out = []
        for c, lp in zip(completions, logprobs, strict=True):
            ended = step_end(c.finish_reason, c.token_ids, self.engine.eos_ids)
            ids = c.token_ids[:-1] if ended == "eos" else c.token_ids
            out.append(
                {
                    "ids": ids,
                    "text": self.tokenizer.decode(ids, skip_special_tokens=True),
                    "ended": ended,
                    "value": step_value(lp[: len(ids)]) if ids else 0.0,
                }
            )
        return out
