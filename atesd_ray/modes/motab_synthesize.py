"""``mode=motab_synthesize``: MOTAB's offline pipeline (DESIGN §5a), or SKD's with ``algorithm=skd``.

For every training problem, ``motab.n_trajectories`` monitored trajectories (rollout and teacher
actors, :mod:`atesd_ray.monitored`), ``trainer.prompts_per_step`` problems at a time,
appended to ``<run_dir>/synthesized.jsonl`` as each batch finishes. Each line is a record that
``data=jsonl`` reads (``id``, ``problem``, ``reference`` = the stitched target, ``answer``,
``source``, ``difficulty``) plus ``trajectory``: the steps with V, H and ε, the breach step, t*,
lengths in tokens and whether the target's answer is correct. Every trajectory is kept; filter on
``trajectory.correct`` to keep correct targets only. Then: ``algorithm=sft data=jsonl
data.path=<run_dir>/synthesized.jsonl``.

The self-teacher's exposure is the controller's first decision (``controller.exposure(0)``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import ray

from atesd_ray import algorithms
from atesd_ray.assembly import controller_actor, rollout_group, teacher_group
from atesd_ray.config import Config
from atesd_ray.grading import grade_many
from atesd_ray.job import open_run_dir, prepare_data
from atesd_ray.monitored import monitored_rollouts
from atesd_ray.runtime.cluster import place
from atesd_ray.trajectories import Trajectory, summarize

OUTPUT = "synthesized.jsonl"


def synthesized_record(cfg: Config, t: Trajectory, correct: bool, alpha: float) -> dict:
    r = t.record
    teacher = cfg.teacher.model or f"self (alpha={alpha:g})"
    return {
        "id": f"{r['id']}#{t.sample}",
        "problem": r["problem"],
        "reference": t.text(cfg.prompts.revise_phrase),
        "answer": r["answer"],
        "source": f"{cfg.algorithm.name}:{r['source']}",
        "difficulty": r.get("difficulty"),
        "trajectory": {
            "algorithm": cfg.algorithm.name,
            "record_id": r["id"],
            "sample": t.sample,
            "teacher": teacher,
            "correct": correct,
            **t.metadata(),
        },
    }


def summary_text(cfg: Config, stats: dict, problems: int, output: Path) -> str:
    def f(key: str, digits: int = 1) -> str:
        v = stats[key]
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"

    breached = round(stats["breach_rate"] * stats["trajectories"])
    lines = [
        f"{cfg.algorithm.name} synthesis: {stats['trajectories']} trajectories of {problems} problems -> {output}",
        f"  breach rate {stats['breach_rate']:.3f} ({breached}/{stats['trajectories']}); mean t* {f('mean_t_star', 2)}, "
        f"mean breach step {f('mean_breach_step', 2)} (0-based step index, over breached trajectories)",
        f"  lengths: {f('mean_steps', 2)} steps; tokens: student {f('student_tokens')}, teacher {f('teacher_tokens')} "
        f"(suffix after a breach {f('suffix_tokens')}), target {f('target_tokens')}",
        f"  mean V_T {stats['mean_value']:.3g}, mean boundary {stats['mean_boundary']:.3g}; teacher-written steps "
        f"{f('teacher_step_rate', 3)}; targets correct {f('target_accuracy', 3)}",
    ]
    return "\n".join(lines)


def run(cfg: Config, run_dir: Path) -> dict:
    """Synthesize; returns the summary (also written to ``summary.json``)."""
    algorithms.check(cfg)
    with open_run_dir(run_dir, cfg):
        data = prepare_data(cfg)
        print(data.summary, flush=True)
        output = run_dir / OUTPUT
        output.write_text("")
        place(cfg, roles=("rollout", "teacher"))
        name = f"motab-{run_dir.resolve().name}-{int(time.time())}"
        rollouts = rollout_group(cfg, f"{name}-rollout")
        teachers = teacher_group(cfg, f"{name}-teacher")
        controller = controller_actor(cfg, f"{name}-controller", 1)
        try:
            alpha = ray.get(controller.exposure.remote(0))
            trajectories: list[Trajectory] = []
            correct: list[bool] = []
            size = cfg.trainer.prompts_per_step
            for batch_index, start in enumerate(range(0, len(data.train), size)):
                batch = monitored_rollouts(
                    cfg,
                    rollouts,
                    teachers,
                    data.train[start : start + size],
                    alpha,
                    step=batch_index,
                    min_version=0,
                )
                grades = grade_many(
                    [t.text(cfg.prompts.revise_phrase) for t in batch],
                    [str(t.record["answer"]) for t in batch],
                    cfg.eval.grade_timeout_s,
                )
                with open(output, "a") as fh:
                    for t, g in zip(batch, grades, strict=True):
                        fh.write(json.dumps(synthesized_record(cfg, t, g.correct, alpha)) + "\n")
                trajectories += batch
                correct += [g.correct for g in grades]
                print(
                    f"synthesized {len(trajectories)} trajectories of {min(start + size, len(data.train))}/{len(data.train)} problems",
                    flush=True,
                )
            stats = summarize(trajectories, correct)
            summary = {"output": str(output), "problems": len(data.train), "alpha": alpha, **stats}
            finite = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}
            (run_dir / "summary.json").write_text(json.dumps(finite, indent=2))
            print(summary_text(cfg, stats, len(data.train), output), flush=True)
            return summary
        finally:
            rollouts.shutdown()
            teachers.shutdown()
            ray.kill(controller, no_restart=True)
