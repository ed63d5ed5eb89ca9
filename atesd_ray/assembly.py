"""The composition root: a run's actors, built together and torn down together (:func:`assemble`).

It knows the worker classes (``workers/``) and the exposure controller (``controller/``) and puts
them in their placement groups, and it gives each role a typed group (:class:`StudentGroup`,
:class:`RolloutGroup`, :class:`TeacherGroup`): the calls a step makes are methods, so a mistyped
one fails where it is made, and a call the student ranks make together returns every rank's ref
(``GroupCall``), so that a rank that fails is seen. It imports no algorithm: an algorithm's
student-side objective arrives built (``algorithms.build_actors``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from ray.actor import ActorHandle

from atesd_ray.config import Config
from atesd_ray.console import actor_env_vars
from atesd_ray.runtime.cluster import ActorGroup, GroupCall, Placement, merge_bundles, role_bundle
from atesd_ray.runtime.weight_sync import WeightTransport, make_weight_sync

if TYPE_CHECKING:
    from atesd_ray.objective import Objective


class StudentGroup(ActorGroup):
    """The student ranks (``workers/student.py``): one FSDP group, every call on all ranks."""

    def train_step(self, step: int, *inputs: Any) -> GroupCall:
        """One optimizer step of the objective on ``inputs`` (refs the ranks resolve themselves)."""
        return self.together("train_step", step, *inputs)

    def probe(self, names: list[str]) -> GroupCall:
        """The probe measurements ``names`` (``probe_nll``, ``probe_kl``) on the current weights."""
        return self.together("probe", names)

    def set_probe_rollouts(self, rollouts: list[ray.ObjectRef], scored: list[ray.ObjectRef]) -> GroupCall:
        return self.together("set_probe_rollouts", rollouts, scored)

    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> GroupCall:
        return self.together("score", prompts, responses)

    def mismatch(self, rollouts: list[ray.ObjectRef], scored: list[ray.ObjectRef]) -> GroupCall:
        return self.together("mismatch", rollouts, scored)

    def set_probe(self, records: list[dict]) -> GroupCall:
        return self.together("set_probe", records)

    def save(self, directory: str) -> GroupCall:
        return self.together("save", directory)

    def load(self, directory: str) -> GroupCall:
        return self.together("load", directory)

    def updates(self) -> ray.ObjectRef:
        """The version of the weights the ranks hold: the optimizer steps they applied."""
        return self.actors[0].updates.remote()


class RolloutGroup(ActorGroup):
    """The rollout replicas (``workers/rollout.py``)."""

    def generate(
        self, chunk: int, records: list[dict], step: int, min_version: int, *args: Any
    ) -> ray.ObjectRef:
        """The student's responses to ``records``, chunk ``chunk`` of step ``step``, on replica chunk mod R."""
        return self.serving(chunk).generate.remote(records, step, chunk, min_version, *args)

    def load_checkpoint(self, checkpoint: str) -> list[ray.ObjectRef]:
        return self.call("load_checkpoint", checkpoint)


class TeacherGroup(ActorGroup):
    """The teacher replicas (``workers/teacher.py``): the privileged self-teacher or a separate
    teacher model; the same role holds GRPO's frozen reference model and writes MOTAB's takeovers."""

    def score(self, rollouts: list[ray.ObjectRef], alpha: Any) -> list[ray.ObjectRef]:
        """Teacher targets for each rollout chunk at exposure ``alpha`` (a value or a ref), round robin
        (with ``teacher.routes``, of the chunk's rows routed to this group's model)."""
        return self.round_robin("score", rollouts, alpha)

    def reference_logprobs(self, rollouts: list[ray.ObjectRef], temperature: float) -> list[ray.ObjectRef]:
        return self.round_robin("reference_logprobs", rollouts, temperature)

    def save(self, directory: str) -> ray.ObjectRef:
        """An EMA teacher's weights (the replicas hold the same)."""
        return self.actors[0].save.remote(directory)

    def load(self, directory: str, version: int) -> list[ray.ObjectRef]:
        return self.call("load", directory, version)


