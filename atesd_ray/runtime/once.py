"""Applying a step's change once: a step retried after an actor fault asks the actors whose state
it changes (the student ranks, the exposure controller) again, and they answer with what they
already did (``atesd_ray/faults.py``)."""

from __future__ import annotations

import functools
from collections.abc import Callable


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
