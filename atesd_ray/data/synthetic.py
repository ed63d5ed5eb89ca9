"""Seeded math word problems with worked, multi-paragraph references (the embedded default data).

Each template draws a short story and writes one reasoning step per paragraph, more steps at
higher difficulty (level 1: 2-3 steps, level 2: 3-5, level 3: 4-7), then a blank line and
``The final answer is \\boxed{N}.``. Answers are positive integers or reduced fractions (``7/2``).
Level 0 is one operation on numbers up to 20 ("Mia has 7 apples and buys 5 more..."), written in
two steps: within reach of the bundled 135M model, which the embedded demo trains on.

Every generated record is checked before it is returned (:func:`verify_reference`): each equation
written in the reference (``4 × 3 = 12``, ``7 ÷ 2 = 7/2``) is re-evaluated with exact fractions,
the last one must equal the answer, and the boxed value must equal the answer. The answer itself
comes from a closed-form formula in the template, computed separately from the step-by-step text,
so a slip in either shows up as a mismatch.

Record ``i`` of ``generate(n, seed)`` depends only on ``(seed, i, levels)``, so a longer list
extends a shorter one; problem texts within one list are unique.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Callable, Sequence
from fractions import Fraction

from atesd_ray.data.records import Record
from atesd_ray.data.stories import TEMPLATES, fmt, one_step

LEVELS = (0, 1, 2, 3)
ANSWER_LINE = "The final answer is \\boxed{{answer}}."
STEPS_PER_LEVEL = {0: (2, 2), 1: (2, 3), 2: (3, 5), 3: (4, 7)}

# An equation as the templates write it: operands (integers or a/b, optionally parenthesized)
# joined by single-spaced + - × ÷, then " = " and the result.
_NUM = r"\d+(?:/\d+)?"
_OPERAND = rf"\(*{_NUM}\)*"
EQUATION = re.compile(rf"(?<![\w/.])({_OPERAND}(?: [-+×÷] {_OPERAND})+) = ({_NUM})(?![\w/])")
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_OPS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def evaluate(expression: str) -> Fraction:
    """Exact value of an equation's left side (``a/b`` operands are fractions, ``÷`` divides)."""
    python = re.sub(r"(\d+)/(\d+)", r"(\1/\2)", expression).replace("×", "*").replace("÷", "/")

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.BinOp):
            left, right = walk(node.left), walk(node.right)
            if type(node.op) in _OPS:
                return _OPS[type(node.op)](left, right)
        raise ValueError(f"unsupported expression {expression!r}")

    return walk(ast.parse(python, mode="eval").body)


def verify_reference(reference: str, answer: str) -> None:
    """Raise ValueError unless every equation in ``reference`` holds, the last one gives ``answer``,
    and the reference ends with ``\\boxed{answer}``."""
    equations = EQUATION.findall(reference)
    if not equations:
        raise ValueError("the reference has no equation")
    for left, right in equations:
        if evaluate(left) != Fraction(right):
            raise ValueError(f"wrong arithmetic: {left} = {right} (it is {fmt(evaluate(left))})")
        if fmt(Fraction(right)) != right:
            raise ValueError(f"unreduced result {right!r} in {left} = {right}")
    if Fraction(equations[-1][1]) != Fraction(answer):
        raise ValueError(f"the last equation gives {equations[-1][1]}, not the answer {answer}")
    boxed = BOXED.findall(reference.rsplit("\n", 1)[-1])
    if boxed != [answer]:
        raise ValueError(f"the final line boxes {boxed}, not [{answer!r}]")


def make_record(rng: random.Random, level: int, record_id: str) -> Record:
    """One verified problem of the given level from a template chosen by ``rng``."""
    name = "one_step" if level == 0 else rng.choice(sorted(TEMPLATES))
    template = one_step if level == 0 else TEMPLATES[name]
    problem, steps, answer = template(rng, level)
    lo, hi = STEPS_PER_LEVEL[level]
    if not lo <= len(steps) <= hi or answer <= 0:
        raise RuntimeError(f"template {name} level {level}: {len(steps)} steps, answer {answer}")
    reference = "\n\n".join([*steps, ANSWER_LINE.replace("{answer}", fmt(answer))])
    try:
        verify_reference(reference, fmt(answer))
    except ValueError as e:
        raise RuntimeError(
            f"template {name} level {level} wrote an inconsistent reference: {e}\n{reference}"
        ) from e
    return Record(
        id=record_id,
        problem=problem,
        reference=reference,
        answer=fmt(answer),
        source=f"synthetic/{name}",
        difficulty=level,
    )


def generate(n: int, seed: int, levels: Sequence[int] = (1, 2, 3)) -> list[Record]:
    """``n`` problems with unique texts; record ``i`` has level ``levels[i % len(levels)]`` and id
    ``synth-<seed>-<i>``, and depends only on ``(seed, i, levels)``."""
    if not levels or any(level not in LEVELS for level in levels):
        raise ValueError(f"levels must be a non-empty list drawn from {LEVELS}, got {list(levels)}")
    records: list[Record] = []
    seen: set[str] = set()
    for i in range(n):
        for attempt in range(1000):
            rng = random.Random(f"atesd-synth/{seed}/{i}/{attempt}")
            record = make_record(rng, levels[i % len(levels)], f"synth-{seed}-{i}")
            if record.problem not in seen:
                break
        else:
            raise RuntimeError(f"could not draw a new problem for index {i} (seed {seed})")
        seen.add(record.problem)
        records.append(record)
    return records


def train_eval_split(
    n_train: int, n_eval: int, seed: int, levels: Sequence[int] = (1, 2, 3)
) -> tuple[list[Record], list[Record]]:
    """Disjoint train and eval sets: the first ``n_eval`` records of one list are the eval set, so it
    stays the same when ``n_train`` changes, and no problem text is in both."""
    records = generate(n_eval + n_train, seed, levels)
    return records[n_eval:], records[:n_eval]
