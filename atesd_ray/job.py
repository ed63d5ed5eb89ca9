"""What every job does first: a writable run directory holding its resolved config, and its data
with every prompt checked against the model's limit."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from atesd_ray.data.loaders import load_data
from atesd_ray.models import load_tokenizer, pretrained_path
from atesd_ray.prompts import encode_chat, student_messages, teacher_messages

if TYPE_CHECKING:
    from atesd_ray.config import Config


class RunDirError(RuntimeError):
    pass


def prepare_run_dir(run_dir: Path, cfg: Config) -> None:
    """Create the run directory and fail now, not after an hour, if it cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"run_dir '{run_dir}' is not writable: {err}") from err
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


@dataclasses.dataclass
class RunData:
    train: list[dict]
    evals: list[dict]
    probe: list[dict]
    too_long: int
    summary: str


def prepare_data(cfg: Config) -> RunData:
    """Load the records and drop (and count) problems whose longest prompt exceeds the limit:
    a prompt is never silently cut."""
    train, evals, report = load_data(cfg.data, cfg.seed)
    pretrained_path(cfg.model)  # a local model folder that cannot load fails here, naming its file
    tokenizer = load_tokenizer(cfg.model)
    limit = cfg.model.max_prompt_tokens

    def fits(r) -> bool:
        student = encode_chat(tokenizer, student_messages(r.problem, cfg.prompts), cfg.model.student_thinking)
        messages = teacher_messages(r.problem, r.reference, r.answer, 1.0, cfg.prompts)
        return max(len(student), len(encode_chat(tokenizer, messages, cfg.model.teacher_thinking))) <= limit

    kept = [dataclasses.asdict(r) for r in train if fits(r)]
    too_long = len(train) - len(kept)
    if not kept:
        raise ValueError(f"every training prompt exceeds model.max_prompt_tokens={limit}")
    held = [dataclasses.asdict(r) for r in evals if fits(r)]
    summary = report.summary() + (
        f"; {too_long} train prompts over {limit} tokens skipped" if too_long else ""
    )
    return RunData(kept, held, held[: cfg.data.probe_size], too_long, summary)
