"""What reaches the console (``logging.level``; ``--verbose`` is ``logging.level=debug``).

At ``info`` (the default) the driver prints its own lines (one per step, eval progress, the
summary) and the warnings and errors of the project's own loggers, from the driver and from every
actor; an actor's exception reaches the driver with its traceback as Ray raises it. Libraries
(transformers, vLLM, verl, torch's C++ side, Ray's own start-up notices) log errors only, and
progress bars inside actors are off. ``debug`` lets everything through, as the libraries set it.

Actors get the same settings as environment variables in their runtime env (:func:`actor_env_vars`),
so they hold before any library is imported in the actor's process, on every node.
"""

from __future__ import annotations

import logging
import os

LEVELS = ("debug", "info", "warning")
OWN_LOGGERS = ("atesd_ray", "workers", "controller", "bench")
# environment variables that quiet the libraries
QUIET = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "VERL_LOGGING_LEVEL": "ERROR",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "PYTHONWARNINGS": "ignore",
    "TOKENIZERS_PARALLELISM": "false",
}
ENV_LEVEL = "ATESD_LOG_LEVEL"

_level = os.environ.get(ENV_LEVEL, "info")


def level() -> str:
    return _level


def quiet() -> bool:
    return _level != "debug"


def actor_env_vars() -> dict[str, str]:
    """The environment an actor starts with: the console level, and in quiet mode the libraries'
    quiet settings and no progress bars."""
    env = {ENV_LEVEL: _level}
    if quiet():
        env.update(QUIET, TQDM_DISABLE="1")
    return env


def _configure_loggers(own_level: int) -> None:
    logging.getLogger().setLevel(logging.WARNING if quiet() else logging.DEBUG)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(own_level)
    if quiet():
        for name in ("ray", "transformers", "vllm", "verl", "torch", "urllib3", "filelock", "matplotlib"):
            logging.getLogger(name).setLevel(logging.ERROR)


def configure_driver(name: str) -> None:
    """The driver's console: set before the libraries are imported (their import-time notices obey)."""
    global _level
    if name not in LEVELS:
        raise ValueError(f"logging.level: got {name!r}; allowed values: {', '.join(LEVELS)}")
    _level = os.environ[ENV_LEVEL] = name
    if quiet():
        for key, value in QUIET.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # no "[repeated Nx across cluster]" notices
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _configure_loggers(getattr(logging, name.upper()))


def configure_actor(role: str) -> None:
    """An actor's logging: the project's warnings (its info lines too at ``debug``), prefixed by role."""
    logging.basicConfig(format=f"%(asctime)s {role} %(levelname)s %(message)s", force=True)
    _configure_loggers(logging.DEBUG if _level == "debug" else logging.WARNING)
