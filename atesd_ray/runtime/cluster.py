"""Joining a Ray cluster, placement groups per role, and groups of actors called together."""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from atesd_ray.config import ClusterConfig, RoleResources

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class ClusterError(RuntimeError):
    pass


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail within seconds, with the address in the message, when nothing listens there."""
    if address in ("auto", "local") or address.startswith("ray://"):
        if address.startswith("ray://"):
            parsed = urlparse(address)
            host, port = parsed.hostname, parsed.port or 10001
        else:
            return
    else:
        host, _, port_s = address.rpartition(":")
        host, port = (host or address), int(port_s) if port_s.isdigit() else 6379
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        raise ClusterError(f"cannot reach the Ray cluster at '{address}' ({host}:{port}): {err}") from err


def _runtime_env_for_checkout() -> dict[str, Any]:
    """When running from a plain checkout (not an installed wheel), put it on the workers' path."""
    if "site-packages" in str(PACKAGE_ROOT):
        return {}
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def connect(cfg: ClusterConfig, needed_cpus: float = 0.0) -> None:
    """Join ``cluster.address`` or $RAY_ADDRESS if set; otherwise start a local instance."""
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address, cfg.connect_timeout_s)
        ray.init(address=address, log_to_driver=True)
        return
    num_cpus = cfg.num_cpus or max(os.cpu_count() or 1, math.ceil(needed_cpus))
    ray.init(num_cpus=num_cpus, runtime_env=_runtime_env_for_checkout(), log_to_driver=True)


def _bundle(res: RoleResources) -> dict[str, float]:
    bundle = {"CPU": float(res.cpus)}
    if res.gpus:
        bundle["GPU"] = float(res.gpus)
    bundle.update({k: float(v) for k, v in res.resources.items()})
    return bundle


def make_placement_group(name: str, count: int, res: RoleResources, strategy: str, timeout_s: float = 120.0) -> PlacementGroup:
    pg = placement_group([_bundle(res)] * count, strategy=strategy, name=name)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as err:
        remove_placement_group(pg)
        raise ClusterError(
            f"placement group '{name}' ({count} x {_bundle(res)}, {strategy}) was not placed within {timeout_s:.0f} s; "
            f"cluster resources: {ray.cluster_resources()}"
        ) from err
    return pg


class ActorGroup:
    """N actors of one class in one placement group, one bundle each, called together."""

    def __init__(
        self,
        cls: type,
        count: int,
        res: RoleResources,
        strategy: str,
        name: str,
        make_args: Callable[[int], tuple[tuple, dict]],
        max_restarts: int = 0,
    ):
        self.name = name
        self.pg = make_placement_group(name, count, res, strategy)
        remote_cls = ray.remote(cls)
        self.actors = []
        for i in range(count):
            args, kwargs = make_args(i)
            options = dict(
                num_cpus=res.cpus,
                num_gpus=res.gpus,
                resources=dict(res.resources) or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                max_restarts=max_restarts,
                max_task_retries=0,
            )
            self.actors.append(remote_cls.options(**options).remote(*args, **kwargs))

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call_each(self, method: str, per_actor_args: Sequence[tuple]) -> list[ray.ObjectRef]:
        return [getattr(a, method).remote(*args) for a, args in zip(self.actors, per_actor_args, strict=True)]

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)
