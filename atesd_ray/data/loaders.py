"""Load training and eval data from the hub, local JSONL or Parquet, or the built-in generator.

All sources share one row mapping (:func:`atesd_ray.data.records.to_record`), so the hub path,
which cannot run without network, behaves exactly like the local-file paths the tests exercise.

Bad rows: with ``on_bad_row="skip"`` a bad row is skipped and counted by reason (``LoadResult.skipped``),
the first few logged with their file and line;
with ``"fail"`` the first bad row raises :class:`DataError` naming the file, the line (JSONL, 1-based,
as an editor shows it) or row (Parquet and hub, 0-based, as ``ds[i]``), and the field. A column that the
whole table lacks (Parquet, hub) is a configuration error and raises under either policy, as does a
source that yields no usable row at all.

Local paths: a file is the split itself; a directory holds one file per split, ``<split>.jsonl`` or
``<split>.parquet``, which is how ``eval_split`` works for local data.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atesd_ray.config import DataConfig, EvalSetConfig, SyntheticDataConfig
from atesd_ray.data.records import REQUIRED, DataError, Record, check_mapping, column_for, to_record
from atesd_ray.data.synthetic import train_eval_split

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}
SHOWN_SKIPS = 5  # skipped rows named one by one (file and line) before the rest are only counted

# One source row: where it is (for messages and ids), and the row or the reason it could not be read.
Row = tuple[str, Mapping[str, Any] | DataError]


@dataclass
class LoadResult:
    records: list[Record]
    name: str  # the file or dataset, as given
    rows: int = 0  # rows read, bad ones included
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass
class DataReport:
    """What :func:`load_data` did, for the run log."""

    source: str
    path: str | None
    n_train: int
    n_eval: int
    eval_from: str  # "synthetic", "split <name>", "holdout <fraction>" or "none"
    rows_read: dict[str, int] = field(default_factory=dict)  # per split
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> reason -> count
    overlap_removed: int = 0  # train rows dropped because their problem is in the eval set

    def summary(self) -> str:
        skipped = "; ".join(f"{split}: {dict(reasons)}" for split, reasons in self.skipped.items() if reasons)
        return (
            f"data {self.source}{f' {self.path}' if self.path else ''}: {self.n_train} train, "
            f"{self.n_eval} eval ({self.eval_from})"
            + (f", skipped {skipped}" if skipped else "")
            + (
                f", {self.overlap_removed} train rows dropped as eval duplicates"
                if self.overlap_removed
                else ""
            )
        )


def load_split(
    source: str,
    path: str,
    split: str = "train",
    subset: str | None = None,
    columns: Mapping[str, str] | None = None,
    on_bad_row: str = "skip",
    max_rows: int | None = None,
    *,
    require_reference: bool = True,
) -> LoadResult:
    """Read one split of a hub dataset, JSONL or Parquet source; ``max_rows`` caps the rows read."""
    if on_bad_row not in ("skip", "fail"):
        raise ValueError(f"on_bad_row must be 'skip' or 'fail', got {on_bad_row!r}")
    columns = dict(columns or {})
    check_mapping(columns, path)
    required = [f for f in REQUIRED if f != "reference" or require_reference]
    if source == "hub":
        name, rows = _hub_rows(path, subset, split, columns, required)
    elif source in LOCAL_SUFFIXES:
        file = _local_file(source, path, split)
        name = str(file)
        rows = _jsonl_rows(file) if source == "jsonl" else _parquet_rows(file, columns, required)
    else:
        raise DataError(f"unknown data source {source!r}; load_split reads hub, jsonl or parquet")

    result = LoadResult(records=[], name=name)
    skipped: Counter[str] = Counter()
    seen_ids: set[str] = set()
    first_error = ""
    for where, row in itertools.islice(rows, max_rows):
        result.rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            record = to_record(row, columns, where, default_source=name, require_reference=require_reference)
            if record.id in seen_ids:
                raise DataError(
                    f"{where}: field 'id' (column '{column_for('id', columns)}'): duplicate id {record.id!r}",
                    "duplicate_id",
                )
        except DataError as e:
            if on_bad_row == "fail":
                raise
            skipped[e.reason] += 1
            first_error = first_error or str(e)
            if sum(skipped.values()) <= SHOWN_SKIPS:
                log.warning("skipped (data.on_bad_row=skip): %s", e)
            continue
        seen_ids.add(record.id)
        result.records.append(record)
    result.skipped = dict(skipped)
    if sum(skipped.values()) > SHOWN_SKIPS:
        log.warning(
            "%s: %d more rows skipped (%d in all: %s); data.on_bad_row=fail stops at the first",
            name,
            sum(skipped.values()) - SHOWN_SKIPS,
            sum(skipped.values()),
            dict(skipped),
        )
    if not result.records:
        detail = f"; skipped {dict(skipped)}, first: {first_error}" if skipped else ""
        raise DataError(f"{name}: no usable rows ({result.rows} read){detail}", "empty_source")
    return result


def _local_file(source: str, path: str, split: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        for suffix in LOCAL_SUFFIXES[source]:
            if (p / f"{split}{suffix}").is_file():
                return p / f"{split}{suffix}"
        raise DataError(
            f"{path}: no {split}{'/'.join(LOCAL_SUFFIXES[source])} file for split {split!r}", "missing_file"
        )
    if not p.is_file():
        raise DataError(f"{path}: no such {source} file or directory", "missing_file")
    return p


def _jsonl_rows(file: Path) -> Iterator[Row]:
    """Rows of a JSONL file; blank lines are not rows. Lines are decoded one by one, so one bad
    line (broken JSON, bad UTF-8, not an object) costs that row only."""
    with file.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{file} line {lineno}"
            try:
                text = raw.decode("utf-8").rstrip("\r\n")  # positions within the line, its end included
                row = json.loads(text)
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})", "bad_encoding")
                continue
            except json.JSONDecodeError as e:
                ends = e.pos >= len(text) or e.msg.startswith("Unterminated")
                cut = "; the line ends before the JSON does: cut short?" if ends else ""
                yield (
                    where,
                    DataError(
                        f"{where}: malformed JSON: {e.msg} (column {e.pos + 1} of {len(text)}{cut})",
                        "malformed_json",
                    ),
                )
                continue
            if not isinstance(row, dict):
                yield (
                    where,
                    DataError(f"{where}: expected a JSON object, got {type(row).__name__}", "not_object"),
                )
                continue
            yield where, row


def _check_columns(
    name: str, available: Iterable[str], columns: Mapping[str, str], required: list[str]
) -> None:
    available = list(available)
    missing = [
        f"'{column_for(f, columns)}' (field '{f}')"
        for f in required
        if column_for(f, columns) not in available
    ]
    if missing:
        raise DataError(
            f"{name}: column {', '.join(missing)} not found; columns are {available}. "
            "Map record fields to source columns with data.columns (e.g. {reference: solution}).",
            "missing_column",
        )


def _parquet_rows(file: Path, columns: Mapping[str, str], required: list[str]) -> Iterator[Row]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(file)
    _check_columns(str(file), table.schema_arrow.names, columns, required)
    wanted = sorted(
        {column_for(f, columns) for f in ("id", "problem", "reference", "answer", "source", "difficulty")}
    )
    present = [c for c in wanted if c in table.schema_arrow.names]
    i = 0
    for batch in table.iter_batches(columns=present, batch_size=1024):
        for row in batch.to_pylist():
            yield f"{file} row {i}", row
            i += 1


def _hub_rows(
    path: str, subset: str | None, split: str, columns: Mapping[str, str], required: list[str]
) -> tuple[str, Iterator[Row]]:
    import datasets

    name = f"{path}{f'/{subset}' if subset else ''}[{split}]"
    try:
        ds = datasets.load_dataset(path, subset, split=split)
    except Exception as e:  # the hub raises many types; the user needs the dataset name with any of them
        raise DataError(f"{name}: could not load the dataset: {type(e).__name__}: {e}", "load_failed") from e
    _check_columns(name, ds.column_names, columns, required)
    return name, ((f"{name} row {i}", row) for i, row in enumerate(ds))


def _problem_key(problem: str) -> str:
    """Problems that differ only in case and whitespace count as the same problem."""
    return re.sub(r"\s+", " ", problem).strip().lower()


def holdout(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Split off about ``fraction`` of the records (at least one, leaving at least one) as an eval set.

    Records are grouped by problem text, so copies of one problem land on the same side. Both sides
    keep the source order.
    """
    if fraction <= 0:
        return list(records), []
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(_problem_key(r.problem), []).append(i)
    keys = list(groups)
    if len(keys) < 2:
        raise DataError(f"cannot hold out an eval set from {len(keys)} distinct problem(s)", "too_small")
    random.Random(seed).shuffle(keys)
    target = min(max(1, round(fraction * len(records))), len(records) - 1)
    eval_idx: set[int] = set()
    for key in keys[:-1]:  # the last group always stays in train
        if len(eval_idx) >= target:
            break
        eval_idx.update(groups[key])
    train = [r for i, r in enumerate(records) if i not in eval_idx]
    held = [r for i, r in enumerate(records) if i in eval_idx]
    return train, held


