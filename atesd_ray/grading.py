"""Answer extraction and equivalence checking for math evaluation (DESIGN §3); the metrics over
k graded samples per problem (Average@k, pass@k, maj@k) are in ``evaluation.py``.

A response is graded by its last ``\\boxed{}`` answer, compared with the reference answer by
math-verify. math-verify bounds its own work with ``signal.alarm``, which only works in a
process's main thread, while grading here runs in Ray actors and thread pools; and a signal
cannot interrupt a long C-level computation (big-integer arithmetic) at all. So every
math-verify call runs in a persistent helper subprocess under two limits:

- soft: the helper arms ``setitimer`` for ``timeout_s`` around parse + verify (math-verify's own
  alarms are switched off, since they share that timer) and answers "no match" when it fires;
- hard: the caller waits at most ``timeout_s + HARD_GRACE_S`` for the reply, then kills the
  helper; the next call starts a fresh one.

Helpers are pooled, one per concurrently grading thread, so a call never waits for another
thread's slow input. A helper's start-up (about a second: importing sympy) is paid once per
helper and is not part of the per-call limit. Cheap cases (normalized strings equal, two
integers) never leave the calling process, and math-verify results are cached.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

logger = logging.getLogger(__name__)

HARD_GRACE_S = 0.5
"""Extra time the caller grants a helper past ``timeout_s`` before killing it."""

_STARTUP_TIMEOUT_S = 60.0

# ---------------------------------------------------------------------------------------------
# Extraction


# Greedy ".*" makes the match end right after the LAST box command.
_LAST_BOX_COMMAND = re.compile(r".*\\(?:boxed|fbox)(?![A-Za-z])\s*", re.DOTALL)
_BARE_TOKEN = re.compile(r"[^\s$]+")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed 5`` in ``text``.

    Returns None when there is no box, when the last box is never closed (a truncated
    response) or when it is empty. Escaped braces ``\\{ \\}`` do not count for nesting.

    Written here rather than reusing verl's ``last_boxed_only_string``/``remove_boxed``:
    math_reward's version switches to the brace-less form whenever ``"\\boxed "`` occurs anywhere
    (``"\\boxed 3 ... \\boxed{5}"`` gives ``"3 ... \\boxed{5}"``), keeps the rest of the line for
    that form, misreads ``"\\boxed {5}"`` and its ``remove_boxed`` asserts on ``\\fbox``;
    math_dapo's handles only ``\\boxed{``.
    """
    last = _LAST_BOX_COMMAND.match(text)
    if last is None:
        return None
    start = last.end()
    if not text.startswith("{", start):
        bare = _BARE_TOKEN.match(text, start)
        return bare.group() if bare else None
    depth = 0
    for i in range(start, len(text)):
        char = text[i]
        if char not in "{}" or text[i - 1] == "\\":
            continue
        depth += 1 if char == "{" else -1
        if depth == 0:
            return text[start + 1 : i].strip() or None
    return None


# ---------------------------------------------------------------------------------------------
# Equivalence


_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\s*\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?")
_SIZING = re.compile(r"\\(?:left|right|displaystyle)(?![A-Za-z])")
_SPACING = re.compile(r"\\[!,;: ]|\s+")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")


def _normalize(answer: str) -> str:
    """Canonical string form for the cheap equality test."""
    s = _TEXT_WRAPPER.sub(r"\1", answer)
    s = _DEGREES.sub("", s)
    s = _SIZING.sub("", s)
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SPACING.sub("", s)
    return s.removesuffix(".")


def _plain_number(s: str) -> Fraction | None:
    return Fraction(s) if _PLAIN_NUMBER.fullmatch(s) else None


def answers_match(pred: str, gold: str, timeout_s: float = 5.0) -> bool:
    """Whether ``pred`` is mathematically equivalent to ``gold``, decided within about ``timeout_s``.

    Normalized string equality (and numeric equality of plain numbers) answers first; two
    different integers are a definite mismatch; everything else goes to math-verify, where a
    timeout or an unparsable answer counts as no match. Works from any thread.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    p, g = _normalize(pred), _normalize(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    p_num, g_num = _plain_number(p), _plain_number(g)
    if p_num is not None and g_num is not None:
        if p_num == g_num:
            return True
        if p_num.denominator == 1 and g_num.denominator == 1:
            return False
    return _math_verify_match(pred, gold, timeout_s)


@functools.lru_cache(maxsize=1 << 16)
def _math_verify_match(pred: str, gold: str, timeout_s: float) -> bool:
    """math-verify's verdict from a pooled helper; cached, timeouts (no match) included."""
    helper = _checkout_helper()
    if helper is None:
        return False
    verdict = helper.ask(pred, gold, timeout_s)
    if verdict is None:
        logger.warning("math-verify helper gave no answer within %.1fs; restarting it", timeout_s)
        helper.close()
        return False
    with _pool_lock:
        _idle_helpers.append(helper)
    return verdict


