"""Shared test fixtures: composed configs and one real local Ray cluster per test module."""

from __future__ import annotations

import os

import pytest

from atesd_ray import algorithms
from atesd_ray.config import Config, compose

# A tiny-model run small enough for unit tests (seconds per step on two cores).
TINY = [
    "model=tiny",
    "trainer.total_steps=2",
    "trainer.prompts_per_step=4",
    "trainer.micro_batch=2",
    "rollout.max_new_tokens=12",
    "rollout.micro_batch=8",
    "teacher.micro_batch=4",
    "data.synthetic.n_train=32",
    "data.synthetic.n_eval=8",
    "data.probe_size=2",
    "tracking.backends=[jsonl]",
    "dashboard.enabled=false",
]


def make_config(*overrides: str) -> Config:
    """The config `atesd-ray <overrides>` would run with, validated (the algorithm's rules included)."""
    return algorithms.check(compose(*overrides))


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray instance (not local_mode), shut down after the module."""
    import ray

    from atesd_ray.runtime.cluster import _runtime_env_for_checkout

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray metrics every 2 s (default 10 s): a tiny-model run's actors live only seconds, and the
    # series of an actor that is gone are gone from its node's metrics agent
    os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")
    ray.init(
        num_cpus=8, include_dashboard=False, runtime_env=_runtime_env_for_checkout(), log_to_driver=False
    )
    yield ray
    ray.shutdown()


# fixtures that start a Ray cluster: a test that takes one (itself or through another fixture) is a
# cluster test (`make test-cluster`, marker `ray`); the rest are unit tests (`make test-unit`)
CLUSTER_FIXTURES = {"ray_cluster", "fake_gpu_cluster", "cluster", "head"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with pytest's own exit status once every result is reported, skipping interpreter
    teardown: a CI run that had printed its summary died there with SIGSEGV (in the libraries'
    shutdown, after every Ray cluster of the session was already shut down), and a crash after the
    results must not change them. ``make test`` runs Python with ``-X faulthandler``, so a crash
    during the tests themselves still prints its traceback."""
    import sys

    if _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[0])
