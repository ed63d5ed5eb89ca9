"""One on-policy MOTAB or SKD step (DESIGN §5b) on the training loop's actors.

exposure (controller) -> monitored rollouts -> targets as training rows -> teacher scoring ->
student update (distillation on the accepted student steps, teacher-forced NLL on the teacher's
tokens) -> weight sync -> controller. The self-teacher's exposure comes from the controller actor,
so ``controller.kind=atesd`` drives MOTAB's teacher as it drives ATESD's.

The driver builds the rows from the trajectories it holds (token ids), puts one chunk per teacher
replica in the object store, and passes refs on from there.
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch
from verl import DataProto

from atesd_ray.algorithms.distill import split_evenly
from atesd_ray.algorithms.monitored import monitored_rollouts
from atesd_ray.algorithms.motab import Trajectory, summarize
from atesd_ray.config import Config
from atesd_ray.grading import grade_many
from atesd_ray.models import load_tokenizer, tokenizer_path
from atesd_ray.prompts import render_chat, student_messages
from atesd_ray.runtime.actors import Actors
from atesd_ray.sequences import left_pad, right_pad

ROLES = ("distill", "nll")


_TOKENIZERS: dict[str, object] = {}


def _student_tokenizer(cfg: Config):
    """The student's tokenizer, loaded once per driver process."""
    path = tokenizer_path(cfg.model)
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = load_tokenizer(cfg.model)
    return _TOKENIZERS[path]


def training_rows(
    cfg: Config, trajectories: list[Trajectory], tokenizer, correct: list[bool], meta: dict
) -> DataProto:
    """The trajectories' targets after the student's problem-only prompt, with per-token loss masks
    ``distill_mask`` / ``nll_mask`` (see :meth:`Trajectory.segments`) and the fields the teacher
    scores with."""
    prompts, responses, masks = [], [], {role: [] for role in ROLES}
    for t in trajectories:
        text = render_chat(
            tokenizer, student_messages(t.record["problem"], cfg.prompts), cfg.model.student_thinking
        )
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        revise_ids = tokenizer(t.revise(cfg.prompts.revise_phrase), add_special_tokens=False)["input_ids"]
        pieces = t.segments(revise_ids, tokenizer.eos_token_id)
        responses.append([i for ids, _ in pieces for i in ids])
        for role in ROLES:
            masks[role].append([int(r == role) for ids, r in pieces for _ in ids])
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad(prompts, pad)
    response_ids, response_mask = right_pad(responses, pad)
    rows = [t.record for t in trajectories]
    return DataProto.from_dict(
        tensors={
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "response_ids": response_ids,
            "response_mask": response_mask,
            "distill_mask": right_pad(masks["distill"], 0, response_ids.shape[1])[0],
            "nll_mask": right_pad(masks["nll"], 0, response_ids.shape[1])[0],
            "reward": torch.tensor([float(c) for c in correct]),
        },
        non_tensors={
            "uid": np.array([r["id"] for r in rows], dtype=object),
            "sample": np.array([t.sample for t in trajectories], dtype=object),
            "problem": np.array([r["problem"] for r in rows], dtype=object),
            "reference": np.array([r["reference"] for r in rows], dtype=object),
            "answer": np.array([r["answer"] for r in rows], dtype=object),
            "finish_reason": np.array(
                ["stop" if t.ends_with_eos else "length" for t in trajectories], dtype=object
            ),
        },
        meta_info=meta,
    )


def motab_step(
    cfg: Config,
    actors: Actors,
    step: int,
    batch: list[dict],
    next_batch: list[dict] | None,
    prefetched: list[ray.ObjectRef] | None,
) -> tuple[dict, None]:
    """Train on ``batch`` (``algorithm.name`` motab or skd); no prefetching: a round needs the last one's decisions."""
    t0 = time.perf_counter()
    m = cfg.algorithm.motab
    alpha = ray.get(actors.controller.exposure.remote(step))
    trajectories = monitored_rollouts(
        cfg, actors.rollouts.actors, actors.teachers.actors, batch, alpha, step, min_version=step
    )
    t_rollout = time.perf_counter() - t0
    tokenizer = _student_tokenizer(cfg)
    correct = [
        g.correct
        for g in grade_many(
            [t.text(cfg.prompts.revise_phrase) for t in trajectories],
            [str(t.record["answer"]) for t in trajectories],
            cfg.eval.grade_timeout_s,
        )
    ]
    meta = {"weight_version": step, "step": step, "time_s": t_rollout}
    # one batch, one width, cut into one chunk per teacher replica (the student concatenates them again)
    full = training_rows(cfg, trajectories, tokenizer, correct, meta)
    chunks = split_evenly(list(range(len(full))), max(len(actors.teachers), len(actors.students)))
    rows = [ray.put(full[chunk]) for chunk in chunks]
    teachers = actors.teachers.actors
    grounding = cfg.controller.scores_decisions
    scored = [teachers[i % len(teachers)].score.remote(r, alpha, grounding) for i, r in enumerate(rows)]
    stats = actors.students.call("distill_nll_step", step, rows, scored, m.prefix_weight, m.suffix_weight)[0]
    synced = actors.weight_sync.sync(version=step + 1)
    probe = actors.students.call("probe_nll")[0]
    observed = actors.controller.observe.remote(step, stats, probe)
    *_, controller_metrics = ray.get(synced + [observed])
    metrics = ray.get(stats)
    metrics.update({k: v for k, v in summarize(trajectories).items() if k != "trajectories"})
    metrics.update(
        controller_metrics,
        alpha=float(alpha),
        probe_nll=ray.get(probe),
        weight_version=step + 1,
        step_time_s=time.perf_counter() - t0,
    )
    metrics["tokens_per_s"] = metrics["tokens"] / metrics["step_time_s"]
    return metrics, None