class _Helper:
    """One math-verify subprocess speaking JSON lines: ``[pred, gold, timeout_s]`` -> ``1``/``0``."""

    def __init__(self) -> None:
        package_root = Path(__file__).resolve().parents[1]
        self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__],
            cwd=package_root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._buffer = b""
        if self._read_line(time.monotonic() + _STARTUP_TIMEOUT_S) != "ready":
            self.close()
            raise RuntimeError("math-verify helper process failed to start")

    def alive(self) -> bool:
        return self._proc.poll() is None

    def ask(self, pred: str, gold: str, timeout_s: float) -> bool | None:
        """The helper's verdict, or None when it missed the hard deadline or died."""
        deadline = time.monotonic() + timeout_s + HARD_GRACE_S
        try:
            self._proc.stdin.write((json.dumps([pred, gold, timeout_s]) + "\n").encode())
            self._proc.stdin.flush()
        except OSError:
            return None
        line = self._read_line(deadline)
        return None if line is None else line == "1"

    def _read_line(self, deadline: float) -> str | None:
        fd = self._proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()
        with contextlib.suppress(OSError):  # unflushed input to a dead process
            self._proc.stdin.close()
        self._proc.stdout.close()


_idle_helpers: list[_Helper] = []
_pool_lock = threading.Lock()


def _checkout_helper() -> _Helper | None:
    """An idle live helper, or a new one; None (grading falls back to strings) if none starts."""
    while True:
        with _pool_lock:
            helper = _idle_helpers.pop() if _idle_helpers else None
        if helper is None:
            break
        if helper.alive():
            return helper
        helper.close()
    try:
        return _Helper()
    except (OSError, RuntimeError):
        logger.exception("cannot start a math-verify helper; only string matching is used")
        return None


@atexit.register
def shutdown_helpers() -> None:
    """Stop the idle helper processes (they also exit on their own when this process ends)."""
    with _pool_lock:
        helpers = list(_idle_helpers)
        _idle_helpers.clear()
    for helper in helpers:
        helper.close()


class _Deadline(BaseException):
    """Raised by the helper's timer; a BaseException so math-verify's ``except Exception`` lets it through."""


def _raise_deadline(signum: int, frame: object) -> None:
    raise _Deadline


def _as_boxed_math(answer: str) -> str:
    return "$\\boxed{" + answer.strip().strip("$") + "}$"


def _verify_in_helper(pred: str, gold: str, timeout_s: float) -> bool:
    from math_verify import parse, verify

    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            gold_parsed = parse(_as_boxed_math(gold), parsing_timeout=None)
            pred_parsed = parse(_as_boxed_math(pred), parsing_timeout=None)
            return bool(
                gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None)
            )
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except (_Deadline, Exception):
        return False


def _serve() -> None:
    """Helper process main loop; replies go to a private copy of stdout so stray prints cannot corrupt them."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    logging.disable(logging.CRITICAL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C; EOF on stdin ends us
    signal.signal(signal.SIGALRM, _raise_deadline)
    _verify_in_helper("1", "1", _STARTUP_TIMEOUT_S)  # import and warm up sympy before "ready"
    print("ready", file=replies, flush=True)
    for line in sys.stdin:
        pred, gold, timeout_s = json.loads(line)
        print("1" if _verify_in_helper(pred, gold, timeout_s) else "0", file=replies, flush=True)


# ---------------------------------------------------------------------------------------------
# Grading


@dataclass(frozen=True)
class Grade:
    """A graded response: its extracted final answer (None without a boxed one) and its correctness."""

    answer: str | None
    correct: bool


def grade(response: str, gold: str, timeout_s: float = 5.0) -> Grade:
    """Grade one response by its last boxed answer."""
    answer = extract_boxed(response)
    return Grade(answer, answer is not None and answers_match(answer, gold, timeout_s))


def grade_many(
    responses: Sequence[str], golds: Sequence[str], timeout_s: float = 5.0, workers: int | None = None
) -> list[Grade]:
    """Grade ``responses[i]`` against ``golds[i]``; ``workers`` threads (each with its own helper)."""
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(grade, responses, golds, [timeout_s] * len(golds)))


if __name__ == "__main__":
    _serve()
