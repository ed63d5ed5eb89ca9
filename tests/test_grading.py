"""Grading against real math-verify: extraction, equivalence, time limits, and metrics."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from atesd_ray import grading
from atesd_ray.evaluation import (
    average_at_k,
    average_interval,
    maj_at_k,
    majority_answer,
    mean_pass_at_k,
    pass_at_k,
    summarize,
)
from atesd_ray.grading import HARD_GRACE_S, Grade, answers_match, extract_boxed, grade, grade_many

TIMEOUT_S = 1.0
# the hard deadline plus slack for a busy machine: a liveness bound (an unbounded grader would hang),
# not a speed target; the helper's kill at its deadline is asserted directly where it applies
BOUND_S = TIMEOUT_S + HARD_GRACE_S + 10.0


@pytest.fixture(scope="module", autouse=True)
def warm_helper():
    """Start a helper up front so the timed calls do not include its one-off start-up."""
    answers_match(r"\frac{1}{3}", "0.25", 5.0)
    yield
    grading.shutdown_helpers()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so $\boxed{\frac{a}{\sqrt{b^{2}}}}$.", r"\frac{a}{\sqrt{b^{2}}}"),
        (r"try \boxed{1}, then \boxed{2}", "2"),
        (r"first \boxed 3, then \boxed{5}", "5"),
        (r"\boxed{5} but finally \boxed 7.", "7."),
        (r"\boxed {5}", "5"),
        (r"so \fbox{7}", "7"),
        (r"$\boxed{\{1, 2\}}$", r"\{1, 2\}"),
        (r"\boxed{1} and a truncated \boxed{\frac{2}", None),
        (r"\boxed{ }", None),
        ("The answer is 42.", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        (r"\frac{1}{2}", "0.5"),
        ("0.5", r"\frac{1}{2}"),
        ("42", "42.0"),
        (r"\dfrac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"10^\circ", "10"),
        (r"\text{(C)}", "C"),
        (r"$\frac{a}{\sqrt{b^{2}}}$", r"\frac{a}{|b|}"),
    ],
)
def test_equivalent_answers_match(pred: str, gold: str):
    assert answers_match(pred, gold, 5.0)


@pytest.mark.parametrize(
    ("pred", "gold"), [("41", "42"), (r"\frac{1}{3}", "0.5"), ("(2,1)", "(1,2)"), ("", "0")]
)
def test_different_answers_do_not_match(pred: str, gold: str):
    assert not answers_match(pred, gold, 5.0)


def test_grade():
    assert grade(r"so the answer is $\boxed{\frac{1}{2}}$.", "0.5") == Grade(r"\frac{1}{2}", True)
    assert grade(r"\boxed{42}", "42.0") == Grade("42", True)
    assert grade(r"first \boxed{42}, on reflection \boxed{41}", "42") == Grade("41", False)
    assert grade("The answer is 42.", "42") == Grade(None, False)


def test_grade_many_agrees_with_grade():
    responses = [r"\boxed{0.5}", r"\boxed{3}", "no answer", r"\boxed{\frac{6}{4}}"]
    golds = [r"\frac{1}{2}", "4", "1", "1.5"]
    assert grade_many(responses, golds, 5.0, workers=2) == [
        grade(r, g) for r, g in zip(responses, golds, strict=True)
    ]
    with pytest.raises(ValueError):
        grade_many(responses, golds[:2])


PATHOLOGICAL = {
    "power tower": r"9^{9^{9^{9^{9}}}}",
    "deep nesting": r"\frac{1}{" * 300 + "2" + "}" * 300,
    "100k chars": "1+" * 50_000 + "1",
}


def _in_worker_thread(fn: Callable[[], bool]) -> bool:
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


@pytest.mark.parametrize("in_thread", [False, True], ids=["main thread", "worker thread"])
@pytest.mark.parametrize("pred", PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
def test_pathological_input_is_bounded(pred: str, in_thread: bool):
    gold = "2" if in_thread else "1"  # a different pair per case, so no cached verdict is reused

    def call() -> bool:
        return answers_match(pred, gold, TIMEOUT_S)

    start = time.monotonic()
    matched = _in_worker_thread(call) if in_thread else call()
    assert not matched
    assert time.monotonic() - start < BOUND_S


def test_unresponsive_helper_is_killed_at_the_hard_deadline():
    answers_match(r"\frac{2}{7}", "0.25", 5.0)  # leaves an idle helper, the next one handed out
    frozen = grading._idle_helpers[-1]
    os.kill(frozen._proc.pid, signal.SIGSTOP)  # stuck beyond the reach of its own timer
    start = time.monotonic()
    assert not answers_match(r"\frac{3}{7}", "0.5", TIMEOUT_S)
    assert time.monotonic() - start < BOUND_S
    assert not frozen.alive()
    assert answers_match(r"\frac{2}{4}", "0.5", 5.0)  # a fresh helper takes over


def test_average_at_k():
    assert average_at_k([[True, False, False, True], [True, True, True, True]]) == 0.75
    assert average_at_k([[False], [True, True, False, False]]) == 0.25  # per problem, then averaged


def test_pass_at_k():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # every pair holds a correct sample
    assert mean_pass_at_k([[True, True, False, False, False], [False] * 5], 2) == pytest.approx(0.35)
    for n, c, k in [(5, 6, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_majority_vote():
    # "1/2" and "\frac{1}{2}" form one group, tying with "3"; the group seen first wins.
    assert majority_answer(["1/2", "3", r"\frac{1}{2}", "3", None]) == "1/2"
    assert majority_answer([None, "8", "7", "8"]) == "8"
    assert majority_answer([None, None]) is None
    answers = [["1/2", "3", r"\frac{1}{2}", "3", None], [None, None], ["7", "8", "8"]]
    assert maj_at_k(answers, ["0.5", "1", "7"]) == pytest.approx(1 / 3)


def test_summarize():
    grades = [
        [Grade("1/2", True), Grade("3", False), Grade(r"\frac{1}{2}", True)],
        [Grade("7", False), Grade(None, False), Grade("7", False)],
    ]
    assert summarize(grades, ["0.5", "6"]) == {
        "n_problems": 2,
        "n_samples": 6,
        "k": 3,
        "avg@3": pytest.approx(1 / 3),
        # Wilson's interval for p = 1/3 over 2 problems
        "avg@3_ci95": [pytest.approx(0.0453, abs=1e-4), pytest.approx(0.8406, abs=1e-4)],
        "pass@1": pytest.approx(1 / 3),
        "pass@2": pytest.approx(0.5),
        "pass@3": 0.5,
        "maj@3": 0.5,
    }
    with pytest.raises(ValueError):
        summarize([[Grade("1", True)], []], ["1", "2"])


def test_one_sample_per_problem_gets_wilsons_interval():
    # 0 of 128 right: Wilson's upper end z^2 / (n + z^2), not the empty interval [0, 0]
    low, high = average_interval([[False]] * 128)
    assert low == 0.0 and high == pytest.approx(1.96**2 / (128 + 1.96**2))
    low, high = average_interval([[True]] * 70 + [[False]] * 30)
    assert low == pytest.approx(0.6042, abs=1e-4) and high == pytest.approx(0.7810, abs=1e-4)