@dataclass
class Actors:
    students: StudentGroup
    rollouts: RolloutGroup
    teachers: TeacherGroup
    controller: ActorHandle
    weight_sync: WeightTransport
    topology: dict[str, list[dict]]  # per role, per actor: its device, threads (and a rank's backend)
    signals: frozenset[str]  # what each step measures for the run's consumers
    shared: list[Placement] = field(default_factory=list)  # placements of colocated roles
    # multi-teacher OPD (teacher.routes): one more teacher group per further model, by preset name
    routed: dict[str, TeacherGroup] = field(default_factory=dict)

    def groups(self) -> dict[str, ActorGroup]:
        """Every actor group by role (``teacher <preset>`` for the routed teachers)."""
        base = {"student": self.students, "rollout": self.rollouts, "teacher": self.teachers}
        return base | {f"teacher {model}": group for model, group in self.routed.items()}

    def score_routed(self, rollouts: list[ray.ObjectRef], alpha: Any) -> list[ray.ObjectRef]:
        """Teacher targets for each rollout chunk, each row from the teacher model ``teacher.routes``
        sends it to: every group scores its own rows of every chunk, and one task per chunk merges them."""
        if not self.routed:
            return self.teachers.score(rollouts, alpha)
        parts = [group.score(rollouts, alpha) for group in (self.teachers, *self.routed.values())]
        return [_merge_rows.remote(*chunk) for chunk in zip(*parts, strict=True)]

    def placement_report(self) -> dict:
        """Where every actor runs (``topology.json`` in the run directory)."""
        return {
            role: [t | n for t, n in zip(self.topology[role], group.nodes, strict=True)]
            for role, group in self.groups().items()
        }

    def shutdown(self) -> None:
        try:  # the actors are killed next: a member that does not answer (its node lost) is not waited for
            self.weight_sync.teardown(timeout_s=TEARDOWN_WAIT_S)
        except ray.exceptions.RayError:
            pass
        for group in self.groups().values():
            group.shutdown()
        ray.kill(self.controller, no_restart=True)
        for placement in self.shared:
            placement.remove()


@ray.remote(num_cpus=0)
def _merge_rows(*parts):
    from atesd_ray.objective import merge_routed

    return merge_routed(list(parts))


TEARDOWN_WAIT_S = 10.0  # how long a shutdown waits for the weight transport's members to leave


def restart_limit(cfg: Config, role: str) -> int:
    """``max_restarts`` of a role's actors: rollout and frozen/live teacher replicas come back as
    often as they die (each step still gives up after ``trainer.fault_retries`` tries); the rest
    stay dead, so that a fault there is seen and rolled back (``atesd_ray/faults.py``)."""
    if role == "rollout" or (role == "teacher" and cfg.teacher.weights != "ema"):
        return -1
    return 0


def _release(thing: ActorGroup | Placement | ActorHandle) -> None:
    if isinstance(thing, ActorGroup):
        thing.shutdown()
    elif isinstance(thing, Placement):
        thing.remove()
    else:
        ray.kill(thing, no_restart=True)


def rollout_group(
    cfg: Config, name: str, placement: Placement | None = None, signals: frozenset[str] = frozenset()
) -> RolloutGroup:
    """``rollout.replicas`` rollout actors (restarted by Ray when they die); ``signals``: what they
    measure as the teacher too (``teacher.engine=rollout``)."""
    from workers.rollout import RolloutWorker

    c = cfg.cluster
    return RolloutGroup(
        RolloutWorker,
        cfg.rollout.replicas,
        c.rollout,
        c.rollout_strategy,
        name,
        lambda i: ((cfg, i, signals), {}),
        max_restarts=restart_limit(cfg, "rollout"),
        placement=placement,
        timeout_s=c.placement_timeout_s,
    )


