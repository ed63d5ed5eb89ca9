"""The algorithms, one module each.

Every module of this package that defines ``ALGORITHMS`` (instances of
:class:`~atesd_ray.algorithms.base.Algorithm`) registers them under their names, which
``algorithm.name`` (``conf/algorithm/<name>.yaml``) selects. Adding an algorithm is adding its
module and its YAML file, plus its settings section in ``atesd_ray/config/algorithm.py`` if it
has settings of its own; the training loop, the student and the checks reach it through
:func:`get`, and :func:`check` runs its rules about the config.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import TYPE_CHECKING

from atesd_ray.config import ConfigError
from atesd_ray.schema import require

if TYPE_CHECKING:
    from atesd_ray.algorithms.base import Algorithm
    from atesd_ray.assembly import Actors
    from atesd_ray.config import Config


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


def check(cfg: Config) -> Config:
    """The chosen algorithm's rules about the config (its ``check``), on top of the config's own;
    every mode that runs an algorithm calls this before any actor starts. Returns ``cfg``."""
    algorithms = registry()
    name = cfg.algorithm.name
    if name not in algorithms:
        raise ConfigError(
            f"config error at 'algorithm.name': got {name!r}; allowed values: {', '.join(algorithms)}"
        )
    if cfg.mode == "motab_synthesize" and not algorithms[name].stepwise:
        stepwise = [n for n, a in algorithms.items() if a.stepwise]
        raise ConfigError(f"config error at 'algorithm': got {name!r}; allowed values: {', '.join(stepwise)}")
    teacher = cfg.teacher
    if not algorithms[name].distills_targets:
        require(
            teacher.signal.plain and teacher.context == "reference",
            "teacher.signal" if not teacher.signal.plain else "teacher.context",
            f"algorithm={name} distills no teacher targets on the student's tokens, so teacher.context and "
            "teacher.signal would not change it: leave them at their defaults",
        )
    require(
        not teacher.routes or algorithms[name].routes_teachers,
        "teacher.routes",
        f"algorithm={name} does not route problems to teachers; teacher.routes is for "
        f"{', '.join(n for n, a in algorithms.items() if a.routes_teachers)}",
    )
    algorithms[name].check(cfg)
    return cfg


def build_actors(
    cfg: Config,
    total_steps: int,
    name: str,
    timeline_path: str | None = None,
    run: str = "",
    signals: frozenset[str] | None = None,
) -> Actors:
    """The actors of a run of ``cfg``'s algorithm (``assembly.assemble``): its objective built for
    ``signals``, what a step must measure besides the algorithm's own statistics (default: what the
    exposure controller declares it needs)."""
    from atesd_ray.assembly import assemble
    from controller.actor import needed_signals

    signals = needed_signals(cfg) if signals is None else signals
    objective = get(cfg.algorithm.name).objective(cfg, signals)
    return assemble(cfg, objective, signals, total_steps, name, timeline_path, run)
