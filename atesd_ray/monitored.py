"""Step-wise monitored rollouts (MOTAB, SKD) over the rollout and teacher actors.

All live trajectories advance one step per round, and every round is batched over the replicas:

1. the rollout actors write the next step of each live trajectory (``RolloutWorker.next_steps``);
2. the teacher actors value those steps (``TeacherWorker.step_values``);
3. the algorithm's rule (:mod:`atesd_ray.trajectories`) accepts or rejects each step;
4. the teacher writes where needed (``TeacherWorker.continue_from``): after a MOTAB breach, the
   rest of the solution from the state before the root cause t* (one takeover per trajectory, up
   to ``rollout.max_new_tokens`` tokens); for a step SKD rejects, that one step.

The teacher samples at ``motab.teacher_temperature`` with the rollout's top-p / top-k. The driver
keeps the trajectories (token ids and a few numbers per step); the batches stay on the actors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from atesd_ray.sampling import SamplingParams, rollout_seed
from atesd_ray.trajectories import (
    TEACHER,
    Step,
    Trajectory,
    observe_motab_step,
    safety_boundary,
    skd_accept,
)

if TYPE_CHECKING:
    from atesd_ray.config import Config
    from atesd_ray.runtime.cluster import ActorGroup


def _seed(cfg: Config, step: int, rnd: int, writer: int) -> int:
    """Base sampling seed of one round; ``writer`` 0 is the student, 1 the teacher."""
    return rollout_seed(cfg.seed, step, (2 * rnd + writer) * 1_009)


def _state(t: Trajectory) -> dict:
    """What a teacher needs to read the trajectory's current state (its record and resumed steps)."""
    r, steps = t.record, t.resume_steps
    return {
        "uid": r["id"],
        "problem": r["problem"],
        "reference": r["reference"],
        "answer": r["answer"],
        "prefix_ids": [i for s in steps for i in s.ids],
        "prefix_text": "".join(s.text for s in steps),
    }


def _needs_teacher(cfg: Config, t: Trajectory, candidate: Step, ended: str) -> bool:
    """Apply the algorithm's rule to the student's candidate step; True when the teacher must write
    (SKD: the step was rejected; MOTAB: it breached the gate and the trajectory was rewound)."""
    m, limits = cfg.algorithm.motab, (cfg.algorithm.motab.max_steps, cfg.rollout.max_new_tokens)
    if cfg.algorithm.name == "skd":
        if not skd_accept(candidate.value, candidate.student_value, m.skd_gamma):
            return True
        t.add_step(candidate, ended, *limits)
        return False
    return observe_motab_step(t, candidate, ended, *limits)


def monitored_rollouts(
    cfg: Config,
    rollouts: ActorGroup,
    teachers: ActorGroup,
    records: list[dict],
    alpha: float | Mapping[str, float],
    step: int,
    min_version: int,
) -> list[Trajectory]:
    """``motab.n_trajectories`` monitored trajectories per record under ``cfg.algorithm.name``'s rule
    (motab or skd), the self-teacher at exposure ``alpha``; ``step`` seeds the sampling."""
    m, r = cfg.algorithm.motab, cfg.rollout
    skd = cfg.algorithm.name == "skd"
    trajectories = [Trajectory(rec, s) for rec in records for s in range(m.n_trajectories)]
    teacher_params = SamplingParams(
        temperature=m.teacher_temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=m.max_step_tokens if skd else r.max_new_tokens,
        stop=[m.step_delimiter] if skd else [],
        logprobs=False,
    )
    for rnd in range(m.max_steps):
        live = [t for t in trajectories if t.live]
        if not live:
            break
        states = [{"problem": t.record["problem"], "response_ids": t.response_ids} for t in live]
        candidates = rollouts.map("next_steps", states, min_version, seed=_seed(cfg, step, rnd, 0))
        for t, c in zip(live, candidates, strict=True):
            if not c["ids"]:
                t.close("eos")  # the student ended without writing another step
        written = [(t, c) for t, c in zip(live, candidates, strict=True) if t.live]
        items = [_state(t) | {"step_ids": c["ids"], "step_text": c["text"]} for t, c in written]
        values = teachers.map("step_values", items, alpha)
        pending: list[tuple[Trajectory, Step]] = []
        for (t, c), v in zip(written, values, strict=True):
            boundary = safety_boundary(v["entropy"], m.eps0, m.theta)
            candidate = Step(c["ids"], c["text"], v["value"], v["entropy"], boundary, c["value"])
            if _needs_teacher(cfg, t, candidate, c["ended"]):
                pending.append((t, candidate))
        if not pending:
            continue
        items = [_state(t) for t, _ in pending]
        pieces = teachers.map("continue_from", items, alpha, teacher_params, seed=_seed(cfg, step, rnd, 1))
        for (t, candidate), p in zip(pending, pieces, strict=True):
            if not skd:
                t.take_over(p["ids"], p["text"], p["ended"])
            elif not p["ids"]:
                t.close("eos")
            else:
                rewritten = replace(
                    candidate, ids=p["ids"], text=p["text"], author=TEACHER, rejected=candidate.text
                )
                t.add_step(rewritten, p["ended"], m.max_steps, r.max_new_tokens)
    return trajectories
