"""``mode=train``: data, actors, resume, the step loop, checkpoints, tracking, the final summary.

Each step is the algorithm's (``atesd_ray/algorithms/``), run by ``run_step`` and retried after an
actor fault (``runtime/faults.py``); what the run reports as it goes reaches the tracker and the
``watchers`` (the entry point adds the live page: ``controller.dashboard.live.RunMonitor``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import ray
from omegaconf import OmegaConf

from atesd_ray import algorithms
from atesd_ray.algorithms import build_actors
from atesd_ray.algorithms.base import run_step
from atesd_ray.assembly import Actors
from atesd_ray.config import Config
from atesd_ray.data.sampler import EpochSampler
from atesd_ray.evaluation import generate_and_grade, summarize_rows, write_rows
from atesd_ray.faults import Rollback, retrying
from atesd_ray.job import RunData, prepare_data, prepare_run_dir
from atesd_ray.rollout_gap import check_step_gap, check_sync, sync_gap
from atesd_ray.run_summary import fmt_eval, init_provenance, summary_text
from atesd_ray.runtime.checkpoint import (
    PREFETCHED,
    CheckpointManager,
    load_rollouts,
    read_state,
    save_rollouts,
)
from atesd_ray.runtime.cluster import place
from atesd_ray.tracking import Tracker


class Watcher(Protocol):
    """Told about the run as it trains: each step's metrics once recorded, and the end."""

    def record(self, step: int, metrics: dict) -> None: ...

    def finish(self) -> dict:
        """After the last step; returns what it adds to the run's summary."""
        ...


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
        refs = actors.students.save(str(tmp / "student")).refs
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
    actors.students.load(str(checkpoint / "student")).get()
    ray.get(actors.teachers.load(str(checkpoint), state["weight_version"]))
    ray.get(actors.controller.load.remote(str(checkpoint)))
    sampler.consumed = state["consumed"]
    held = checkpoint / PREFETCHED
    prefetched = [ray.put(r) for r in load_rollouts(held)] if held.exists() else None
    return state["step"], prefetched


def _launch(
    cfg: Config, run_dir: Path, data: RunData, sampler: EpochSampler, checkpoint: Path | None
) -> tuple[Actors, int, list[ray.ObjectRef] | None]:
    """Build the run's actors and bring them to ``checkpoint`` (or to step 0); returns them, the
    step to train next and the rollouts the checkpoint holds for it, if any."""
    actors = build_actors(
        cfg,
        cfg.trainer.total_steps,
        name=f"atesd-{run_dir.resolve().name}-{int(time.time())}",
        timeline_path=str(run_dir / "controller_timeline.jsonl"),
        run=run_dir.resolve().name,
    )
    try:
        (run_dir / "topology.json").write_text(json.dumps(actors.placement_report(), indent=2))
        actors.students.set_probe(data.probe).get()
        sampler.consumed = 0
        start, prefetched = _restore(actors, checkpoint, sampler) if checkpoint else (0, None)
        actors.weight_sync.sync(version=start).get()
        check_sync(cfg, start, sync_gap(ray.get(actors.weight_sync.verify())), checkpoint)
        if start == 0 and "probe_nll" in actors.signals:
            ray.get(actors.controller.baseline.remote(0, actors.students.probe_nll().ref))
    except BaseException:
        actors.shutdown()
        raise
    return actors, start, prefetched


def _step(
    cfg: Config,
    actors: Actors,
    step: int,
    batch: list[dict],
    next_batch: list[dict] | None,
    prefetched: list | None,
) -> tuple[dict, list | None]:
    """The algorithm's step ``step``, run again after an actor fault (rollouts launched ahead are redone)."""
    algorithm = algorithms.get(cfg.algorithm.name)
    return retrying(
        cfg,
        actors,
        f"step {step}",
        lambda retry: run_step(
            algorithm, cfg, actors, step, batch, next_batch, None if retry else prefetched
        ),
    )


def _after_step(
    cfg: Config,
    actors: Actors,
    data: RunData,
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
        print(f"held-out after step {done}: {fmt_eval(ev)}", flush=True)
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


def run(cfg: Config, run_dir: Path, watchers: Sequence[Watcher] = ()) -> dict:
    """Train; returns the summary (also written to ``summary.json``). ``watchers`` are told each
    step's metrics once recorded, in the driver (a notebook can plot there; a test can hold the run
    there while it looks at the live page), and the end of the run."""
    algorithms.check(cfg)
    prepare_run_dir(run_dir, cfg)
    # join (or start) the cluster first: a wrong address fails in seconds, before data loading
    place(cfg)
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
    tracker = None
    try:
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
            print(f"held-out before training: {fmt_eval(summary['eval_before'])}", flush=True)
        records = data.train
        batch = [records[i] for i in sampler.next_indices()]
        prefetched, metrics, first_metrics = held, {}, None
        step, rollbacks = start, 0

        def record(metrics: dict) -> None:
            tracker.log(step, metrics)
            for watcher in watchers:
                watcher.record(step, metrics)

        while step < total:
            try:
                next_batch = [records[i] for i in sampler.next_indices()] if step + 1 < total else None
                metrics, prefetched = _step(cfg, actors, step, batch, next_batch, prefetched)
                check_step_gap(cfg, step, metrics, checkpoint)
                check_sync(cfg, step + 1, metrics.get("sync_logprob_gap"), checkpoint)
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
        for watcher in watchers:
            summary.update(watcher.finish())
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
        actors.shutdown()
