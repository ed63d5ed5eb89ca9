"""Surviving actor faults without losing a step or doing one twice.

Two ways back, chosen by what died:

- A rollout replica, or a teacher replica whose weights a sync can rebuild (``frozen``, ``live``):
  Ray restarts it in its placement bundle (``max_restarts``, see :func:`restart_limit`); the
  driver waits for it, re-sends the student's current weights to every receiver and runs the
  failed step again (:func:`retrying`). A retried step gives the result of the unkilled one:
  rollout seeds depend on (seed, step, chunk) only, and the actors whose state a step changes (the
  student ranks, the controller) apply each step once (``workers.common.once_per_step``), answering a repeat
  with the result they already have.
- A student rank (FSDP ranks cannot rejoin a process group), the controller, or an EMA teacher
  (its average exists nowhere else): :class:`Rollback`. The training loop tears every actor down,
  builds them again and continues from the last complete checkpoint.

Algorithm code knows nothing of this: ``train.py`` wraps each step in :func:`retrying`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import ray
from ray.actor import ActorHandle

from atesd_ray.config import Config
from atesd_ray.rollout_gap import check_sync, sync_gap
from atesd_ray.runtime.cluster import WAIT_PROGRESS_S, role_bundle
from atesd_ray.runtime.transfer import PeerLost

if TYPE_CHECKING:
    from pathlib import Path

    from atesd_ray.assembly import Actors

T = TypeVar("T")


class Rollback(RuntimeError):
    """An actor died that a restart cannot bring back in step: continue from the last checkpoint."""


def _caused_by(err: BaseException | None, kinds: tuple[type, ...]) -> bool:
    """Whether ``err`` or what caused it (an actor task's error carries the original) is one of ``kinds``."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, kinds):
            return True
        err = getattr(err, "cause", None) or err.__cause__
    return False


def is_actor_fault(err: BaseException) -> bool:
    """True when ``err`` or what caused it is an actor that died or became unreachable (an actor
    task that failed because its input came from a dead actor carries that error as its cause), or
    a weight group's broadcast that a member left by dying (:class:`PeerLost`)."""
    return _caused_by(err, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, PeerLost))


FIRST_WAIT_S = 5.0  # a restarted actor on a live node answers within this; longer is worth a line


class ActorsLost(RuntimeError):
    """Actors that died could not be placed again: their node is gone, or no node has their resources."""


def _lost(names, needs: dict[str, dict], timeout_s: float, run_dir: str | None, what: str) -> ActorsLost:
    waiting = ", ".join(f"{name} (needs {needs.get(name)})" for name in sorted(names))
    where = f"{run_dir}/checkpoints" if run_dir else "the run directory"
    return ActorsLost(
        f"{waiting} {what} within {timeout_s:.0f} s (cluster.placement_timeout_s): no node offers those "
        f"resources now; was a node lost? The last complete checkpoint in {where} is kept; once the "
        "resources are back, the same command resumes from it"
    )


def _alive(
    handles: dict[str, ActorHandle],
    needs: dict[str, dict],
    timeout_s: float,
    deadline: float,
    run_dir: str | None,
) -> list[str]:
    """The names of ``handles`` that are dead for good; waits for restarting ones to answer (a
    restart on a live node takes seconds), saying what it waits for after :data:`FIRST_WAIT_S` and
    every :data:`~atesd_ray.runtime.cluster.WAIT_PROGRESS_S`, and raises :class:`ActorsLost` at
    ``deadline`` (``time.monotonic()``; ``timeout_s`` after the fault)."""
    dead = []
    pending = {h.__ray_ready__.remote(): name for name, h in handles.items()}
    wait_s = FIRST_WAIT_S
    while pending:
        left = deadline - time.monotonic()
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=max(0.5, min(wait_s, left)))
        for ref in ready:
            name = pending.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.ActorUnavailableError:  # restarting: ask again
                pending[handles[name].__ray_ready__.remote()] = name
            except ray.exceptions.RayActorError:
                dead.append(name)
        if not pending:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            raise _lost(pending.values(), needs, timeout_s, run_dir, "could not be placed again")
        if not ready:
            print(
                f"waiting for {', '.join(sorted(pending.values()))} to restart ({left:.0f} s left)",
                flush=True,
            )
            wait_s = WAIT_PROGRESS_S
        else:
            time.sleep(0.5)
    return dead


def recover(cfg: Config, actors: Actors, checkpoint: Path | None = None) -> None:
    """After an actor fault: wait for restarted replicas and give every weight receiver the
    student's current weights, checked as every sync is (the run stops, keeping ``checkpoint``, when
    a receiver holds other weights); raise :class:`Rollback` when an actor is dead for good."""
    handles = {"controller": actors.controller}
    for role, group in actors.groups().items():
        if not group.owns_actors:  # the rollout actors scoring as the teacher are waited for once
            continue
        handles.update({f"{role} {i}": a for i, a in enumerate(group.actors)})
    needs = {
        name: role_bundle(getattr(cfg.cluster, name.split()[0])) for name in handles if name != "controller"
    }
    timeout_s = cfg.cluster.placement_timeout_s
    deadline = time.monotonic() + timeout_s

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    for attempt in range(cfg.trainer.fault_retries + 1):
        dead = _alive(handles, needs, timeout_s, deadline, cfg.run_dir)
        if dead:
            raise Rollback(f"dead for good: {', '.join(dead)}")
        try:
            version = ray.get(actors.students.actors[0].updates.remote(), timeout=left())
            actors.weight_sync.teardown(timeout_s=left())
            # a collective transport needs a new group with the new actor; a member that answered
            # once and then died with its node would hold the others in the group's rendezvous
            actors.weight_sync.setup(timeout_s=left())
            actors.weight_sync.sync(version=version).get()
            gap = sync_gap(ray.get(actors.weight_sync.verify()))
        except ray.exceptions.GetTimeoutError:  # the deadline, with members that would not answer
            names = [n for n in handles if n.split()[0] in ("rollout", "teacher")]
            raise _lost(
                names, needs, timeout_s, cfg.run_dir, "could not be joined to the weight sync"
            ) from None
        except ray.exceptions.RayError as err:
            # an actor on a node that is going down can still answer once before it dies
            if (
                not is_actor_fault(err)
                or attempt == cfg.trainer.fault_retries
                or time.monotonic() >= deadline
            ):
                raise
            print(f"recovery: an actor died again ({type(err).__name__}); waiting for it", flush=True)
            continue
        check_sync(cfg, version, gap, checkpoint)
        return


def retrying(
    cfg: Config, actors: Actors, what: str, attempt: Callable[[bool], T], checkpoint: Path | None = None
) -> T:
    """``attempt(retry)``, again after each actor fault that :func:`recover` repairs, at most
    ``trainer.fault_retries`` times; ``retry`` is True from the second call on. ``checkpoint`` is
    the run's last complete one, named if a repair's sync fails its check."""
    tries = 0
    while True:
        try:
            return attempt(tries > 0)
        except ray.exceptions.RayError as err:
            if not is_actor_fault(err) or tries == cfg.trainer.fault_retries:
                raise
            if cfg.trainer.ranks > 1 and _caused_by(err, PeerLost):
                # rank 0 left the weight stream mid-way while the other ranks wait in its next
                # gather: only new student ranks are in step again
                raise Rollback(f"{what}: a weight broadcast lost a member mid-sync") from err
            tries += 1
            print(f"{what}: an actor died ({type(err).__name__}); retry {tries}", flush=True)
            recover(cfg, actors, checkpoint)
