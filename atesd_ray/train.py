"""``mode=train``: data, actors, resume, the step loop, checkpoints, tracking, the final summary."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import ray
from omegaconf import OmegaConf

from atesd_ray.algorithms.distill import distill_step
from atesd_ray.algorithms.grpo import grpo_step
from atesd_ray.algorithms.motab_step import motab_step
from atesd_ray.algorithms.sft import sft_step
from atesd_ray.config import Config
from atesd_ray.data.loaders import load_data
from atesd_ray.data.sampler import EpochSampler
from atesd_ray.evaluation import generate_and_grade, summarize_rows, write_rows
from atesd_ray.models import load_tokenizer, pretrained_path
from atesd_ray.prompts import render_chat, student_messages, teacher_messages
from atesd_ray.runtime.actors import Actors, build_actors
from atesd_ray.runtime.checkpoint import (
    PREFETCHED,
    CheckpointManager,
    load_rollouts,
    read_state,
    save_rollouts,
)
from atesd_ray.runtime.cluster import connect
from atesd_ray.runtime.faults import Rollback, retrying
from atesd_ray.tracking import Tracker
from controller.dashboard.live import RunMonitor

log = logging.getLogger(__name__)

STEP_FUNCTIONS = {
    "opsd": distill_step,
    "fixed_exposure": distill_step,
    "atesd": distill_step,
    "motab": motab_step,
    "skd": motab_step,
    "sft": sft_step,
    "grpo": grpo_step,
}


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
class Prepared:
    train: list[dict]
    evals: list[dict]
    probe: list[dict]
    too_long: int
    summary: str


def prepare_data(cfg: Config) -> Prepared:
    """Load the records and drop (and count) problems whose longest prompt exceeds the limit:
    a prompt is never silently cut."""
    train, evals, report = load_data(cfg.data, cfg.seed)
    pretrained_path(cfg.model)  # a local model folder that cannot load fails here, naming its file
    tokenizer = load_tokenizer(cfg.model)
    limit = cfg.model.max_prompt_tokens

    def fits(r) -> bool:
        student = render_chat(tokenizer, student_messages(r.problem, cfg.prompts), cfg.model.student_thinking)
        teacher = render_chat(
            tokenizer,
            teacher_messages(r.problem, r.reference, r.answer, 1.0, cfg.prompts),
            cfg.model.teacher_thinking,
        )
        return (
            max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (student, teacher)) <= limit
        )

    kept = [dataclasses.asdict(r) for r in train if fits(r)]
    too_long = len(train) - len(kept)
    if not kept:
        raise ValueError(f"every training prompt exceeds model.max_prompt_tokens={limit}")
    held = [dataclasses.asdict(r) for r in evals if fits(r)]
    summary = report.summary() + (
        f"; {too_long} train prompts over {limit} tokens skipped" if too_long else ""
    )
    return Prepared(kept, held, held[: cfg.data.probe_size], too_long, summary)


def _evaluate(
    cfg: Config, actors: Actors, records: list[dict], run_dir: Path, step: int, version: int
) -> dict:
    records = records[: cfg.eval.max_problems] if cfg.eval.max_problems else records
    rows = generate_and_grade(
        actors.rollouts, records, cfg.eval, step, version, what=f"held-out at step {step}"
    )
    summary = summarize_rows(rows, cfg.eval.grade_timeout_s)
    write_rows(run_dir / "eval" / f"step_{step}.jsonl", rows)
    return summary


def _save(
    cfg: Config,
    actors: Actors,
    ckpts: CheckpointManager,
    step: int,
    sampler: EpochSampler,
    metrics: dict,
    prefetched: list[ray.ObjectRef] | None,
) -> Path:
    """Checkpoint ``step``: the actors' states, the trainer state and, with one-step-off rollouts,
    the rollouts already generated for the next step, so that a resume trains on them as the
    uninterrupted run does (its weights are gone once the student has updated)."""
    tmp = ckpts.begin(step)
    try:
        (tmp / "student").mkdir()
        refs = actors.students.call("save", str(tmp / "student"))
        refs += [actors.teachers.actors[0].save.remote(str(tmp))]
        refs += [actors.controller.save.remote(str(tmp))]
        ray.get(refs)
        if prefetched:
            save_rollouts(ray.get(prefetched), tmp / PREFETCHED)
    except (OSError, ray.exceptions.RayTaskError) as err:  # a full disk, a quota, a lost mount
        raise ckpts.abandon(step, tmp, err) from err
    state = {
        "step": step,
        "consumed": sampler.consumed,
        "weight_version": step,
        "seed": cfg.seed,
        "time": time.time(),
        "last_metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
    }
    try:
        return ckpts.commit(step, tmp, state)
    except OSError as err:
        raise ckpts.abandon(step, tmp, err) from err


def _restore(
    actors: Actors, checkpoint: Path, sampler: EpochSampler
) -> tuple[int, list[ray.ObjectRef] | None]:
    """Bring the actors and the sampler to ``checkpoint``; returns its step and the next step's
    rollouts when the checkpoint holds them (one-step-off rollouts)."""
    state = read_state(checkpoint)
    ray.get(actors.students.call("load", str(checkpoint / "student")))
    ray.get(actors.teachers.call("load", str(checkpoint), state["weight_version"]))
    ray.get(actors.controller.load.remote(str(checkpoint)))
    sampler.consumed = state["consumed"]
    held = checkpoint / PREFETCHED
    prefetched = [ray.put(r) for r in load_rollouts(held)] if held.exists() else None
    return state["step"], prefetched


def _launch(
    cfg: Config, run_dir: Path, data: Prepared, sampler: EpochSampler, checkpoint: Path | None
) -> tuple[Actors, int, list[ray.ObjectRef] | None]:
    """Build the run's actors and bring them to ``checkpoint`` (or to step 0); returns them, the
    step to train next and the rollouts the checkpoint holds for it, if any."""
    timeline = str(run_dir / "controller_timeline.jsonl") if cfg.controller.scores_decisions else None
    actors = build_actors(
        cfg,
        cfg.trainer.total_steps,
        name=f"atesd-{run_dir.resolve().name}-{int(time.time())}",
        timeline_path=timeline,
        run=run_dir.resolve().name,
    )
    try:
        (run_dir / "topology.json").write_text(json.dumps(actors.placement_report(), indent=2))
        ray.get(actors.students.call("set_probe", data.probe))
        sampler.consumed = 0
        start, prefetched = _restore(actors, checkpoint, sampler) if checkpoint else (0, None)
        ray.get(actors.weight_sync.sync(version=start))
        if start == 0:
            ray.get(actors.controller.baseline.remote(0, actors.students.call("probe_nll")[0]))
    except BaseException:
        actors.shutdown()
        raise
    return actors, start, prefetched


def _step(
    cfg: Config,
    actors: Actors,
    step_fn,
    step: int,
    batch: list[dict],
    next_batch: list[dict] | None,
    prefetched: list | None,
) -> tuple[dict, list | None]:
    """``step_fn`` on ``step``, run again after an actor fault (rollouts launched ahead are redone)."""
    return retrying(
        cfg,
        actors,
        f"step {step}",
        lambda retry: step_fn(cfg, actors, step, batch, next_batch, None if retry else prefetched),
    )


def _after_step(
    cfg: Config,
    actors: Actors,
    data: Prepared,
    run_dir: Path,
    ckpts: CheckpointManager,
    sampler: EpochSampler,
    step: int,
    next_batch: list[dict] | None,
    prefetched: list[ray.ObjectRef] | None,
    metrics: dict,
    summary: dict,
    record: Callable[[dict], None],
) -> Path | None:
    """The held-out evaluation due after ``step``, then ``record`` (the step's metrics line), then
    the checkpoint due (eval and checkpoint each retried after an actor fault); returns the
    checkpoint written, if one was due.

    The line is written before the checkpoint: a run killed in between resumes from the checkpoint
    before and rewrites the line, and a line cut short by a kill belongs to a step no checkpoint
    holds yet, so no step's line is lost or written twice."""
    done, total = step + 1, cfg.trainer.total_steps
    periodic = cfg.eval.every_n_steps and done % cfg.eval.every_n_steps == 0
    if data.evals and (periodic or (done == total and cfg.eval.at_end)):
        ev = retrying(
            cfg,
            actors,
            f"eval after step {done}",
            lambda _: _evaluate(cfg, actors, data.evals, run_dir, done, done),
        )
        metrics.update({f"eval/{k}": v for k, v in ev.items()})
        print(f"held-out after step {done}: {_fmt_eval(ev)}", flush=True)
        if done == total:
            summary["eval_after"] = ev
    record(metrics)
    if done % cfg.trainer.save_every == 0 or done == total:
        # the batch drawn for the next step is given back, so a resume draws it again
        given_back = len(next_batch) if next_batch else 0
        sampler.consumed -= given_back
        saved = retrying(
            cfg,
            actors,
            f"checkpoint {done}",
            lambda _: _save(cfg, actors, ckpts, done, sampler, metrics, prefetched),
        )
        sampler.consumed += given_back
        return saved
    return None


def run(cfg: Config, run_dir: Path, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train; returns the summary (also written to ``summary.json``). ``on_step(step, metrics)``
    is called in the driver once each step's metrics are recorded (a notebook can plot there; a
    test can hold the run there while it looks at the live page)."""
    prepare_run_dir(run_dir, cfg)
    # join (or start) the cluster first: a wrong address fails in seconds, before data loading
    connect(
        cfg.cluster,
        needed_cpus=cfg.trainer.ranks * cfg.cluster.student.cpus
        + cfg.rollout.replicas * cfg.cluster.rollout.cpus
        + cfg.teacher.replicas * cfg.cluster.teacher.cpus,
    )
    data = prepare_data(cfg)
    print(data.summary, flush=True)
    total = cfg.trainer.total_steps
    sampler = EpochSampler(len(data.train), cfg.trainer.prompts_per_step, cfg.seed, cfg.data.shuffle)
    ckpts = CheckpointManager(run_dir, cfg.trainer.keep_last)
    checkpoint = ckpts.resolve(cfg.resume)
    summary: dict = {
        "run_dir": str(run_dir),
        "start_step": read_state(checkpoint)["step"] if checkpoint else 0,
        "total_steps": total,
        "algorithm": cfg.algorithm.name,
        "model": cfg.model.name,
        "data": data.summary,
        "init": init_provenance(cfg),
    }
    if summary["start_step"] >= total:  # said before any actor is built
        print(
            f"run already complete at step {summary['start_step']} of {total}: nothing to train "
            f"(raise trainer.total_steps, or start over with resume=never or a new run_dir)",
            flush=True,
        )
        return summary
    actors, start, held = _launch(cfg, run_dir, data, sampler, checkpoint)
    tracker = monitor = None
    try:
        monitor = RunMonitor(cfg, run_dir)
        summary["dashboard"] = monitor.url
        if checkpoint:
            print(f"resumed from {checkpoint} at step {start}", flush=True)
        tracker = Tracker(
            run_dir,
            cfg.tracking.backends,
            cfg.tracking.project,
            cfg.tracking.experiment or run_dir.name,
            OmegaConf.to_container(OmegaConf.structured(cfg)),
            resume_step=start,
        )
        if cfg.eval.at_start and data.evals and start == 0:
            summary["eval_before"] = _evaluate(cfg, actors, data.evals, run_dir, 0, start)
            print(f"held-out before training: {_fmt_eval(summary['eval_before'])}", flush=True)
        step_fn = STEP_FUNCTIONS[cfg.algorithm.name]
        records = data.train
        batch = [records[i] for i in sampler.next_indices()]
        prefetched, metrics, first_metrics = held, {}, None
        step, rollbacks = start, 0

        def record(metrics: dict) -> None:
            tracker.log(step, metrics)
            monitor.record(step, metrics)
            if on_step is not None:
                on_step(step, metrics)

        while step < total:
            try:
                next_batch = [records[i] for i in sampler.next_indices()] if step + 1 < total else None
                metrics, prefetched = _step(cfg, actors, step_fn, step, batch, next_batch, prefetched)
                metrics.update(total_steps=total, epoch=sampler.epoch)
                checkpoint = (
                    _after_step(
                        cfg,
                        actors,
                        data,
                        run_dir,
                        ckpts,
                        sampler,
                        step,
                        next_batch,
                        prefetched,
                        metrics,
                        summary,
                        record,
                    )
                    or checkpoint
                )
            except Rollback as fault:
                rollbacks += 1
                if rollbacks > cfg.trainer.fault_retries:
                    raise
                summary["rollbacks"] = summary.get("rollbacks", 0) + 1
                print(f"step {step}: {fault}; rolling back to {checkpoint or 'the start'}", flush=True)
                actors.shutdown()
                # this run's last checkpoint (or the one it resumed from): never one an older run left
                actors, step, prefetched = _launch(cfg, run_dir, data, sampler, checkpoint)
                tracker.rewind(step)
                batch = [records[i] for i in sampler.next_indices()]
                continue
            first_metrics = first_metrics or dict(metrics)
            batch, step, rollbacks = next_batch, step + 1, 0
        monitor.render()
        summary.update(
            final_metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
            checkpoint=str(ckpts.latest()),
        )
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(summary_text(summary, first_metrics), flush=True)
        return summary
    finally:
        if tracker is not None:
            tracker.close()
        if monitor is not None:
            monitor.close()
        actors.shutdown()


def _fmt_eval(summary: dict) -> str:
    k = summary["k"]
    lo, hi = summary.get(f"avg@{k}_ci95", (None, None))
    interval = f" (95% CI {lo:.3f}-{hi:.3f})" if lo is not None else ""
    return f"avg@{k}={summary[f'avg@{k}']:.3f}{interval} over {summary['n_problems']} problems"


def init_provenance(cfg: Config) -> dict | None:
    """Where a model loaded from a run directory came from (``model.path=<run>``): that run's
    algorithm, steps and held-out accuracy before it trained."""
    if cfg.model.source != "path" or not (Path(cfg.model.path) / "summary.json").is_file():
        return None
    earlier = json.loads((Path(cfg.model.path) / "summary.json").read_text())
    keep = ("run_dir", "algorithm", "total_steps", "eval_before", "eval_after")
    return {k: earlier[k] for k in keep if k in earlier}


def _decision_lines(timeline: Path) -> list[str]:
    """One line per controller decision: its steps, α, and reward (with G_lp and G_gt) once scored."""
    if not timeline.is_file():
        return []
    lines = []
    for row in map(json.loads, timeline.read_text().splitlines()):
        steps = f"steps {row['first_step'] + 1}-{row['last_step'] + 1}"
        scored = row["status"] != "open"
        reward = (
            f"reward {row['reward']:+.4f} (G_lp {row['g_lp']:+.4f}, G_gt {row['g_gt']:+.3f})"
            if scored
            else "not scored yet (its look-ahead runs past the last step)"
        )
        lines.append(f"  decision {row['decision']}: {steps}, alpha={row['alpha']:.3f}, {reward}")
    return lines


def summary_text(summary: dict, first: dict | None) -> str:
    """The end-of-run block: what changed, what the controller chose, where the run lives, how to
    continue it."""
    last = summary.get("final_metrics", {})
    lines = [
        "",
        "=" * 72,
        f"{summary['algorithm']} on {summary['model']}: steps {summary['start_step']}..{summary['total_steps']}",
    ]
    init = summary.get("init")
    if init:
        lines.append(f"started from:   {init['run_dir']} ({init['algorithm']}, {init['total_steps']} steps)")
        if "eval_before" in init:
            lines.append(f"held-out accuracy before {init['algorithm']}: {_fmt_eval(init['eval_before'])}")
    if "eval_before" in summary:
        lines.append(f"held-out accuracy before: {_fmt_eval(summary['eval_before'])}")
    if "eval_after" in summary:
        lines.append(f"held-out accuracy after:  {_fmt_eval(summary['eval_after'])}")
    if first:
        for key in ("loss", "mismatch_kl", "probe_nll", "accuracy"):
            if key in first and key in last:
                lines.append(f"{key:>12}: {first[key]:.4f} (first step) -> {last[key]:.4f} (last step)")
    run_dir = Path(summary["run_dir"])
    decisions = _decision_lines(run_dir / "controller_timeline.jsonl")
    if decisions:
        lines += ["controller decisions (controller_timeline.jsonl):", *decisions]
    if summary.get("dashboard"):
        lines.append(
            f"live page:     {summary['dashboard']}  (python -m controller.dashboard {run_dir} after the run)"
        )
    lines += [
        f"run directory: {run_dir}  (metrics.jsonl, tensorboard/, checkpoints/ with huggingface/ folders, summary.json)",
        f"continue it:   atesd-ray <same overrides> run_dir={run_dir} trainer.total_steps=<more> (resume=auto is the default)",
        "=" * 72,
    ]
    return "\n".join(lines)
