"""Data: the synthetic generator, the row validation, the JSONL/Parquet loaders and the splits."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atesd_ray.config import DataConfig, EvalSetConfig, SyntheticDataConfig
from atesd_ray.data import (
    DataError,
    Record,
    generate,
    holdout,
    load_data,
    load_eval_set,
    load_split,
    to_record,
    train_eval_split,
    verify_reference,
)

FINAL_LINE = re.compile(r"^The final answer is \\boxed\{(\d+(?:/\d+)?)\}\.$")
OPSD_COLUMNS = {"reference": "solution", "answer": "Answer"}


# --- synthetic generator -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth() -> list[Record]:
    return generate(600, seed=3)


def test_generate_is_deterministic_and_prefix_stable(synth: list[Record]) -> None:
    assert generate(600, seed=3) == synth
    assert generate(50, seed=3) == synth[:50]
    assert [r.problem for r in generate(50, seed=4)] != [r.problem for r in synth[:50]]
    assert [r.id for r in synth[:3]] == ["synth-3-0", "synth-3-1", "synth-3-2"]
    assert len({r.problem for r in synth}) == len(synth)


def test_generate_levels_and_paragraph_counts(synth: list[Record]) -> None:
    assert [r.difficulty for r in synth[:6]] == [1, 2, 3, 1, 2, 3]
    steps = {1: set(), 2: set(), 3: set()}
    for r in synth:
        paragraphs = r.reference.split("\n\n")
        assert FINAL_LINE.match(paragraphs[-1]), r.reference
        assert all(p.strip() and "\n" not in p for p in paragraphs)
        steps[r.difficulty].add(len(paragraphs) - 1)
    assert min(steps[1]) >= 2 and max(steps[1]) <= 3
    assert min(steps[2]) >= 3 and max(steps[2]) <= 5
    assert min(steps[3]) >= 4 and max(steps[3]) <= 7
    assert max(steps[1]) < max(steps[3])
    assert {r.difficulty for r in generate(9, seed=0, levels=[2])} == {2}


def test_generate_covers_all_templates_and_stays_short(synth: list[Record]) -> None:
    assert {r.source for r in synth} == {
        f"synthetic/{t}" for t in ("shopping", "work", "ages", "geometry", "fractions", "savings", "travel")
    }
    assert max(len(r.problem.split()) for r in synth) <= 60
    assert max(len(r.reference.split()) for r in synth) <= 150
    assert any("/" in r.answer for r in synth)  # some answers are fractions


def test_every_synthetic_answer_matches_its_reference(synth: list[Record]) -> None:
    for r in synth:
        boxed = FINAL_LINE.match(r.reference.rsplit("\n", 1)[-1])
        assert boxed and boxed.group(1) == r.answer
        value = Fraction(r.answer)
        assert value > 0 and value.denominator <= 12
        verify_reference(r.reference, r.answer)  # every equation in the text holds and ends at the answer


def test_verify_reference_catches_bad_arithmetic() -> None:
    good = "Mia buys 3 × 4 = 12 pens.\n\nShe has 12 + 5 = 17 now.\n\nThe final answer is \\boxed{17}."
    verify_reference(good, "17")
    with pytest.raises(ValueError, match="wrong arithmetic: 12 \\+ 5 = 18"):
        verify_reference(good.replace("= 17", "= 18"), "18")
    with pytest.raises(ValueError, match="not the answer"):
        verify_reference(good.replace("{17}", "{16}"), "16")
    with pytest.raises(ValueError, match="boxes"):
        verify_reference(good, "17.0")
    verify_reference("It takes 2/3 ÷ 5/12 = 8/5 hours.\n\nThe final answer is \\boxed{8/5}.", "8/5")


def test_synthetic_train_eval_split_is_disjoint_and_eval_is_stable() -> None:
    train, evals = train_eval_split(200, 40, seed=9)
    assert len(train) == 200 and len(evals) == 40
    assert not {r.problem for r in train} & {r.problem for r in evals}
    assert not {r.id for r in train} & {r.id for r in evals}
    _, evals_again = train_eval_split(30, 40, seed=9)
    assert evals_again == evals


# --- row validation ------------------------------------------------------------------------------

ROW = {"problem": " What is 2+3? ", "solution": "2 plus 3.\n\nThe answer is \\boxed{5}.", "Answer": "5"}


def test_to_record_maps_columns_and_fills_defaults() -> None:
    r = to_record(ROW, OPSD_COLUMNS, "d.jsonl line 4", default_source="d.jsonl")
    assert r == Record(
        id="d.jsonl line 4",
        problem="What is 2+3?",
        reference=ROW["solution"],
        answer="5",
        source="d.jsonl",
    )
    tagged = to_record(
        {**ROW, "source": "amc", "id": "p7", "level": "3"}, {**OPSD_COLUMNS, "difficulty": "level"}, "x"
    )
    assert (tagged.id, tagged.source, tagged.difficulty) == ("p7", "amc", 3)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [(42, "42"), (3.0, "3"), (2.5, "2.5"), ("  7/2 ", "7/2")],
)
def test_to_record_converts_numeric_answers(answer: object, expected: str) -> None:
    assert to_record({**ROW, "Answer": answer}, OPSD_COLUMNS, "x").answer == expected


@pytest.mark.parametrize(
    ("change", "reason", "field"),
    [
        ({"Answer": True}, "not_string", "answer"),
        ({"Answer": [5]}, "not_string", "answer"),
        ({"Answer": float("nan")}, "empty", "answer"),
        ({"Answer": None}, "empty", "answer"),
        ({"problem": "   "}, "empty", "problem"),
        ({"problem": 12}, "not_string", "problem"),
        ({"solution": "\x0crac{1}{2}"}, "control_chars", "reference"),
        ({"level": "hard"}, "bad_difficulty", "difficulty"),
    ],
)
def test_to_record_rejects_bad_values(change: dict, reason: str, field: str) -> None:
    with pytest.raises(DataError) as err:
        to_record({**ROW, **change}, {**OPSD_COLUMNS, "difficulty": "level"}, "f.jsonl line 9")
    assert err.value.reason == reason
    assert str(err.value).startswith(f"f.jsonl line 9: field '{field}'")


def test_to_record_keeps_reference_verbatim_and_normalizes_crlf() -> None:
    r = to_record({**ROW, "solution": "  a\r\n\r\nb\t\n"}, OPSD_COLUMNS, "x")
    assert r.reference == "  a\n\nb\t\n"


# --- JSONL and Parquet loaders -------------------------------------------------------------------


def _write_jsonl(path: Path) -> Path:
    good = {"problem": "P1", "solution": "S1 \\boxed{1}", "Answer": "1"}
    lines = [
        json.dumps(good),  # line 1
        '{"problem": "P2", "solution": ',  # line 2: malformed
        "",  # blank lines are not rows
        json.dumps({"problem": "P4", "Answer": "4"}),  # line 4: no solution column
        json.dumps({"problem": "P5", "solution": "  \n ", "Answer": "5"}),  # line 5: empty reference
        json.dumps({"problem": "P6", "solution": "S6", "Answer": {"v": 6}}),  # line 6: answer not a string
        json.dumps({"problem": "P7", "solution": "S7 \\frac", "Answer": "7"}).replace("\\\\frac", "\\frac"),
        json.dumps({"problem": "P8", "solution": "S8", "Answer": 8}),  # line 8: int answer, kept
        "[1, 2]",  # line 9: not an object
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_skips_bad_rows_and_counts_them(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "train.jsonl")
    result = load_split("jsonl", str(path), columns=OPSD_COLUMNS, on_bad_row="skip")
    assert [(r.problem, r.answer, r.id) for r in result.records] == [
        ("P1", "1", f"{path} line 1"),
        ("P8", "8", f"{path} line 8"),
    ]
    assert result.rows == 8
    assert result.skipped == {
        "malformed_json": 1,
        "missing_column": 1,
        "empty": 1,
        "not_string": 1,
        "control_chars": 1,
        "not_object": 1,
    }
    assert result.n_skipped == 6


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"problem": "P2", "solution": ', r"malformed JSON"),
        ('{"problem": "P", "Answer": "4"}', r"field 'reference' \(column 'solution'\): column missing"),
        (
            '{"problem": "P", "solution": " \\n ", "Answer": "5"}',
            r"field 'reference' \(column 'solution'\): is empty",
        ),
        (
            '{"problem": "P", "solution": "S", "Answer": {"v": 6}}',
            r"field 'answer' \(column 'Answer'\): expected a string, got dict",
        ),
        (
            '{"problem": "P", "solution": "S \\frac", "Answer": "7"}',
            r"field 'reference' \(column 'solution'\): control character '\\x0c'",
        ),
    ],
)
def test_jsonl_fail_names_file_line_and_field(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "train.jsonl"
    good = json.dumps({"problem": "P1", "solution": "S1", "Answer": "1"})
    path.write_text(f"{good}\n{bad_line}\n{good}\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} line 2: {message}"):
        load_split("jsonl", str(path), columns=OPSD_COLUMNS, on_bad_row="fail")


def test_jsonl_max_rows_and_no_usable_rows(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "train.jsonl")
    assert load_split("jsonl", str(path), columns=OPSD_COLUMNS, max_rows=1).rows == 1
    with pytest.raises(DataError, match=r"no usable rows \(8 read\).*missing_column': 6"):
        load_split("jsonl", str(path))  # unmapped columns: every row lacks 'reference'


def test_parquet_round_trip(tmp_path: Path) -> None:
    records = generate(12, seed=5)
    table = pa.table(
        {
            "uid": [r.id for r in records],
            "problem": [r.problem for r in records],
            "solution": [r.reference for r in records],
            "Answer": [r.answer for r in records],
            "source": [r.source for r in records],
            "difficulty": [r.difficulty for r in records],
        }
    )
    path = tmp_path / "train.parquet"
    pq.write_table(table, path, row_group_size=5)
    result = load_split("parquet", str(path), columns={**OPSD_COLUMNS, "id": "uid"}, on_bad_row="fail")
    assert result.records == records
    assert result.rows == 12 and result.skipped == {}


def test_parquet_missing_column_fails_up_front_even_when_skipping(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"problem": ["p"], "solution": ["s"]}), path)
    with pytest.raises(DataError, match=r"t\.parquet: column 'Answer' \(field 'answer'\) not found"):
        load_split("parquet", str(path), columns=OPSD_COLUMNS, on_bad_row="skip")


def test_parquet_bad_row_is_reported_with_its_row(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"problem": ["p0", "p1"], "solution": ["s0", ""], "Answer": [1, 2]}), path)
    with pytest.raises(DataError, match=r"t\.parquet row 1: field 'reference'"):
        load_split("parquet", str(path), columns=OPSD_COLUMNS, on_bad_row="fail")


# --- load_data / load_eval_set -------------------------------------------------------------------


def test_load_data_synthetic_matches_the_synthetic_eval_set() -> None:
    syn = SyntheticDataConfig(n_train=40, n_eval=10, seed=11)
    train, evals, report = load_data(DataConfig(synthetic=syn), seed=1)
    assert (len(train), len(evals), report.eval_from) == (40, 10, "synthetic")
    assert not {r.problem for r in train} & {r.problem for r in evals}
    assert load_eval_set(EvalSetConfig(), synthetic=syn).records == evals
    assert load_eval_set(EvalSetConfig(), synthetic=syn, max_problems=3).records == evals[:3]
    shuffled, _, _ = load_data(DataConfig(synthetic=syn), seed=2)
    assert shuffled != train and sorted(shuffled, key=lambda r: r.id) == sorted(train, key=lambda r: r.id)


def test_holdout_is_deterministic_disjoint_and_keeps_duplicates_together() -> None:
    records = generate(40, seed=1)
    copies = [Record(f"dup-{i}", records[0].problem.upper(), "r", "1", "s") for i in range(3)]
    data = records + copies
    train, held = holdout(data, 0.25, seed=7)
    assert holdout(data, 0.25, seed=7) == (train, held)
    assert len(held) >= round(0.25 * len(data)) and len(train) + len(held) == len(data)
    assert not {r.problem.lower() for r in train} & {r.problem.lower() for r in held}
    assert holdout(data, 0.0, seed=7) == (data, [])


def test_load_data_local_with_holdout_and_eval_split(tmp_path: Path) -> None:
    records = generate(30, seed=2)
    rows = [{"problem": r.problem, "solution": r.reference, "Answer": r.answer} for r in records]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:5]))
    cfg = DataConfig(
        source="jsonl", path=str(tmp_path), columns=OPSD_COLUMNS, eval_fraction=0.2, shuffle=False
    )
    train, evals, report = load_data(cfg, seed=0)
    assert (len(train), len(evals), report.eval_from) == (24, 6, "holdout 0.2")
    assert not {r.problem for r in train} & {r.problem for r in evals}

    cfg.eval_split = "test"
    train, evals, report = load_data(cfg, seed=0)
    assert [r.problem for r in evals] == [r.problem for r in records[:5]]
    assert [r.problem for r in train] == [r.problem for r in records[5:]]
    assert report.overlap_removed == 5 and report.rows_read == {"train": 30, "test": 5}
    assert "25 train, 5 eval (split test)" in report.summary()


def test_load_eval_set_needs_no_reference(tmp_path: Path) -> None:
    path = tmp_path / "aime.jsonl"
    path.write_text(json.dumps({"id": 60, "problem": "Find x.", "answer": 204}) + "\n")
    result = load_eval_set(EvalSetConfig(name="aime", source="jsonl", path=str(path)))
    assert result.records == [Record("60", "Find x.", "", "204", str(path))]
