"""What every worker actor shares: process setup, and applying a step's change once."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from atesd_ray.config import Config, RoleResources
from atesd_ray.console import configure_actor
from atesd_ray.models import set_torch_threads
from atesd_ray.runtime.devices import actor_device, threads


def setup_actor(cfg: Config, res: RoleResources, name: str) -> tuple[int, torch.device]:
    """Logging and threads for an actor process (``runtime/devices.py``: as many as it reserved);
    returns its torch thread count and the device of its models."""
    configure_actor(name)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return set_torch_threads(threads(cfg, res)), actor_device(res, name)


def once_per_step(method: Callable) -> Callable:
    """For actor methods ``method(self, step, ...)`` that change state: a second call for the step
    last applied (a retried step) returns the first call's result instead of applying it again."""

    @functools.wraps(method)
    def wrapper(self, step: int, *args, **kwargs):
        done = self.__dict__.setdefault("_applied_steps", {})
        if method.__name__ in done and done[method.__name__][0] == step:
            return done[method.__name__][1]
        result = method(self, step, *args, **kwargs)
        done[method.__name__] = (step, result)
        return result

    return wrapper
