"""Declarative config checks.

A config section is a dataclass deriving from :class:`Section` whose fields say what they allow::

    temperature: float = setting(1.1, positive)
    kind: str = setting("jsd", one_of("jsd", "topk", "sampled_token"))

:meth:`Section.validate` runs those checks with key names made from where the section sits in the
tree (``algorithm.loss.temperature``), recurses into sub-sections, then runs the section's own
rules between its fields (:meth:`Section.check`). Every error has one shape, ``config error at
'<key>': got <value>; <what is allowed>``; a mistyped key gets a "did you mean"
(``config.suggest_key``). A field set to None skips its checks (None means "not set").
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

# what a check returns for a bad value: the part of the message after "got <value>; "
Check = Callable[[Any], str | None]


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


def require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config error at '{key}': {msg}")


def one_of(*allowed: Any) -> Check:
    """The value is one of ``allowed``; a single callable argument gives them when checked."""

    def check(value: Any) -> str | None:
        values = tuple(allowed[0]()) if len(allowed) == 1 and callable(allowed[0]) else allowed
        return None if value in values else f"allowed values: {', '.join(map(str, values))}"

    return check


def between(lo: float, hi: float) -> Check:
    return lambda value: None if lo <= value <= hi else f"must be in [{lo}, {hi}]"


def positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


def at_least(n: float, why: str | None = None) -> Check:
    return lambda value: None if value >= n else (why or f"must be >= {n}")


def nonempty(why: str) -> Check:
    return lambda value: None if len(value) > 0 else why


def setting(default: Any = dataclasses.MISSING, *checks: Check, each: Iterable[Check] = ()):
    """A dataclass field with ``checks`` on its value and, for a list, ``each`` on every item. A
    list or dict default is copied for every instance; a class default (a sub-section) is built."""
    meta = {"checks": checks, "each": tuple(each)}
    if isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=meta)
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def subkey(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _apply(checks: Iterable[Check], value: Any, key: str) -> None:
    for check in checks:
        problem = check(value)
        require(problem is None, key, f"got {value!r}; {problem}")


class Section:
    """Base of every config section (see the module doc)."""

    def validate(self, key: str = "") -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value, k = getattr(self, f.name), subkey(key, f.name)
            if value is None:
                continue
            _apply(f.metadata.get("checks", ()), value, k)
            for item in value if f.metadata.get("each") else ():
                _apply(f.metadata["each"], item, k)
            if isinstance(value, Section):
                value.validate(k)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, Section):
                        item.validate(f"{k}[{i}]")
        self.check(key)

    def check(self, key: str) -> None:
        """Rules between this section's fields (``key``: where it sits in the tree)."""
