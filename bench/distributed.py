"""The distributed step under measurement: the real actors and ``run_step`` of OPSD, one fixed batch.

Where a step's time goes is read from Ray's task timeline (every actor method's start and
duration), so the step code is measured as it runs in training, without instrumenting it. The
driver overhead is the step's wall time minus the union of the actor tasks that ran during it:
scheduling, object transfer between tasks, and the driver's own work.
"""

from __future__ import annotations

import dataclasses
import os
import time

import ray

from atesd_ray import algorithms
from atesd_ray.algorithms import build_actors
from atesd_ray.algorithms.base import run_step
from atesd_ray.assembly import Actors, controller_actor, teacher_group
from atesd_ray.config import Config
from atesd_ray.job import prepare_data
from atesd_ray.runtime.cluster import _runtime_env_for_checkout

# the actor methods of a distillation step, by stage
STAGES = {
    "rollout": ("RolloutWorker.generate",),
    "teacher": ("TeacherWorker.score",),
    # every transport's sender and receiver sides run through these (atesd_ray/runtime/weight_sync/)
    "weight_sync": (
        "StudentRank.holds_version",
        "StudentRank.weight_transfer",
        "RolloutWorker.weight_transfer",
        "TeacherWorker.weight_transfer",
        # the sync's check (atesd_ray/rollout_gap.py)
        "StudentRank.weight_check",
        "RolloutWorker.verify_weights",
        "TeacherWorker.verify_weights",
    ),
    "probe_nll": ("StudentRank.probe",),
    "controller": ("ExposureController.exposure", "ExposureController.observe"),
}


def start_ray(num_cpus: int = 8) -> None:
    """A local Ray instance with room for every actor of the benchmark (they take turns on the cores).

    Its workers run at the driver's priority: Ray's default niceness for workers is 15, which on
    a machine shared with other work starves the actors and not the driver's in-process arms.
    """
    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        os.environ.setdefault("RAY_worker_niceness", str(_niceness(None)))
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env=_runtime_env_for_checkout(),
            log_to_driver=False,
        )


class DistributedStep:
    """The actors of one OPSD run on the bench workload; ``run(batch)`` is one training step."""

    def __init__(self, cfg: Config, name: str = "bench"):
        self.cfg = cfg
        data = prepare_data(cfg)
        self.batch = data.train[: cfg.trainer.prompts_per_step]
        self.actors: Actors = build_actors(cfg, cfg.trainer.total_steps, name=name)
        self.actors.students.set_probe(data.probe).get()
        self.actors.weight_sync.sync(version=0).get()
        self.step_index = 0

    def niceness(self) -> dict:
        """The scheduling priority of the actors and of this driver: the in-process arms of the
        comparison run in the driver, so the two must match for a fair race on a busy machine."""
        actors = ray.get(self.actors.students.actors[0].__ray_call__.remote(_niceness))
        return {"actors": actors, "driver": _niceness(None)}

    def use_controller(self, cfg: Config, name: str) -> None:
        """Swap in the exposure controller of another algorithm (ATESD) on the same workers, with
        teachers that measure what it declares it needs (the grounding signal g)."""
        from controller.actor import needed_signals

        signals = needed_signals(cfg)
        teachers = teacher_group(cfg, f"{name}-teacher", signals)
        controller = controller_actor(cfg, name, cfg.trainer.total_steps)
        ray.get(controller.baseline.remote(self.step_index, self.actors.students.probe(["probe_nll"]).ref))
        self.actors.teachers.shutdown()
        ray.kill(self.actors.controller, no_restart=True)
        self.actors = dataclasses.replace(
            self.actors, controller=controller, teachers=teachers, signals=signals
        )
        self.cfg = cfg

    def run(self) -> dict:
        """One training step on the fixed batch; its metrics plus its wall-clock window."""
        start = time.time()
        algorithm = algorithms.get(self.cfg.algorithm.name)
        metrics, _ = run_step(algorithm, self.cfg, self.actors, self.step_index, self.batch, None, None)
        metrics["window"] = (start, time.time())
        self.step_index += 1
        return metrics

    def shutdown(self) -> None:
        self.actors.shutdown()


def _niceness(_actor) -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)


def task_intervals() -> list[tuple[str, float, float]]:
    """(Class.method, start, end) in seconds since the epoch, for every actor task so far."""
    out = []
    for event in ray.timeline():
        cat = event.get("cat", "")
        if cat.startswith("task::") and event.get("ph") == "X":
            start = event["ts"] / 1e6
            out.append((cat.removeprefix("task::"), start, start + event["dur"] / 1e6))
    return out


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def breakdown(metrics: dict, intervals: list[tuple[str, float, float]]) -> dict:
    """Seconds per stage of one step, from its metrics and the actor tasks inside its window.

    The student update is the step's ``time_update_s`` (``train_step`` starts at once and first
    waits for the rollout and teacher refs); every other stage is its tasks' summed duration.
    """
    lo, hi = metrics["window"]
    inside = [(name, max(a, lo), min(b, hi)) for name, a, b in intervals if b > lo and a < hi]
    out = {stage: sum(b - a for name, a, b in inside if name in names) for stage, names in STAGES.items()}
    out["student_update"] = metrics["time_update_s"]
    busy = [(a, b) for name, a, b in inside if name != "StudentRank.train_step"]
    train = [b for name, _, b in inside if name == "StudentRank.train_step"]
    busy += [(b - metrics["time_update_s"], b) for b in train]
    out["step_wall"] = hi - lo
    out["busy_union"] = _union(busy)
    out["driver_overhead"] = out["step_wall"] - out["busy_union"]
    return out
