"""(f) The HF and vLLM engines side by side, in Ray actors: start time, rollout tokens/s, teacher scoring.

Each role gets one actor per engine with the same config otherwise; the measurements alternate
between the engines (HF, vLLM, HF, vLLM, ...) so that load from elsewhere falls on both alike.
Rollouts sample the benchmark's prompts at temperature 1 with top-k 20 (the demo's kind of
sampling), up to ``new_tokens`` each; tokens/s counts the tokens each engine actually generated.
Teacher scoring is of one shared rollout at exposure 1 with top-``TOPK`` targets.
"""

from __future__ import annotations

import time

import ray

from atesd_ray.runtime.cluster import ActorGroup
from bench.common import Stopwatch, bench_config, summary

TOPK = 64


def _start(cls, cfg, name: str) -> tuple[ActorGroup, float]:
    c = cfg.cluster
    with Stopwatch() as clock:
        group = ActorGroup(cls, 1, c.rollout, c.rollout_strategy, name, lambda i: ((cfg, i), {}))
        ray.get(group.actors[0].ping.remote())
    return group, clock.seconds


def measure(model: str, records: list[dict], repeats: int) -> dict:
    from atesd_ray.sampling import SamplingParams
    from workers.rollout import RolloutWorker
    from workers.teacher import TeacherWorker

    engines = ("hf", "vllm")
    configs = {
        e: bench_config(model, f"rollout.engine={e}", f"teacher.engine={e}", f"teacher.topk={TOPK}")
        for e in engines
    }
    new_tokens = configs["hf"].rollout.max_new_tokens
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=20, max_new_tokens=new_tokens)
    groups, start_s = [], {"rollout": {}, "teacher": {}}
    try:
        rollouts, teachers = {}, {}
        for e in engines:
            rollouts[e], start_s["rollout"][e] = _start(RolloutWorker, configs[e], f"bench-rollout-{e}")
            teachers[e], start_s["teacher"][e] = _start(TeacherWorker, configs[e], f"bench-teacher-{e}")
            groups += [rollouts[e], teachers[e]]
        tokens_per_s = {e: [] for e in engines}
        scoring_s = {e: [] for e in engines}
        for i in range(repeats + 1):
            for e in engines:
                with Stopwatch() as clock:
                    out = ray.get(rollouts[e].actors[0].generate.remote(records, 900 + i, 0, 0, params))
                if i:
                    tokens_per_s[e].append(float(out.batch["response_mask"].sum()) / clock.seconds)
            shared = ray.put(out)  # the last engine's rollout, scored by both teachers
            for e in engines:
                with Stopwatch() as clock:
                    ray.get(teachers[e].actors[0].score.remote(shared, 1.0))
                if i:
                    scoring_s[e].append(clock.seconds)
    finally:
        for group in groups:
            group.shutdown()
    rollout = {e: summary(v) for e, v in tokens_per_s.items()}
    scoring = {e: summary(v) for e, v in scoring_s.items()}
    return {
        "prompts": len(records),
        "new_tokens": new_tokens,
        "teacher_topk": TOPK,
        "start_s": start_s,
        "rollout_tokens_per_s": rollout,
        "teacher_scoring_s": scoring,
        "ratio_rollout_vllm_over_hf": rollout["vllm"]["median"] / rollout["hf"]["median"],
        "ratio_scoring_hf_over_vllm": scoring["hf"]["median"] / scoring["vllm"]["median"],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
