"""Evaluation on the rollout actors: k samples per problem, graded, summarized (Average@k, pass@k, maj@k)."""

from __future__ import annotations

import json
from pathlib import Path

import ray

from atesd_ray.config import EvalConfig
from atesd_ray.grading import Grade, summarize
from atesd_ray.runtime.cluster import ActorGroup
from workers.engines import SamplingParams

EVAL_SEED_OFFSET = 1_000_000  # eval sampling seeds never collide with training steps'


def eval_params(cfg: EvalConfig) -> SamplingParams:
    return SamplingParams(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_new_tokens=cfg.max_new_tokens,
        n=cfg.samples,
        logprobs=False,
    )


def generate_and_grade(
    rollouts: ActorGroup, records: list[dict], cfg: EvalConfig, tag: int, min_version: int, what: str = "eval"
) -> list[dict]:
    """One row per sample: problem id, sample index, response, extracted answer, correctness.

    Problems go out in chunks of ``cfg.chunk_problems`` (chunk i to replica i mod R, whose sampling
    seed depends on (tag, i)), so that a progress bar of problems x samples moves as chunks finish
    (on a terminal; ``what`` labels it)."""
    from tqdm import tqdm

    params = eval_params(cfg)
    size = cfg.chunk_problems
    chunks = [records[s : s + size] for s in range(0, len(records), size)]
    replicas = rollouts.actors
    refs = [
        replicas[i % len(replicas)].generate.remote(
            chunk, EVAL_SEED_OFFSET + tag, i, min_version, params, cfg.thinking
        )
        for i, chunk in enumerate(chunks)
    ]
    outputs: dict[ray.ObjectRef, object] = {}
    with tqdm(total=len(records) * params.n, desc=what, unit="sample", disable=None, leave=False) as bar:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            outputs[done[0]] = ray.get(done[0])
            bar.update(len(outputs[done[0]]))
    rows = []
    for out in (outputs[r] for r in refs):
        nt = out.non_tensor_batch
        for i in range(len(out)):
            rows.append(
                {
                    "id": nt["uid"][i],
                    "sample": int(nt["sample"][i]),
                    "answer": str(nt["answer"][i]),
                    "extracted": nt["extracted"][i],
                    "correct": bool(out.batch["reward"][i] > 0.5),
                    "finish_reason": nt["finish_reason"][i],
                    "response": nt["response_text"][i],
                }
            )
    return rows


def summarize_rows(rows: list[dict], timeout_s: float) -> dict:
    by_problem: dict[str, list[dict]] = {}
    for row in rows:
        by_problem.setdefault(row["id"], []).append(row)
    grades = [
        [Grade(r["extracted"], r["correct"]) for r in sorted(v, key=lambda r: r["sample"])]
        for v in by_problem.values()
    ]
    golds = [v[0]["answer"] for v in by_problem.values()]
    return summarize(grades, golds, timeout_s)


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
