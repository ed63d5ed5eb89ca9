"""The actors of one training run, created together and torn down together."""

from __future__ import annotations

from dataclasses import dataclass, field

import ray
from ray.actor import ActorHandle

from atesd_ray.config import Config
from atesd_ray.console import actor_env_vars
from atesd_ray.runtime.cluster import ActorGroup, Placement, merge_bundles, role_bundle
from atesd_ray.runtime.faults import restart_limit
from atesd_ray.runtime.weight_sync import WeightTransport, make_weight_sync


@dataclass
class Actors:
    students: ActorGroup
    rollouts: ActorGroup
    teachers: ActorGroup
    controller: ActorHandle
    weight_sync: WeightTransport
    topology: dict[str, list[dict]]  # per role, per actor: its device, threads (and a rank's backend)
    signals: frozenset[str]  # what each step measures for the run's consumers (build_actors)
    shared: list[Placement] = field(default_factory=list)  # placements of colocated roles

    def placement_report(self) -> dict:
        """Where every actor runs (``topology.json`` in the run directory)."""
        groups = {"student": self.students, "rollout": self.rollouts, "teacher": self.teachers}
        return {
            role: [t | n for t, n in zip(self.topology[role], group.nodes, strict=True)]
            for role, group in groups.items()
        }

    def shutdown(self) -> None:
        try:
            self.weight_sync.teardown()
        except ray.exceptions.RayError:
            pass
        for group in (self.students, self.rollouts, self.teachers):
            group.shutdown()
        ray.kill(self.controller, no_restart=True)
        for placement in self.shared:
            placement.remove()


def _release(thing: ActorGroup | Placement | ActorHandle) -> None:
    if isinstance(thing, ActorGroup):
        thing.shutdown()
    elif isinstance(thing, Placement):
        thing.remove()
    else:
        ray.kill(thing, no_restart=True)


def rollout_group(cfg: Config, name: str, placement: Placement | None = None) -> ActorGroup:
    """``rollout.replicas`` rollout actors (restarted by Ray when they die: see ``faults.py``)."""
    from workers.rollout import RolloutWorker

    c = cfg.cluster
    return ActorGroup(
        RolloutWorker,
        cfg.rollout.replicas,
        c.rollout,
        c.rollout_strategy,
        name,
        lambda i: ((cfg, i), {}),
        max_restarts=restart_limit(cfg, "rollout"),
        placement=placement,
        timeout_s=c.placement_timeout_s,
    )


def teacher_group(cfg: Config, name: str, signals: frozenset[str] = frozenset()) -> ActorGroup:
    """``teacher.replicas`` teacher actors, measuring ``signals`` besides their targets."""
    from workers.teacher import TeacherWorker

    c = cfg.cluster
    return ActorGroup(
        TeacherWorker,
        cfg.teacher.replicas,
        c.teacher,
        c.teacher_strategy,
        name,
        lambda i: ((cfg, i, signals), {}),
        max_restarts=restart_limit(cfg, "teacher"),
        timeout_s=c.placement_timeout_s,
    )


def controller_actor(
    cfg: Config, name: str, total_steps: int, timeline_path: str | None = None, run: str = ""
) -> ActorHandle:
    """The run's exposure controller, named ``name`` (``ray.get_actor``)."""
    from controller.actor import ExposureController

    options = {"name": name, "num_cpus": 0, "runtime_env": {"env_vars": actor_env_vars()}}
    return ray.remote(ExposureController).options(**options).remote(cfg, total_steps, timeline_path, run)


def build_actors(
    cfg: Config,
    total_steps: int,
    name: str,
    timeline_path: str | None = None,
    run: str = "",
    signals: frozenset[str] | None = None,
) -> Actors:
    """Rollout, teacher, student and controller actors in their placement groups; weight sync set up.
    ``timeline_path``: where the controller keeps its decision timeline up to date; ``run`` labels
    the controller's Prometheus series. ``signals``: what a step must measure besides the
    algorithm's own statistics (default: what the controller declares it needs); the teachers and
    the algorithm's objective are built with them.

    Placement groups per role: the student ranks per ``cluster.student_strategy`` (PACK: as few
    nodes as possible), rollout and teacher replicas per theirs (SPREAD). With
    ``cluster.colocate_rollout`` each student bundle also holds one rollout replica. Whatever was
    created is torn down again if a later actor cannot be built.
    """
    from atesd_ray import algorithms
    from controller.actor import needed_signals
    from workers.student import StudentRank

    c = cfg.cluster
    ranks = cfg.trainer.ranks
    signals = needed_signals(cfg) if signals is None else signals
    objective = algorithms.get(cfg.algorithm.name).objective(cfg, signals)
    timeout = c.placement_timeout_s
    created: list = []
    try:
        shared = None
        if c.colocate_rollout:
            bundle = merge_bundles(role_bundle(c.student), role_bundle(c.rollout))
            shared = Placement(f"{name}-student-rollout", ranks, bundle, c.student_strategy, timeout)
            created.append(shared)
        students = ActorGroup(
            StudentRank,
            ranks,
            c.student,
            c.student_strategy,
            f"{name}-student",
            lambda i: ((cfg, i, ranks, objective), {}),
            placement=shared,
            timeout_s=timeout,
        )
        created.append(students)
        rollouts = rollout_group(cfg, f"{name}-rollout", placement=shared)
        created.append(rollouts)
        teachers = teacher_group(cfg, f"{name}-teacher", signals)
        created.append(teachers)
        controller = controller_actor(cfg, f"{name}-controller", total_steps, timeline_path, run)
        created.append(controller)
        if c.colocate_rollout:
            # vLLM sizes its KV cache from the device's free memory while it starts: the colocated
            # student ranks load their weights onto the shared GPU only once it has
            ray.get(rollouts.call("ping"))
        address, port = ray.get(students.actors[0].master_address.remote())
        topology = ray.get(students.call("init_distributed", address, port))
        placed = ray.get(rollouts.call("placement") + teachers.call("placement"))
        receivers = rollouts.actors + (teachers.actors if cfg.teacher.weights != "frozen" else [])
        backend = topology[0]["backend"]  # the weight broadcast's: the student group's
        weight_sync = make_weight_sync(
            cfg.trainer.weight_transport,
            students,
            receivers,
            backend,
            bucket_bytes=cfg.trainer.weight_bucket_mb << 20,
        )
        weight_sync.setup()
    except BaseException:
        for thing in reversed(created):
            _release(thing)
        raise
    topology = {"student": topology, "rollout": placed[: len(rollouts)], "teacher": placed[len(rollouts) :]}
    return Actors(
        students, rollouts, teachers, controller, weight_sync, topology, signals, [shared] if shared else []
    )
