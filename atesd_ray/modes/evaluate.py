"""``mode=eval``: k samples per problem of the ``eval=`` sets on the rollout actors, graded and summarized.

Which model (``eval.model``):
- unset: the configured model (``model=``), as loaded for training: the base row of a table;
- a checkpoint (``<run>/checkpoints/step_<N>``) or a training run directory (its latest complete
  checkpoint): the configured model with the checkpoint's student tensors loaded over it; the
  checkpoint's fingerprint must match that model (pass the ``model=`` the run trained);
- a local model directory (``config.json`` inside) or a hub id.

Writes ``run_dir/eval/<set>.jsonl`` (one row per sample: problem id, sample index, response,
extracted answer, correctness), ``eval/summary.json`` and ``eval/summary.md``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import ray
from omegaconf import OmegaConf

from atesd_ray.assembly import rollout_group
from atesd_ray.config import Config, ModelConfig
from atesd_ray.data.loaders import load_eval_set
from atesd_ray.evaluation import generate_and_grade, summarize_rows, write_rows
from atesd_ray.job import open_run_dir
from atesd_ray.runtime.checkpoint import CheckpointManager, is_checkpoint, read_state
from atesd_ray.runtime.cluster import place
from atesd_ray.tables import markdown_table


def resolve_model(cfg: Config) -> tuple[ModelConfig, Path | None]:
    """(the model the rollout actors load, the checkpoint to load over it or None)."""
    value = cfg.eval.model
    if value is None:
        return cfg.model, None
    path = Path(value).expanduser()
    if is_checkpoint(path):
        return cfg.model, path
    if (path / "checkpoints").is_dir():
        latest = CheckpointManager(path, keep_last=1).latest()
        if latest is None:
            raise FileNotFoundError(f"eval.model={value}: the run directory holds no complete checkpoint")
        return cfg.model, latest
    plain = dataclasses.replace(
        cfg.model,
        name=value,
        path=str(path),
        gguf_file=None,
        tokenizer=None,
        lora=dataclasses.replace(cfg.model.lora, enabled=False),
    )
    if (path / "config.json").is_file():
        return dataclasses.replace(plain, source="path"), None
    if path.exists() or value.startswith(("/", ".", "~")):
        raise FileNotFoundError(
            f"eval.model={value}: not a checkpoint (checkpoints/step_<N>), a run directory with "
            f"checkpoints, or a model directory with config.json"
        )
    return dataclasses.replace(plain, source="hub", path=value), None


def trained_by(checkpoint: Path | None) -> dict | None:
    """How the checkpoint's run trained (algorithm, exposure, step), from its config.yaml when present."""
    if checkpoint is None:
        return None
    info: dict = {"step": read_state(checkpoint)["step"]}
    run_config = checkpoint.parent.parent / "config.yaml"
    if run_config.is_file():
        c = OmegaConf.load(run_config)
        info.update(
            algorithm=c.algorithm.name,
            alpha=c.algorithm.alpha,
            controller=c.controller.kind,
            model=c.model.name,
            run_dir=str(checkpoint.parent.parent),
        )
    return info


def set_summary(rows: list[dict], timeout_s: float) -> dict:
    return summarize_rows(rows, timeout_s) | {
        "truncated_frac": sum(r["finish_reason"] == "length" for r in rows) / len(rows)
    }


def eval_markdown(summary: dict) -> str:
    k = summary["protocol"]["samples"]
    passes = sorted(
        {key for s in summary["sets"].values() for key in s if key.startswith("pass@")},
        key=lambda key: int(key.split("@")[1]),
    )
    headers = ["set", "problems", f"avg@{k}", *passes, f"maj@{k}", "truncated"]
    rows = [
        [
            name,
            s["n_problems"],
            100 * s[f"avg@{k}"],
            *(100 * s[p] for p in passes),
            100 * s[f"maj@{k}"],
            100 * s["truncated_frac"],
        ]
        for name, s in summary["sets"].items()
    ]
    p = summary["protocol"]
    head = (
        f"Model: {summary['model']}"
        + (f" (checkpoint {summary['checkpoint']})" if summary["checkpoint"] else "")
        + f"\n\nPercent; {k} samples per problem, temperature {p['temperature']}, top-p {p['top_p']}, "
        f"top-k {p['top_k']}, up to {p['max_new_tokens']} new tokens, thinking={p['thinking']}.\n\n"
    )
    return head + markdown_table(headers, rows) + f"\nMean avg@{k} over sets: {100 * summary['avg']:.2f}\n"


def run(cfg: Config, run_dir: Path) -> dict:
    """Evaluate; returns the summary (also written to ``eval/summary.json``)."""
    with open_run_dir(run_dir, cfg):
        model_cfg, checkpoint = resolve_model(cfg)
        sets = {
            s.name: load_eval_set(s, cfg.data.synthetic, cfg.eval.max_problems, cfg.data.on_bad_row)
            for s in cfg.eval.sets
        }
        for name, loaded in sets.items():
            print(
                f"eval set {name}: {len(loaded.records)} problems from {loaded.name}"
                + (f" (skipped {loaded.skipped})" if loaded.skipped else ""),
                flush=True,
            )
        run_cfg = dataclasses.replace(cfg, model=model_cfg)
        place(cfg, roles=("rollout",))
        name = f"atesd-eval-{run_dir.resolve().name}-{int(time.time())}"
        rollouts = rollout_group(run_cfg, name)
        try:
            if checkpoint:
                version = ray.get(rollouts.call("load_checkpoint", str(checkpoint)))[0]
            else:
                ray.get(rollouts.call("ping"))
                version = 0
            results = {}
            for set_name, loaded in sets.items():
                t0 = time.perf_counter()
                records = [dataclasses.asdict(r) for r in loaded.records]
                rows = [
                    r | {"set": set_name}
                    for r in generate_and_grade(rollouts, records, cfg.eval, 0, version, what=set_name)
                ]
                write_rows(run_dir / "eval" / f"{set_name}.jsonl", rows)
                results[set_name] = set_summary(rows, cfg.eval.grade_timeout_s) | {
                    "time_s": time.perf_counter() - t0
                }
        finally:
            rollouts.shutdown()
        k = cfg.eval.samples
        e = cfg.eval
        summary = {
            "model": model_cfg.name,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "trained_by": trained_by(checkpoint),
            "weight_version": version,
            "protocol": {
                "samples": k,
                "temperature": e.temperature,
                "top_p": e.top_p,
                "top_k": e.top_k,
                "max_new_tokens": e.max_new_tokens,
                "thinking": e.thinking,
                "max_problems": e.max_problems,
            },
            "sets": results,
            "avg": sum(s[f"avg@{k}"] for s in results.values()) / len(results),
        }
        (run_dir / "eval" / "summary.json").write_text(json.dumps(summary, indent=2))
        table = eval_markdown(summary)
        (run_dir / "eval" / "summary.md").write_text(table)
        print(table, flush=True)
        return summary
