"""Atomic, complete-only checkpoints: ``checkpoints/step_<N>/``.

Actors write their parts into ``checkpoints/.tmp-step_<N>/``; the driver then writes
``trainer_state.json`` and a ``COMPLETE`` marker and renames the directory into place. A directory
named ``step_<N>`` is therefore always complete, and a run killed while saving leaves only a
``.tmp-*`` directory that is ignored (and cleaned up) by the next start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
STATE = "trainer_state.json"
STUDENT_DIR = "student"  # inside checkpoints/step_<N>/: the student's part
PREFETCHED = "prefetched_rollouts.safetensors"  # the next step's rollouts, generated one step off
PROBE_ROLLOUTS = "probe_rollouts.safetensors"  # the fixed rollouts probe_kl is measured on
PROBE_TARGETS = "probe_targets.safetensors"  # and the full-exposure teacher's targets on them
STUDENT_WEIGHTS = "student.safetensors"  # the trainable tensors, with the model's parameter names
STUDENT_STATE = "student_state.json"  # step, scheduler, and the fingerprint of the model it fits
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.root.mkdir(parents=True, exist_ok=True)

    def complete(self) -> list[tuple[int, Path]]:
        found = []
        for d in self.root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / MARKER).is_file() and (d / STATE).is_file():
                found.append((int(m.group(1)), d))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint ``resume`` (auto | never | <dir>) points to, or None to start fresh.

        ``auto`` takes the newest complete checkpoint whose files read back (:func:`verify`); one
        that does not is skipped, with a warning naming the file, for the one before it."""
        if resume == "never":
            return None
        if resume == "auto":
            for _, checkpoint in reversed(self.complete()):
                try:
                    verify(checkpoint)
                    return checkpoint
                except CheckpointError as err:
                    log.warning("%s; resuming from the checkpoint before it", err)
            return None
        path = Path(resume)
        if not is_checkpoint(path):
            raise CheckpointError(f"resume={resume}: not a complete checkpoint (no {MARKER} or {STATE})")
        verify(path)
        return path

    def begin(self, step: int) -> Path:
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".tmp-step_{step}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int, tmp: Path, state: dict) -> Path:
        (tmp / STATE).write_text(json.dumps(state, indent=2))
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        (tmp / MARKER).write_text(str(step))
        final = self.root / f"step_{step}"
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        self._prune()
        return final

    def abandon(self, step: int, tmp: Path, err: Exception) -> CheckpointError:
        """The error for a checkpoint that could not be written: its partial files are removed
        (they would fill the disk further) and the message names the path and what still holds."""
        shutil.rmtree(tmp, ignore_errors=True)
        kept = self.latest()
        cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return CheckpointError(
            f"checkpoint of step {step} could not be written to {tmp}: {cause}. "
            + (
                f"The last complete checkpoint, {kept}, is kept; "
                if kept
                else "No earlier checkpoint exists; "
            )
            + "free space and run again with resume=auto to continue from it."
        )

    def _prune(self) -> None:
        done = self.complete()
        for _, d in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(d, ignore_errors=True)


def verify(checkpoint: Path) -> None:
    """Read back every file of a checkpoint without loading it: the JSON states parse, safetensors
    headers match their files' sizes, ``torch.save`` archives pass their CRC checks. Raises
    :class:`CheckpointError` naming the first file that does not."""
    import zipfile

    from safetensors import safe_open

    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as fh:
                    fh.keys()
            elif path.suffix == ".pt":
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    raise ValueError(f"member {bad} fails its CRC check")
        except Exception as err:  # noqa: BLE001 - any failure to read back is a corrupt file
            raise CheckpointError(f"checkpoint {checkpoint.name} is corrupt: {path}: {err}") from err


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE).read_text())


def fingerprint(model_name: str, lora: bool, trainable: dict) -> dict:
    """What a checkpoint must match to be loaded into a model: the names and (global, for FSDP's
    DTensors) shapes of its trainable tensors."""
    return {"model": model_name, "lora": lora, "shapes": {n: list(t.shape) for n, t in trainable.items()}}


def check_fingerprint(saved: dict, mine: dict, where: Path) -> None:
    """Raise ValueError, naming both sides, when a checkpoint was written for another model."""
    if saved != mine:
        theirs = saved.get("shapes", {})
        one_side = sorted(set(mine["shapes"]) ^ set(theirs))[:3]
        reshaped = [
            f"{n}: checkpoint {theirs[n]}, model {s}"
            for n, s in mine["shapes"].items()
            if n in theirs and theirs[n] != s
        ][:3]
        raise ValueError(
            f"checkpoint {where} holds a different model (model={saved.get('model')!r}, "
            f"lora={saved.get('lora')}, {len(theirs)} tensors) than this run "
            f"(model={mine['model']!r}, lora={mine['lora']}, {len(mine['shapes'])} tensors)"
            + (f"; e.g. tensors only on one side: {one_side}" if one_side else "")
            + (f"; e.g. shapes that differ: {reshaped}" if reshaped else "")
        )


def load_tensors(path: Path) -> dict:
    """A ``torch.save`` file of tensors and plain containers, unpickled without running any code
    in it (``weights_only``): a file that asks for more is refused, naming the file."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds more than tensors (pickled objects or code); refused to load it: "
            f"{str(err).splitlines()[0]}"
        ) from err


def save_rollouts(rollouts: list, path: Path) -> None:
    """Rollouts (``DataProto``) as one safetensors file: tensors under ``<i>/<key>``, the
    per-sample strings and numbers and the meta info as JSON in its header. Nothing in it is
    pickled, so loading it cannot run code."""
    from safetensors.torch import save_file

    tensors, header = {}, []
    for i, rollout in enumerate(rollouts):
        tensors |= {f"{i}/{k}": v.contiguous() for k, v in rollout.batch.items()}
        header.append(
            {
                "non_tensors": {k: v.tolist() for k, v in rollout.non_tensor_batch.items()},
                "meta_info": rollout.meta_info,
            }
        )
    save_file(tensors, str(path), metadata={"rollouts": json.dumps(header)})


def load_rollouts(path: Path) -> list:
    """The rollouts :func:`save_rollouts` wrote; a file that is not such a file is refused, naming it."""
    import numpy as np
    from safetensors import SafetensorError, safe_open
    from verl import DataProto

    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})["rollouts"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (OSError, SafetensorError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{path} is not a rollouts file of this version ({type(err).__name__}: {err})"
        ) from err
    rollouts = []
    for i, part in enumerate(header):
        prefix = f"{i}/"
        rollouts.append(
            DataProto.from_dict(
                tensors={k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)},
                non_tensors={k: np.array(v, dtype=object) for k, v in part["non_tensors"].items()},
                meta_info=part["meta_info"],
            )
        )
    return rollouts


def is_checkpoint(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / STATE).is_file()


def read_student_weights(checkpoint: Path, mine: dict) -> dict:
    """The student tensors of a complete checkpoint, after checking they fit the model ``mine``
    describes (see :func:`fingerprint`)."""
    from safetensors.torch import load_file

    if not is_checkpoint(checkpoint):
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint (no {MARKER} or {STATE})")
    student = checkpoint / STUDENT_DIR
    state = json.loads((student / STUDENT_STATE).read_text())
    check_fingerprint(state["fingerprint"], mine, student)
    return load_file(str(student / STUDENT_WEIGHTS))
