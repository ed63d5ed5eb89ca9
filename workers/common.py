"""What every worker actor shares: process setup, and applying a step's change once."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from atesd_ray.config import Config
from atesd_ray.console import configure_actor
from atesd_ray.models import set_torch_threads


def setup_actor(cfg: Config, role: str) -> int:
    """Logging and thread settings for an actor process; returns its torch thread count."""
    configure_actor(role)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = cfg.cluster.torch_threads or max(1, (os.cpu_count() or 1) // max(1, cfg.trainer.ranks))
    return set_torch_threads(threads)


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
