"""The data and the prompts (``conf/data/``, ``conf/prompts/``)."""

from __future__ import annotations

from dataclasses import dataclass

from atesd_ray.schema import (
    Section,
    between,
    non_negative,
    nonempty,
    one_of,
    require,
    setting,
    subkey,
)


@dataclass
class SyntheticDataConfig(Section):
    n_train: int = setting(512, non_negative)
    n_eval: int = setting(64, non_negative)
    levels: list[int] = setting(
        [1, 2, 3], nonempty("needs at least one difficulty level"), each=[one_of(0, 1, 2, 3)]
    )
    seed: int = 1234


DATA_SOURCES = ("synthetic", "hub", "jsonl", "parquet")


@dataclass
class DataConfig(Section):
    name: str = "synthetic"
    source: str = setting("synthetic", one_of(*DATA_SOURCES))
    path: str | None = None  # hub id or local file
    subset: str | None = None  # hub dataset config name
    split: str = "train"
    eval_split: str | None = None  # None: hold out `eval_fraction` of `split`
    eval_fraction: float = setting(0.05, between(0.0, 1.0))
    # record field -> column in the source (id, problem, reference, answer, source, difficulty)
    columns: dict[str, str] = setting(dict)
    max_rows: int | None = None
    on_bad_row: str = setting("skip", one_of("skip", "fail"))
    shuffle: bool = True
    probe_size: int = setting(8, non_negative)
    synthetic: SyntheticDataConfig = setting(SyntheticDataConfig)

    def check(self, key: str) -> None:
        if self.source != "synthetic":
            require(bool(self.path), subkey(key, "path"), f"data.source={self.source} needs data.path")


@dataclass
class PromptConfig(Section):
    """Prompt templates (``conf/prompts/``).

    Placeholders {problem}, {reference} and {answer} are replaced literally (no ``str.format``), so
    ``\\boxed{}`` needs no escaping.
    """

    # OPSD's prompts (github.com/siyan-zhao/OPSD, data_collator.py, latest version)
    student: str = (
        "Problem: {problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    teacher: str = (
        "Problem: {problem}\n\nHere is a reference solution to this problem:\n=== Reference Solution Begin ===\n"
        "{reference}\n=== Reference Solution End ===\n\n\n"
        "After reading the reference solution above, make sure you truly understand the reasoning behind each step "
        "\u2014 do not copy or paraphrase it. Now, using your own words and independent reasoning, derive the same "
        "final answer to the problem above. Think step by step, explore different approaches, and don't be afraid to "
        "backtrack or reconsider if something doesn't work out:\n\n"
        "Please reason step by step, and put your final answer within \\boxed{}."
    )
    # appended after the teacher's truncated reference when measuring the grounding signal g
    answer_line: str = "The final answer is \\boxed{{answer}}."
    # MOTAB's stitching phrase between the student's steps and the teacher's suffix
    revise_phrase: str = "\n\nHowever,\n\n"