def load_data(cfg: DataConfig, seed: int) -> tuple[list[Record], list[Record], DataReport]:
    """The training records (shuffled with ``seed`` when ``cfg.shuffle``), the eval records in source
    order, and a report. No eval problem appears in the training set."""
    if cfg.source == "synthetic":
        syn = cfg.synthetic
        train, evals = train_eval_split(syn.n_train, syn.n_eval, syn.seed, syn.levels)
        report = DataReport("synthetic", None, len(train), len(evals), "synthetic")
    else:
        assert cfg.path is not None  # DataConfig.validate requires it
        main = load_split(
            cfg.source, cfg.path, cfg.split, cfg.subset, cfg.columns, cfg.on_bad_row, cfg.max_rows
        )
        report = DataReport(
            cfg.source, cfg.path, 0, 0, "none", {cfg.split: main.rows}, {cfg.split: main.skipped}
        )
        if cfg.eval_split:
            held = load_split(
                cfg.source, cfg.path, cfg.eval_split, cfg.subset, cfg.columns, cfg.on_bad_row, cfg.max_rows
            )
            evals = held.records
            eval_keys = {_problem_key(r.problem) for r in evals}
            train = [r for r in main.records if _problem_key(r.problem) not in eval_keys]
            report.eval_from = f"split {cfg.eval_split}"
            report.rows_read[cfg.eval_split] = held.rows
            report.skipped[cfg.eval_split] = held.skipped
            report.overlap_removed = len(main.records) - len(train)
            if not train:
                raise DataError(
                    f"{main.name}: every training problem is also in split {cfg.eval_split!r}", "empty_source"
                )
        else:
            train, evals = holdout(main.records, cfg.eval_fraction, seed)
            report.eval_from = f"holdout {cfg.eval_fraction}" if evals else "none"
        report.n_train, report.n_eval = len(train), len(evals)
    if cfg.shuffle:
        train = list(train)
        random.Random(seed).shuffle(train)
    return train, evals, report


def load_eval_set(
    cfg: EvalSetConfig,
    synthetic: SyntheticDataConfig | None = None,
    max_problems: int | None = None,
    on_bad_row: str = "skip",
) -> LoadResult:
    """One eval set, in source order, cut to its first ``max_problems`` usable problems.

    ``source=synthetic`` gives the eval split of the synthetic data described by ``synthetic``
    (the one :func:`load_data` holds out from training). Other sources need no reference column.
    """
    if cfg.source == "synthetic":
        syn = synthetic or SyntheticDataConfig()
        _, records = train_eval_split(syn.n_train, syn.n_eval, syn.seed, syn.levels)
        result = LoadResult(records=records, name=f"synthetic seed {syn.seed}", rows=len(records))
    else:
        assert cfg.path is not None  # EvalSetConfig.validate requires it
        result = load_split(
            cfg.source, cfg.path, cfg.split, cfg.subset, cfg.columns, on_bad_row, require_reference=False
        )
    if max_problems is not None:
        result.records = result.records[:max_problems]
    return result