def teacher_group(
    cfg: Config, name: str, signals: frozenset[str] = frozenset(), model: str | None = None
) -> TeacherGroup:
    """``teacher.replicas`` teacher actors, measuring ``signals`` besides their targets; ``model``: a
    preset other than ``teacher.model`` (a routed teacher of multi-teacher OPD)."""
    from workers.teacher import TeacherWorker

    c = cfg.cluster
    return TeacherGroup(
        TeacherWorker,
        cfg.teacher.replicas,
        c.teacher,
        c.teacher_strategy,
        name,
        lambda i: ((cfg, i, signals, model), {}),
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


def assemble(
    cfg: Config,
    objective: Objective,
    signals: frozenset[str],
    total_steps: int,
    name: str,
    timeline_path: str | None = None,
    run: str = "",
) -> Actors:
    """Rollout, teacher, student and controller actors in their placement groups; weight sync set up.
    ``objective``: the algorithm's student-side half, handed to every student rank; ``signals``:
    what a step must measure besides the algorithm's own statistics (the teachers are built with
    them). ``timeline_path``: where the controller keeps its decision timeline up to date; ``run``
    labels the controller's Prometheus series.

    Placement groups per role: the student ranks per ``cluster.student_strategy`` (PACK: as few
    nodes as possible), rollout and teacher replicas per theirs (SPREAD). With
    ``cluster.colocate_rollout`` each student bundle also holds one rollout replica. Whatever was
    created is torn down again if a later actor cannot be built.
    """
    from workers.student import StudentRank

    c = cfg.cluster
    ranks = cfg.trainer.ranks
    timeout = c.placement_timeout_s
    created: list = []
    try:
        shared = None
        if c.colocate_rollout:
            bundle = merge_bundles(role_bundle(c.student), role_bundle(c.rollout))
            shared = Placement(f"{name}-student-rollout", ranks, bundle, c.student_strategy, timeout)
            created.append(shared)
        students = StudentGroup(
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
        rollouts = rollout_group(cfg, f"{name}-rollout", placement=shared, signals=signals)
        created.append(rollouts)
        if cfg.teacher.engine == "rollout":  # the rollout actors score as the teacher too
            teachers = TeacherGroup.serving_as(rollouts)
        else:
            teachers = teacher_group(cfg, f"{name}-teacher", signals)
            created.append(teachers)
        routed = {}
        for model in cfg.teacher.models()[1:]:
            routed[model] = teacher_group(cfg, f"{name}-teacher-{model}", signals, model)
            created.append(routed[model])
        controller = controller_actor(cfg, f"{name}-controller", total_steps, timeline_path, run)
        created.append(controller)
        if c.colocate_rollout:
            # vLLM sizes its KV cache from the device's free memory while it starts: the colocated
            # student ranks load their weights onto the shared GPU only once it has
            ray.get(rollouts.call("ping"))
        address, port = ray.get(students.actors[0].master_address.remote())
        topology = ray.get(students.call("init_distributed", address, port))
        placed = ray.get(rollouts.call("placement") + teachers.call("placement"))
        routed_placed = {f"teacher {m}": ray.get(g.call("placement")) for m, g in routed.items()}
        separate = cfg.teacher.weights != "frozen" and cfg.teacher.engine != "rollout"
        receivers = rollouts.actors + (teachers.actors if separate else [])
        backend = topology[0]["backend"]  # the weight broadcast's: the student group's
        weight_sync = make_weight_sync(
            cfg.trainer.weight_transport,
            students,
            receivers,
            backend,
            bucket_bytes=cfg.trainer.weight_bucket_mb << 20,
            full_sync_every=cfg.trainer.full_sync_every if cfg.trainer.delta_sync else 0,
        )
        weight_sync.setup()
    except BaseException:
        for thing in reversed(created):
            _release(thing)
        raise
    topology = {"student": topology, "rollout": placed[: len(rollouts)], "teacher": placed[len(rollouts) :]}
    topology |= routed_placed
    shared_placements = [shared] if shared else []
    return Actors(
        students, rollouts, teachers, controller, weight_sync, topology, signals, shared_placements, routed
    )
