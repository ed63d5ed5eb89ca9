"""What every job does first: its run directory, held by this job alone and holding its resolved
config (a resume's checked against the run's own), and its data with every prompt checked against
the model's limit."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from atesd_ray.data.loaders import load_data
from atesd_ray.data.records import DataError
from atesd_ray.models import load_tokenizer, pretrained_path
from atesd_ray.prompts import encode_chat, student_messages, teacher_messages
from atesd_ray.run_lock import LOCK, RunLock, acquire
from atesd_ray.runtime.checkpoint import CheckpointManager

if TYPE_CHECKING:
    from atesd_ray.config import Config


class RunDirError(RuntimeError):
    pass


class ResumeRefused(RuntimeError):
    """A resume with a config that would change what the run trains."""


# what a resumed run may change without asking: how long and how often, how it reports, where it
# runs. Anything else changes what it trains, and is refused unless named in `resume_allow`.
RESUMABLE = (
    "trainer.total_steps",
    "trainer.save_every",
    "trainer.keep_last",
    "trainer.fault_retries",
    "eval.every_n_steps",
    "eval.at_start",
    "eval.at_end",
    "rollout.max_logprob_gap",
    "logging.",
    "tracking.",
    "dashboard.",
    "cluster.",
    "resume",
    "resume_allow",
    "run_dir",
)
CONFIG = "config.yaml"
HISTORY = "config_history.jsonl"


def _flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(run_dir: Path, cfg: Config) -> tuple[dict[str, tuple], dict[str, object]]:
    """The keys whose value differs from the run's own ``config.yaml`` ({key: (old, new)}), and the
    settings the schema gained since the run began, which its file lacks ({key: value}): those are
    no change, but are said and kept in the history."""
    stored = _flat(OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG), resolve=True))
    mine = _flat(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    schema = set(_flat(OmegaConf.to_container(OmegaConf.structured(type(cfg)), resolve=True)))
    gained = {k: mine.get(k) for k in sorted(schema - set(stored))}
    changes = {
        k: (stored.get(k), mine.get(k))
        for k in sorted((set(stored) | set(mine)) - set(gained))
        if stored.get(k) != mine.get(k)
    }
    return changes, gained


def set_aside(run_dir: Path) -> Path | None:
    """``resume=never`` in a directory that holds a run (a config, metrics or checkpoints): its
    files move to ``earlier-<time>/``, so the new run starts clean (no checkpoint of the earlier run
    is pruned as the newest, or resumed later) and nothing is lost. Locks, Hydra's ``.hydra/`` and
    logs, which this job may already be writing, stay."""
    if not any((run_dir / name).exists() for name in (CONFIG, "metrics.jsonl", "checkpoints")):
        return None
    kept = [
        p
        for p in run_dir.iterdir()
        if not p.name.startswith((LOCK, "earlier-", ".hydra")) and p.suffix != ".log"
    ]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = run_dir / f"earlier-{stamp}"
    for n in range(2, 100):
        try:
            aside.mkdir()
            break
        except FileExistsError:
            aside = run_dir / f"earlier-{stamp}-{n}"
    for path in kept:
        path.rename(aside / path.name)
    print(f"resume=never: the run that was in {run_dir} is now in {aside}", flush=True)
    return aside


def open_run_dir(run_dir: Path, cfg: Config, resumes: bool = False) -> RunLock:
    """Create the run directory and take its lock (``run_lock.py``) before writing anything in it.
    A job that ``resumes`` (training) then finds the checkpoint ``cfg.resume`` names (the lock's
    ``checkpoint``) and refuses a config that changes more than ``RESUMABLE`` and ``resume_allow``
    allow. Then ``config.yaml`` is written (and, for a resume that changes keys, a line of
    ``config_history.jsonl``). Fails now, not after an hour, if the directory cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = acquire(run_dir)
    except OSError as err:
        raise RunDirError(f"run_dir '{run_dir}' is not writable: {err}") from err
    try:
        lock.checkpoint = resuming = CheckpointManager(run_dir, 1).resolve(cfg.resume) if resumes else None
        changes, gained = (
            config_changes(run_dir, cfg) if resuming and (run_dir / CONFIG).exists() else ({}, {})
        )
        allowed = (*RESUMABLE, *cfg.resume_allow)
        refused = {
            k: v
            for k, v in changes.items()
            if not any(k == a or (a.endswith(".") and k.startswith(a)) for a in allowed)
        }
        if refused:
            listed = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
            raise ResumeRefused(
                f"run_dir '{run_dir}' holds a run ({resuming.name}) of another config; resuming it with this one "
                f"would change:\n{listed}\nStart a new run (another run_dir), start this one over (resume=never), "
                f"or, for a key that is safe to change mid-run, allow it: resume_allow=[{','.join(refused)}]"
            )
        if resumes and cfg.resume == "never":
            set_aside(run_dir)
        (run_dir / _config_name(run_dir, cfg, resumes)).write_text(
            OmegaConf.to_yaml(OmegaConf.structured(cfg))
        )
        if gained:
            listed = ", ".join(f"{k}={v!r}" for k, v in gained.items())
            print(f"settings new since this run began, taken as configured now: {listed}", flush=True)
        if changes or gained:
            entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "from": resuming.name, "argv": sys.argv[1:]}
            entry["changes"] = {k: [old, new] for k, (old, new) in changes.items()}
            entry["gained"] = gained
            with open(run_dir / HISTORY, "a") as fh:
                fh.write(json.dumps(entry, default=str) + "\n")
    except BaseException:
        lock.release()
        raise
    return lock


def _config_name(run_dir: Path, cfg: Config, resumes: bool) -> str:
    """``config.yaml``, or ``config.<mode>.yaml`` for a job of another mode (an eval, a report) in a
    directory whose ``config.yaml`` is a run's: that file stays what a resume is checked against."""
    path = run_dir / CONFIG
    if resumes or not path.exists() or OmegaConf.load(path).get("mode") == cfg.mode:
        return CONFIG
    return f"config.{cfg.mode}.yaml"


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
        raise DataError(
            f"every training prompt of data.source={cfg.data.source} exceeds model.max_prompt_tokens={limit} "
            f"(the student's and the teacher's at full exposure); raise the limit or use shorter problems"
        )
    held = [dataclasses.asdict(r) for r in evals if fits(r)]
    summary = report.summary() + (
        f"; {too_long} train prompts over {limit} tokens skipped" if too_long else ""
    )
    return RunData(kept, held, held[: cfg.data.probe_size], too_long, summary)
