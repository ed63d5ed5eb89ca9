"""Joining a Ray cluster, placement groups per role, and groups of actors called together."""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import ray
from ray.actor import ActorHandle
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from atesd_ray import interrupts
from atesd_ray.config import ClusterConfig, Config, RoleResources
from atesd_ray.console import actor_env_vars, quiet
from atesd_ray.runtime import devices
from atesd_ray.runtime.devices import hidden_gpus

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# set by Ray's job supervisor for the driver of a `ray job submit` job: the job's runtime env then applies
JOB_CONFIG_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class ClusterError(RuntimeError):
    pass


def free_port() -> int:
    """A free TCP port on this node (for a process group's store)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def split_evenly(items: list, parts: int) -> list[list]:
    """``items`` in at most ``parts`` consecutive chunks whose sizes differ by at most one; no empty chunk."""
    per, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + per + (i < extra)
        out.append(items[start:end])
        start = end
    return [chunk for chunk in out if chunk]


def _host_port(address: str) -> tuple[str, int] | None:
    """Where ``ray.init(address)`` will connect, or None when Ray resolves it itself ("auto")."""
    if address in ("auto", "local"):
        return None
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if parsed.scheme in ("http", "https"):
        raise ClusterError(
            f"'{address}' is a dashboard (job submission) address; the driver joins the cluster's GCS "
            f"address (host:6379) or a Ray client address (ray://host:10001). Submit to the dashboard "
            f"address with `ray job submit --address {address} ...` instead"
        )
    default_port = 10001 if parsed.scheme == "ray" else 6379
    return parsed.hostname or "127.0.0.1", parsed.port or default_port


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail within seconds, with the address in the message, when nothing listens there (ray.init
    itself retries for minutes)."""
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as err:
        host, port = target
        raise ClusterError(f"cannot reach the Ray cluster at '{address}' ({host}:{port}): {err}") from err


def _runtime_env_for_checkout() -> dict[str, Any]:
    """When running from a plain checkout (not an installed wheel), put it on the workers' path."""
    if "site-packages" in str(PACKAGE_ROOT):
        return {}
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def in_submitted_job() -> bool:
    """True inside ``ray job submit``: the job's runtime env (its uploaded working dir) applies."""
    return JOB_CONFIG_ENV_VAR in os.environ


CODE_PACKAGES = ("atesd_ray", "workers", "controller")


def _import_code() -> None:
    import importlib

    for name in CODE_PACKAGES:
        importlib.import_module(name)


def check_code_on_nodes() -> None:
    """Fail before any actor is built, naming the node, when a node's workers cannot import this
    code (a job whose runtime env lacks the package, on a node whose image lacks it): otherwise the
    first actor placed there dies in Ray's unpickling, far from the cause."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_import_code)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    refs = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
        for n in nodes
    ]
    lacking = []
    for node, ref in zip(nodes, refs, strict=True):
        try:
            ray.get(ref)
        except ray.exceptions.RayError as err:
            cause = next((line for line in reversed(str(err).splitlines()) if "Error" in line), str(err))
            lacking.append(f"node {node['NodeManagerAddress']} (id {node['NodeID'][:12]}): {cause.strip()}")
    if lacking:
        raise ClusterError(
            "the Ray workers of these nodes cannot import this code ("
            + ", ".join(CODE_PACKAGES)
            + "): "
            + "; ".join(lacking)
            + ". The job's runtime env must carry it: submit from the checkout with `ray job submit "
            "--working-dir . --runtime-env runtime_env.yaml -- python -m atesd_ray.main ...`, or install "
            "atesd-ray on every node (the images in docker/ do)"
        )


def connect(cfg: ClusterConfig, needed_cpus: float = 0.0) -> None:
    """Join ``cluster.address`` or $RAY_ADDRESS if set (``ray job submit`` sets it for the driver);
    otherwise start a local instance sized to the machine."""
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {} if in_submitted_job() else _runtime_env_for_checkout()
    if address:
        _check_reachable(address, cfg.connect_timeout_s)
        try:
            ray.init(
                address=address,
                runtime_env=runtime_env or None,
                log_to_driver=True,
                logging_level=_ray_level(),
            )
        except ConnectionError as err:
            raise ClusterError(f"cannot join the Ray cluster at '{address}': {err}") from err
        interrupts.install()  # ray.init replaced the SIGTERM handler
        log.info("joined the Ray cluster at %s: %s", address, ray.cluster_resources())
        check_code_on_nodes()
        return
    num_cpus = cfg.num_cpus or max(os.cpu_count() or 1, math.ceil(needed_cpus))
    # Ray's default too, spelled out: the dashboard (and its job-submission API) answers on loopback only
    ray.init(
        num_cpus=num_cpus,
        runtime_env=runtime_env,
        log_to_driver=True,
        dashboard_host="127.0.0.1",
        logging_level=_ray_level(),
    )
    interrupts.install()  # ray.init replaced the SIGTERM handler
    log.info("started a local Ray instance: %d CPUs, dashboard http://127.0.0.1:8265", num_cpus)


def place(cfg: Config, roles: tuple[str, ...] = devices.ROLES) -> None:
    """Join or start the cluster for the actors of ``roles``, then settle and check where they run
    (``runtime/devices.py``). Run before any actor is built; the config is validated again after."""
    n, c = devices.role_counts(cfg), cfg.cluster
    connect(c, needed_cpus=sum((getattr(c, r).cpus or 1) * n[r] for r in roles))
    grows = bool(c.address or os.environ.get("RAY_ADDRESS"))  # a joined cluster may add nodes
    devices.resolve_gpus(cfg, ray.cluster_resources().get("GPU", 0.0), grows)
    cfg.validate()
    if any(getattr(c, r).gpus for r in roles):
        devices.check_gpu_nodes()


def _ray_level() -> int:
    """Ray's own driver-side notices (start-up, token authentication) only with logging.level=debug."""
    return logging.ERROR if quiet() else logging.INFO


