"""Evaluation on the rollout actors: k samples per problem, graded, summarized (Average@k, pass@k, maj@k)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import ray

from atesd_ray.config import EvalConfig
from atesd_ray.grading import Grade, answers_match
from atesd_ray.runtime.cluster import ActorGroup
from atesd_ray.sampling import SamplingParams

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
    refs = [
        rollouts.serving(i).generate.remote(
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
                    "response_tokens": int(out.batch["response_mask"][i].sum()),
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
    summary = summarize(grades, golds, timeout_s)
    if all("response_tokens" in r for r in rows):  # rows written before it was recorded lack it
        summary["response_len"] = math.fsum(r["response_tokens"] for r in rows) / len(rows)
    return summary


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


# -- metrics over k graded samples per problem ----------------------------------------------


def average_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Average@k: the fraction of correct samples per problem, averaged over problems."""
    if not correct or not all(correct):
        raise ValueError("need at least one problem and one sample per problem")
    return math.fsum(sum(row) / len(row) for row in correct) / len(correct)


def average_interval(correct: Sequence[Sequence[bool]], z: float = 1.96) -> tuple[float, float]:
    """A 95% interval for Average@k over the problems: Wilson's score interval with one trial per
    problem. For one sample per problem it is the usual one; for k samples it is conservative (a
    per-problem mean in [0, 1] varies at most as a Bernoulli of the same mean would), and unlike the
    normal interval it is neither empty at 0% or 100% nor outside [0, 1]."""
    n = len(correct)
    p = average_at_k(correct)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems, each with its own n samples and c correct ones."""
    if not correct:
        raise ValueError("need at least one problem")
    return math.fsum(pass_at_k(len(row), sum(row), k) for row in correct) / len(correct)


def majority_answer(answers: Sequence[str | None], timeout_s: float = 5.0) -> str | None:
    """The most frequent answer up to equivalence; None answers do not vote.

    Each answer joins the first earlier group whose first answer it matches, so ties go to the
    answer seen first.
    """
    groups: list[list] = []  # [first answer, votes], in order of first occurrence
    for answer in answers:
        if answer is None:
            continue
        for group in groups:
            if answers_match(answer, group[0], timeout_s):
                group[1] += 1
                break
        else:
            groups.append([answer, 1])
    if not groups:
        return None
    return max(groups, key=lambda group: group[1])[0]  # max keeps the first of equal counts


def maj_at_k(answers: Sequence[Sequence[str | None]], golds: Sequence[str], timeout_s: float = 5.0) -> float:
    """maj@k: the fraction of problems whose majority answer matches the gold answer."""
    if not answers or len(answers) != len(golds):
        raise ValueError(f"need one gold answer per problem, got {len(answers)} and {len(golds)}")
    hits = 0
    for row, gold in zip(answers, golds, strict=True):
        winner = majority_answer(row, timeout_s)
        hits += winner is not None and answers_match(winner, gold, timeout_s)
    return hits / len(answers)


def summarize(
    grades: Sequence[Sequence[Grade]], golds: Sequence[str], timeout_s: float = 5.0
) -> dict[str, float | int]:
    """Summary-JSON metrics for k graded samples per problem.

    Keys: ``n_problems``, ``n_samples`` (in total), ``k``, ``avg@k`` and its 95% interval
    ``avg@k_ci95`` ([low, high], :func:`average_interval`), ``pass@j`` for j = 1, 2, 4, ...
    up to and including k, and ``maj@k``, with the number k written into the metric names
    (``avg@12``).
    """
    k = len(grades[0]) if grades else 0
    if k == 0 or any(len(row) != k for row in grades):
        raise ValueError("need the same positive number of samples for every problem")
    correct = [[g.correct for g in row] for row in grades]
    summary: dict[str, float | int] = {
        "n_problems": len(grades),
        "n_samples": len(grades) * k,
        "k": k,
        f"avg@{k}": average_at_k(correct),
        f"avg@{k}_ci95": list(average_interval(correct)),
    }
    for j in sorted({2**e for e in range(k.bit_length())} | {k}):
        summary[f"pass@{j}"] = mean_pass_at_k(correct, j)
    summary[f"maj@{k}"] = maj_at_k([[g.answer for g in row] for row in grades], golds, timeout_s)
    return summary
