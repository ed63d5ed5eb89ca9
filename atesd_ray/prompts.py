"""Student and teacher prompts and the exposure of a reference solution (DESIGN §3-4).

Exposure. A reference is cut into its final-answer line and the reasoning before it:

- The answer line is the sentence holding the last ``\\boxed{...}``, running to the end of its line
  (a box spanning lines included) and over any following lines that hold only closing delimiters
  (``\\]``, ``$$``). When that sentence is a bare box (``\\[ \\boxed{5} \\]``), the lead-in line
  just above it (ending in ``:`` or mentioning "answer") joins it, so no dangling "The answer is:"
  is left in the reasoning. Text after the answer line (rare: a check after the answer) is not
  shown for alpha < 1. A reference without ``\\boxed`` gets a synthesized line, ``answer_line``
  with ``{answer}`` filled in.
- The reasoning splits into m segments: paragraphs separated by a blank line, or sentences when
  there are fewer than 2 paragraphs.
- ``expose(alpha)`` is the original text up to the end of segment k = floor(alpha * m), a blank
  line, and the answer line. It is a prefix of the reference, so formatting is kept and exposure
  grows monotonically with alpha. k is computed as ``floor(alpha * m + 1e-9)``: ``0.29 * 100`` is
  ``28.999999999999996`` in floating point and must give 29; the epsilon can only move an alpha
  that lies within 1e-9 / m below a segment boundary onto it. alpha = 1 returns the reference
  unchanged, byte for byte: OPSD's teacher context. (For a reference without ``\\boxed`` that
  means the synthesized answer line appears only for alpha < 1.)

Templates fill ``{problem}``, ``{reference}`` and ``{answer}`` literally and in one pass, so
braces in the problem (``\\boxed{}``, ``{x}``, even a literal ``{reference}``) are left alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from atesd_ray.config import PromptConfig

Messages = list[dict[str, str]]

ALPHA_EPS = 1e-9
_PLACEHOLDER = re.compile(r"\{(problem|reference|answer)\}")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_DELIMITERS_ONLY = re.compile(r"[\s$\\\[\]().,;:!{}]*")  # "\]", "$$", "\[", "." ...
_WORD = re.compile(r"[A-Za-z]{2,}")


def fill_template(template: str, values: Mapping[str, str]) -> str:
    """Replace ``{problem}``, ``{reference}`` and ``{answer}`` in one pass; other braces are kept."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), template)


def _line_end(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    return len(text) if end < 0 else end


def _sentence_start(text: str, pos: int) -> int:
    """Start of the sentence that holds ``pos``, not looking past the start of its line."""
    line_start = text.rfind("\n", 0, pos) + 1
    ends = list(_SENTENCE_END.finditer(text, line_start, pos))
    return ends[-1].end() if ends else line_start


def _box_end(text: str, box: int) -> int:
    """Index just past the argument of the ``\\boxed`` at ``box``: its closing brace (end of text if
    unbalanced), or the end of the word ``\\boxed`` when no brace follows."""
    i = box + len("\\boxed")
    while i < len(text) and text[i] == " ":
        i += 1
    if i == len(text) or text[i] != "{":
        return i
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(text)


def _answer_bounds(reference: str) -> tuple[int, int] | None:
    """(start, end) of the final-answer line in ``reference``, or None when it has no ``\\boxed``."""
    box = reference.rfind("\\boxed")
    if box < 0:
        return None
    end = _line_end(reference, _box_end(reference, box))
    while end < len(reference):  # closing delimiter lines: "\]", "$$"
        nxt = _line_end(reference, end + 1)
        line = reference[end + 1 : nxt]
        if not line.strip() or not _DELIMITERS_ONLY.fullmatch(line):
            break
        end = nxt
    start = _sentence_start(reference, box)
    if not _WORD.search(reference[start:box]):  # a bare box: take the delimiters and lead-in above it
        while start > 0 and reference[start - 1] == "\n":
            prev = reference.rfind("\n", 0, start - 1) + 1
            line = reference[prev : start - 1]
            if not line.strip():
                break
            if _DELIMITERS_ONLY.fullmatch(line):
                start = prev
                continue
            if line.rstrip().endswith(":") or "answer" in line.lower():
                start = _sentence_start(reference, start - 1)
            break
    return start, end


def _spans(text: str, separator: re.Pattern[str]) -> list[tuple[int, int]]:
    """(start, end) of each non-blank piece of ``text`` between separators, surrounding whitespace excluded."""
    spans, pos = [], 0
    for sep in [*separator.finditer(text), None]:
        piece = text[pos : sep.start() if sep else len(text)]
        if piece.strip():
            spans.append((pos + len(piece) - len(piece.lstrip()), pos + len(piece.rstrip())))
        pos = sep.end() if sep else pos
    return spans


def _segment_spans(text: str) -> list[tuple[int, int]]:
    """Paragraphs of ``text``, or its sentences when it has fewer than 2 paragraphs."""
    paragraphs = _spans(text, _BLANK_LINE)
    return paragraphs if len(paragraphs) >= 2 else _spans(text, _SENTENCE_END)


def _parse(reference: str, answer: str, answer_line_template: str) -> tuple[list[tuple[int, int]], str]:
    bounds = _answer_bounds(reference)
    if bounds is None:
        return _segment_spans(reference), fill_template(answer_line_template, {"answer": answer})
    start, end = bounds
    return _segment_spans(reference[:start]), reference[start:end].strip()


def split_reference(
    reference: str, answer: str, answer_line_template: str = PromptConfig.answer_line
) -> tuple[list[str], str]:
    """The reasoning segments of ``reference`` and its final-answer line (see the module docstring)."""
    spans, answer_line = _parse(reference, answer, answer_line_template)
    return [reference[s:e] for s, e in spans], answer_line


def n_exposed(alpha: float, m: int) -> int:
    """floor(alpha * m), robust to floating-point error (see the module docstring)."""
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"exposure alpha must be in [0, 1], got {alpha!r}")
    return min(m, math.floor(alpha * m + ALPHA_EPS))


