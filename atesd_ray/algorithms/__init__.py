"""The algorithms, one module each.

Every module of this package that defines ``ALGORITHMS`` (instances of
:class:`~atesd_ray.algorithms.base.Algorithm`) registers them under their names, which
``algorithm.name`` (``conf/algorithm/<name>.yaml``) selects. Adding an algorithm is adding its
module and its YAML file: the config schema takes its settings section from here, and the training
loop, the student and the checks reach it through :func:`get`.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atesd_ray.algorithms.base import Algorithm


@functools.cache
def registry() -> dict[str, Algorithm]:
    """Every algorithm by name, in module order."""
    found: dict[str, Algorithm] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for algorithm in getattr(module, "ALGORITHMS", ()):
            if algorithm.name in found:
                raise ValueError(f"algorithm '{algorithm.name}' is defined twice (second: {module.__name__})")
            found[algorithm.name] = algorithm
    return found


def get(name: str) -> Algorithm:
    return registry()[name]
