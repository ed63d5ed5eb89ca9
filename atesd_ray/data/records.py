"""The one record schema every data source is mapped to, and the row validation behind it.

Decisions (each checked in ``tests/test_data.py``):

- ``problem``, ``reference`` and ``answer`` are required. A missing column, a null value, or a
  value that is empty or whitespace-only makes the row bad. Eval sets may go without a reference
  (``require_reference=False``): most benchmark sets (AIME, HMMT) ship none, and grading needs none.
- ``problem`` and ``reference`` must be strings. ``answer`` may also be an ``int`` or a finite
  ``float``: benchmark sets often store integer answers as numbers, and parquet turns an integer
  column with a null into floats. Ints become ``str(x)``; integral floats become ``str(int(x))``
  (``3.0`` -> ``"3"``) so they compare equal to the reference's ``\\boxed{3}``; other floats become
  ``str(x)``. Booleans, NaN/inf, lists and dicts are rejected.
- Control characters (Unicode category Cc) other than ``\\n`` and ``\\t`` are **rejected**, not
  stripped: in math data they are nearly always LaTeX whose backslash was eaten by a JSON escape
  (``"\\frac"`` written unescaped in JSON reads back as form feed + ``rac``), and stripping would
  silently turn ``\\frac12`` into ``rac12``. ``\\r\\n`` is normalized to ``\\n`` first.
- ``problem`` and ``answer`` are stripped of surrounding whitespace; ``reference`` is kept verbatim
  so that exposure alpha = 1 hands the teacher exactly the source's text.
- ``id`` comes from the id column when present and non-empty (numbers converted as for ``answer``),
  else it is ``where`` (unique per row).
- ``source`` comes from the source column when present and non-empty, else ``default_source``.
- ``difficulty`` is optional: an int, an integral float or a string of digits; anything else is bad.

Every error message starts with ``where`` (``<file or dataset> line|row <n>``) and names the field
and the column it was read from.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FIELDS = ("id", "problem", "reference", "answer", "source", "difficulty")
REQUIRED = ("problem", "reference", "answer")


class DataError(ValueError):
    """Bad data; ``reason`` is a short code used to count skipped rows (``empty``, ``malformed_json``, ...)."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Record:
    id: str
    problem: str
    reference: str
    answer: str
    source: str
    difficulty: int | None = None


def column_for(field: str, columns: Mapping[str, str]) -> str:
    """The source column that holds ``field`` (the field's own name unless ``columns`` maps it)."""
    return columns.get(field, field)


def check_mapping(columns: Mapping[str, str], where: str) -> None:
    """Reject a column mapping whose keys are not record fields (a typo would silently map nothing)."""
    unknown = set(columns) - set(FIELDS)
    if unknown:
        raise DataError(
            f"{where}: unknown record field(s) {sorted(unknown)} in the column mapping; fields are {FIELDS}"
        )


def to_record(
    raw: Mapping[str, Any],
    columns: Mapping[str, str],
    where: str,
    *,
    default_source: str = "unknown",
    require_reference: bool = True,
) -> Record:
    """Map one source row to a :class:`Record`; raises :class:`DataError` naming ``where`` and the field."""
    check_mapping(columns, where)
    row = _Row(raw, columns, where)
    return Record(
        id=row.text("id", required=False) or where,
        problem=row.text("problem", required=True),
        reference=row.text("reference", required=require_reference),
        answer=row.text("answer", required=True),
        source=row.text("source", required=False) or default_source,
        difficulty=row.difficulty(),
    )


class _Row:
    def __init__(self, raw: Mapping[str, Any], columns: Mapping[str, str], where: str) -> None:
        self.raw, self.columns, self.where = raw, columns, where

    def error(self, field: str, what: str, reason: str) -> DataError:
        col = column_for(field, self.columns)
        return DataError(f"{self.where}: field '{field}' (column '{col}'): {what}", reason)

    def text(self, field: str, required: bool) -> str:
        """The field's checked text; ``""`` for an optional field that is absent, null or blank."""
        col = column_for(field, self.columns)
        if col not in self.raw:
            if required:
                available = ", ".join(sorted(map(str, self.raw))) or "none"
                raise self.error(field, f"column missing (row has: {available})", "missing_column")
            return ""
        value = self.raw[col]
        if field in ("answer", "id"):
            value = self._number_to_text(field, value)
        if value is None:
            if required:
                raise self.error(field, "is null", "empty")
            return ""
        if not isinstance(value, str):
            raise self.error(
                field, f"expected a string, got {type(value).__name__} {value!r:.60}", "not_string"
            )
        value = value.replace("\r\n", "\n")
        bad = next((c for c in value if c not in "\n\t" and unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            hint = " (an unescaped LaTeX backslash in JSON?)" if bad in "\b\f\r" else ""
            raise self.error(
                field, f"control character {bad!r} at offset {value.index(bad)}{hint}", "control_chars"
            )
        if not value.strip():
            if required:
                raise self.error(field, "is empty or whitespace-only", "empty")
            return ""
        return value if field == "reference" else value.strip()

    def _number_to_text(self, field: str, value: Any) -> Any:
        """An int or float answer or id as a string (see the module docstring); other values pass through."""
        if isinstance(value, bool):
            raise self.error(field, f"expected a string or a number, got bool {value!r}", "not_string")
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            if not math.isfinite(value):
                raise self.error(field, f"is {value!r}", "empty")
            return str(int(value)) if value.is_integer() else str(value)
        return value

    def difficulty(self) -> int | None:
        value = self.raw.get(column_for("difficulty", self.columns))
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().isdigit():
            return int(value.strip())
        raise self.error("difficulty", f"expected an integer, got {value!r:.60}", "bad_difficulty")
