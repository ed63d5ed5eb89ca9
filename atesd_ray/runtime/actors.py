"""The actors of one training run, created together and torn down together."""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.actor import ActorHandle

from atesd_ray.config import Config
from atesd_ray.runtime.cluster import ActorGroup
from atesd_ray.runtime.weight_sync import WeightSync, make_weight_sync


@dataclass
class Actors:
    students: ActorGroup
    rollouts: ActorGroup
    teachers: ActorGroup
    controller: ActorHandle
    weight_sync: WeightSync
    topology: list[dict]

    def shutdown(self) -> None:
        try:
            self.weight_sync.teardown()
        except ray.exceptions.RayError:
            pass
        for group in (self.students, self.rollouts, self.teachers):
            group.shutdown()
        ray.kill(self.controller, no_restart=True)


def build_actors(cfg: Config, total_steps: int, name: str, timeline_path: str | None = None, run: str = "") -> Actors:
    """Rollout, teacher, student and controller actors in their placement groups; weight sync set up.
    ``timeline_path``: where the controller keeps its decision timeline up to date; ``run`` labels
    the controller's Prometheus series."""
    from controller.actor import ExposureController
    from workers.rollout import RolloutWorker
    from workers.student import StudentRank
    from workers.teacher import TeacherWorker

    c = cfg.cluster
    ranks = cfg.trainer.ranks
    students = ActorGroup(StudentRank, ranks, c.student, c.student_strategy, f"{name}-student", lambda i: ((cfg, i, ranks), {}))
    rollouts = ActorGroup(RolloutWorker, cfg.rollout.replicas, c.rollout, c.rollout_strategy, f"{name}-rollout", lambda i: ((cfg, i), {}))
    teachers = ActorGroup(TeacherWorker, cfg.teacher.replicas, c.teacher, c.teacher_strategy, f"{name}-teacher", lambda i: ((cfg, i), {}))
    controller = ray.remote(ExposureController).options(name=f"{name}-controller", num_cpus=0).remote(cfg, total_steps, timeline_path, run)
    address, port = ray.get(students.actors[0].master_address.remote())
    topology = ray.get(students.call("init_distributed", address, port))
    ray.get(rollouts.call("ping") + teachers.call("ping"))
    receivers = rollouts.actors + (teachers.actors if cfg.teacher.weights != "frozen" else [])
    backend = topology[0]["backend"]
    weight_sync = make_weight_sync(cfg.trainer.weight_transport, students, receivers, backend)
    weight_sync.setup()
    return Actors(students, rollouts, teachers, controller, weight_sync, topology)