def merge_bundles(*bundles: dict[str, float]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            merged[key] = merged.get(key, 0.0) + value
    return merged


def role_bundle(res: RoleResources) -> dict[str, float]:
    bundle = {"CPU": float(1 if res.cpus is None else res.cpus)}
    if res.gpus:
        bundle["GPU"] = float(res.gpus)
    bundle.update({k: float(v) for k, v in res.resources.items()})
    return bundle


def _node_key(ip: str, node_id: str) -> tuple:
    try:
        addr = ipaddress.ip_address(ip)
        return (addr.version, int(addr), node_id)
    except ValueError:
        return (9, ip, node_id)


WAIT_PROGRESS_S = 30.0  # how often a wait for actors to be placed says what it waits for


class Placement:
    """A placement group of ``count`` identical bundles, numbered in node order.

    Ray places bundle i wherever it fits, so bundle numbers say nothing about nodes. Slot k is the
    k-th bundle sorted by (node address, node id): actors of one role on one node get consecutive
    slots (ranks), and the same placement always gives the same rank order, whatever order Ray
    created the bundles in.
    """

    def __init__(
        self, name: str, count: int, bundle: dict[str, float], strategy: str, timeout_s: float = 300.0
    ):
        self.name = name
        self.bundle = bundle
        self.pg = placement_group([bundle] * count, strategy=strategy, name=name)
        ready, deadline = self.pg.ready(), time.monotonic() + timeout_s
        while not ray.wait([ready], timeout=min(WAIT_PROGRESS_S, max(0.0, deadline - time.monotonic())))[0]:
            left = deadline - time.monotonic()
            if left <= 0:
                remove_placement_group(self.pg)
                raise ClusterError(
                    f"placement group '{name}' ({count} x {bundle}, {strategy}) was not placed within "
                    f"{timeout_s:.0f} s (cluster.placement_timeout_s): no node offers those resources now "
                    f"(cluster resources: {ray.cluster_resources()}); was a node lost? Nothing past the last "
                    "complete checkpoint is lost: once a node offers them, the same command resumes"
                )
            print(f"waiting for placement group '{name}' ({count} x {bundle}): {left:.0f} s left", flush=True)
        ray.get(ready)
        table = placement_group_table(self.pg)["bundles_to_node_id"]
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        self.order = sorted(range(count), key=lambda b: (_node_key(ips.get(table[b], ""), table[b]), b))
        self.nodes = [
            {"node_id": table[b], "node_ip": ips.get(table[b], ""), "bundle": b} for b in self.order
        ]
        self.removed = False

    def __len__(self) -> int:
        return len(self.order)

    def strategy(self, slot: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=self.order[slot])

    def remove(self) -> None:
        if not self.removed:
            remove_placement_group(self.pg)
            self.removed = True


@dataclass(frozen=True)
class GroupCall:
    """One method run by every actor of a group together. ``ref`` is rank 0's answer, which speaks
    for all and is what a step passes on to other actors; :meth:`get` waits on every rank's, so a
    rank that failed is seen at once, not only when rank 0 hangs on it."""

    refs: list[ray.ObjectRef]

    @property
    def ref(self) -> ray.ObjectRef:
        return self.refs[0]

    def get(self) -> Any:
        return ray.get(self.refs)[0]


class ActorGroup:
    """N actors of one class, actor i in slot i of a placement, called together. Actor i is named
    ``{name}-{i}`` (``ray.get_actor``), so operators and fault-injection tests can find it.

    The group makes (and at shutdown removes) its own placement group unless it is given one to
    share, as colocated roles do.
    """

    def __init__(
        self,
        cls: type,
        count: int,
        res: RoleResources,
        strategy: str,
        name: str,
        make_args: Callable[[int], tuple[tuple, dict]],
        max_restarts: int = 0,
        placement: Placement | None = None,
        timeout_s: float = 300.0,
    ):
        self.name = name
        self.owns_actors = True
        self.owns_placement = placement is None
        self.placement = placement or Placement(name, count, role_bundle(res), strategy, timeout_s)
        if count > len(self.placement):
            raise ClusterError(
                f"actor group '{name}' needs {count} bundles; its placement has {len(self.placement)}"
            )
        remote_cls = ray.remote(cls)
        self.actors = []
        for i in range(count):
            args, kwargs = make_args(i)
            options = dict(
                num_cpus=1 if res.cpus is None else res.cpus,
                num_gpus=res.gpus,
                resources=dict(res.resources) or None,
                name=f"{name}-{i}",
                scheduling_strategy=self.placement.strategy(i),
                max_restarts=max_restarts,
                max_task_retries=0,
                runtime_env={"env_vars": actor_env_vars() | hidden_gpus(res)},
            )
            self.actors.append(remote_cls.options(**options).remote(*args, **kwargs))

    @classmethod
    def serving_as(cls, other: ActorGroup) -> ActorGroup:
        """The actors of ``other`` called as this class's group, when one process plays both roles
        (``teacher.engine=rollout``); they stay ``other``'s to shut down."""
        view = cls.__new__(cls)
        view.name, view.placement, view.actors = other.name, other.placement, other.actors
        view.owns_actors = view.owns_placement = False
        return view

    @property
    def pg(self) -> PlacementGroup:
        return self.placement.pg

    @property
    def nodes(self) -> list[dict]:
        """Where actor i runs: node id, node address and bundle index."""
        return self.placement.nodes[: len(self.actors)]

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """``method`` on every actor; one ref each."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def together(self, method: str, *args: Any, **kwargs: Any) -> GroupCall:
        """``method`` on every actor, which run it together (FSDP ranks gather and reduce as one)."""
        return GroupCall(self.call(method, *args, **kwargs))

    def serving(self, i: int) -> ActorHandle:
        """The actor that serves item i of a list handed out round robin."""
        return self.actors[i % len(self.actors)]

    def round_robin(self, method: str, items: list, *args: Any) -> list[ray.ObjectRef]:
        """``method(item, *args)`` for each item, item i on actor i mod N; one ref per item."""
        return [getattr(self.serving(i), method).remote(item, *args) for i, item in enumerate(items)]

    def map(self, method: str, items: list, *args: Any, seed: int | None = None) -> list:
        """``method(chunk, *args)`` on actor i for the i-th of even chunks of ``items`` (with
        ``seed=seed + i`` when a seed is given), in parallel; waits, and returns the results in item order."""
        chunks = split_evenly(items, len(self.actors))
        refs = [
            getattr(self.actors[i], method).remote(
                chunk, *args, **({} if seed is None else {"seed": seed + i})
            )
            for i, chunk in enumerate(chunks)
        ]
        return [out for part in ray.get(refs) for out in part]

    def shutdown(self) -> None:
        if not self.owns_actors:
            return
        for a in self.actors:
            ray.kill(a, no_restart=True)
        if self.owns_placement:
            self.placement.remove()