def _reasoning_prefix(reference: str, spans: list[tuple[int, int]], k: int) -> str:
    return reference[: spans[k - 1][1]] if k else ""


def expose(
    reference: str, answer: str, alpha: float, answer_line_template: str = PromptConfig.answer_line
) -> str:
    """The reference as the teacher sees it at exposure ``alpha``: the first floor(alpha * m) reasoning
    segments, then the final-answer line, which is always kept. ``alpha = 1`` returns ``reference``."""
    spans, answer_line = _parse(reference, answer, answer_line_template)
    k = n_exposed(alpha, len(spans))
    if alpha == 1.0:
        return reference
    prefix = _reasoning_prefix(reference, spans, k)
    return f"{prefix}\n\n{answer_line}" if prefix else answer_line


def student_messages(problem: str, prompts: PromptConfig) -> Messages:
    return [{"role": "user", "content": fill_template(prompts.student, {"problem": problem})}]


def teacher_messages(
    problem: str, reference: str, answer: str, alpha: float, prompts: PromptConfig
) -> Messages:
    exposed = expose(reference, answer, alpha, prompts.answer_line)
    content = fill_template(prompts.teacher, {"problem": problem, "reference": exposed, "answer": answer})
    return [{"role": "user", "content": content}]


def grounding_messages(
    problem: str, reference: str, answer: str, alpha: float, prompts: PromptConfig
) -> tuple[Messages, str]:
    """The teacher prompt for the grounding signal g (DESIGN §4) and the text it is scored on.

    The prompt is the teacher prompt at exposure ``alpha`` with the answer line removed from the
    exposed reference (at alpha = 1: all reasoning segments). The scored text is ``prompts.answer_line``
    with the answer filled in, the same wording for every example, so that g compares the teacher's
    belief in the answer rather than each dataset's phrasing of its last line.
    """
    spans, _ = _parse(reference, answer, prompts.answer_line)
    truncated = _reasoning_prefix(reference, spans, n_exposed(alpha, len(spans)))
    content = fill_template(prompts.teacher, {"problem": problem, "reference": truncated, "answer": answer})
    return [{"role": "user", "content": content}], fill_template(prompts.answer_line, {"answer": answer})


def render_chat(
    tokenizer: Any, messages: Messages, thinking: bool, add_generation_prompt: bool = True
) -> str:
    """The prompt text for ``messages``: the tokenizer's chat template, called with
    ``enable_thinking=thinking`` (Qwen3 templates read it, others ignore it), or a plain
    ``User:`` / ``Assistant:`` layout when the tokenizer has no chat template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, enable_thinking=thinking
        )
    text = "".join(f"{m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages)
    return text + "Assistant:\n" if add_generation_prompt else text


def encode_chat(tokenizer: Any, messages: Messages, thinking: bool) -> list[int]:
    """The token ids of :func:`render_chat`'s prompt (the template adds any special tokens itself)."""
    return tokenizer(render_chat(tokenizer, messages, thinking), add_special_tokens=False)["input_ids"]
