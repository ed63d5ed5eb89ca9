"""Where every actor's models live, decided in one place.

In the driver, before any actor starts, ``runtime.cluster.place`` joins (or starts) the cluster for
the roles a mode runs and settles their resources with:

- an actor's torch threads (:func:`threads`) are the CPUs it reserved, so a node shared by
  several actors is not oversubscribed; ``cpus: null`` (``cluster=local``: a machine the run has
  to itself) reserves one CPU in Ray's accounting and uses the machine's cores (a student rank its
  share), since its actors take turns within a step; ``cluster.torch_threads`` overrides both.
- :func:`resolve_gpus` fills the roles whose ``cluster.<role>.gpus`` is null (``cluster=local``):
  none on a machine without GPUs; one per actor when the cluster has one for each; shared evenly
  when it has fewer and the student is one rank (FSDP ranks need a GPU each). It refuses a cluster
  that has fewer GPUs than the roles ask for when the driver started it itself (it cannot grow).
- :func:`check_gpu_nodes` runs a probe on every node that advertises GPUs to Ray and refuses, naming
  the node, when CUDA cannot be used there (say, a driver older than the wheels' CUDA): the student
  would otherwise train on the CPU with its GPUs reserved, and vLLM fail with a message about RAM.

In each actor, :func:`actor_device` is the device of its models: the GPU Ray reserved for it (Ray
sets ``CUDA_VISIBLE_DEVICES``, so it is ``cuda:0`` of what the actor sees), else the CPU. An actor
that reserved no GPU is started with ``CUDA_VISIBLE_DEVICES`` empty (:func:`hidden_gpus`), so it
never touches one: without that, Ray leaves every GPU visible to it, and every student rank of a
``cluster=local`` run on a multi-GPU box would take ``cuda:0``.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from atesd_ray.config import Config, RoleResources

ROLES = ("student", "rollout", "teacher")


class PlacementError(RuntimeError):
    """The configured placement cannot run on this cluster."""


def role_counts(cfg: Config) -> dict[str, int]:
    return {"student": cfg.trainer.ranks, "rollout": cfg.rollout.replicas, "teacher": cfg.teacher.replicas}


def backend(cfg: Config) -> str:
    """The student group's torch.distributed backend: ``trainer.backend``, or for ``auto`` NCCL
    exactly when the student ranks reserved GPUs (never from what a process happens to see)."""
    if cfg.trainer.backend != "auto":
        return cfg.trainer.backend
    return "nccl" if cfg.cluster.student.gpus else "gloo"


def threads(cfg: Config, res: RoleResources) -> int:
    """An actor's torch threads: ``cluster.torch_threads``, else the CPUs it reserved, else (``cpus:
    null``) the machine's cores, a student rank its share."""
    if cfg.cluster.torch_threads:
        return cfg.cluster.torch_threads
    if res.cpus is not None:
        return max(1, int(res.cpus))
    share = cfg.trainer.ranks if res is cfg.cluster.student else 1
    return max(1, (os.cpu_count() or 1) // share)


def gpus_needed(cfg: Config) -> float:
    """GPUs the run's actors reserve (colocated rollouts share the student's bundle)."""
    c, n = cfg.cluster, role_counts(cfg)
    return sum((getattr(c, role).gpus or 0.0) * n[role] for role in ROLES)


def resolve_gpus(cfg: Config, cluster_gpus: float, grows: bool) -> None:
    """Set every ``cluster.<role>.gpus`` left null for a cluster with ``cluster_gpus`` GPUs; refuse a
    placement that cannot fit when the cluster cannot grow (``grows`` False: a local instance)."""
    c, n = cfg.cluster, role_counts(cfg)
    auto = [role for role in ROLES if getattr(c, role).gpus is None]
    if auto:
        fixed = sum(getattr(c, r).gpus * n[r] for r in ROLES if r not in auto)
        free, actors = max(0.0, cluster_gpus - fixed), sum(n[r] for r in auto)
        if free == 0:
            share = 0.0
        elif free >= actors:
            share = 1.0
        elif "student" not in auto or n["student"] == 1:
            share = math.floor(free / actors * 100) / 100  # one GPU's worth, split evenly, rounded down
        else:
            raise PlacementError(
                f"cluster.student.gpus is auto and the cluster has {cluster_gpus:g} GPUs for "
                f"{actors} actors ({', '.join(f'{n[r]} {r}' for r in auto)}): FSDP ranks need a GPU each. "
                "Set cluster.student.gpus, cluster.rollout.gpus and cluster.teacher.gpus, or fewer "
                "trainer.ranks / rollout.replicas / teacher.replicas"
            )
        for role in auto:
            getattr(c, role).gpus = share
    needed = gpus_needed(cfg)
    if needed > cluster_gpus + 1e-9 and not grows:
        asked = ", ".join(
            f"cluster.{r}.gpus={getattr(c, r).gpus:g} x {n[r]}" for r in ROLES if getattr(c, r).gpus
        )
        raise PlacementError(
            f"the run reserves {needed:g} GPUs ({asked}) and this machine has {cluster_gpus:g}; "
            "set cluster.<role>.gpus to fit (fractions share a GPU), or join a cluster with cluster.address"
        )


def _cuda_probe() -> dict:
    import os

    ok = torch.cuda.is_available()
    reason = ""
    if not ok:
        try:
            torch.cuda.init()
        except Exception as err:  # the reason CUDA is unusable, in the message to the user
            reason = str(err).splitlines()[0]
    return {
        "ok": ok,
        "reason": reason or "torch.cuda.is_available() is False",
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def check_gpu_nodes(timeout_s: float = 60.0) -> None:
    """Refuse, naming the node, when a node advertises GPUs to Ray but CUDA cannot be used there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]
    probe = ray.remote(num_cpus=0, num_gpus=0.01, max_retries=0)(_cuda_probe)
    refs = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
        for n in nodes
    ]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    broken = []
    for node, ref in zip(nodes, refs, strict=True):
        if ref not in ready:  # every GPU of the node is busy with other work: nothing to learn
            ray.cancel(ref, force=True)
            continue
        answer = ray.get(ref)
        if not answer["ok"]:
            broken.append(
                f"node {node['NodeManagerAddress']} (id {node['NodeID'][:12]}) advertises "
                f"{node['Resources']['GPU']:g} GPUs, but CUDA is unusable there ({answer['reason']}; "
                f"CUDA_VISIBLE_DEVICES={answer['visible']}, torch {answer['torch']} built for CUDA {answer['cuda']})"
            )
    if broken:
        raise PlacementError(
            "; ".join(broken)
            + ". Check the node's NVIDIA driver against the CUDA version torch was built for "
            "(nvidia-smi), or start its raylet with --num-gpus=0 to run it as a CPU node"
        )


def hidden_gpus(res: RoleResources) -> dict[str, str]:
    """Environment of an actor of ``res``: one that reserved no GPU sees none."""
    return {} if res.gpus else {"CUDA_VISIBLE_DEVICES": ""}


def actor_device(res: RoleResources, who: str) -> torch.device:
    """The device of this actor's models: the GPU Ray reserved for it, else the CPU. An actor that
    reserved a GPU it cannot use stops here, naming itself, instead of running on the CPU."""
    if not res.gpus:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        import os

        raise PlacementError(
            f"{who} reserved {res.gpus:g} GPU (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}) "
            "but CUDA is unusable in its process; it will not run on the CPU instead"
        )
    return torch.device("cuda", torch.cuda.current_device())
