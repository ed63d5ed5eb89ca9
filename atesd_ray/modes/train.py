"""``mode=train``: data, actors, resume, the step loop, checkpoints, tracking, the final summary.

:func:`run` is the loop, on one screen: draw a batch, run the algorithm's step (``run_step`` in
``atesd_ray/algorithms/base.py``, the step's data flow), stop on a wrong weight sync, evaluate when
due, record, checkpoint when due; after an actor that cannot come back, roll back to the last
checkpoint. The run's state between steps (its actors, the sampler, the last checkpoint, the
rollouts generated a step ahead) is a :class:`Run`. What the run reports as it goes reaches the
tracker and the ``watchers`` (the entry point adds the live page:
``controller.dashboard.live.RunMonitor``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import ray
from omegaconf import OmegaConf

from atesd_ray import algorithms
from atesd_ray.algorithms.base import PROBES, run_step
from atesd_ray.assembly import Actors
from atesd_ray.config import Config
from atesd_ray.data.sampler import EpochSampler
from atesd_ray.evaluation import generate_and_grade, summarize_rows, write_rows
from atesd_ray.faults import Rollback, retrying
from atesd_ray.interrupts import stopped
from atesd_ray.job import RunData, open_run_dir, prepare_data
from atesd_ray.rollout_gap import check_step_gap, check_sync, sync_gap
from atesd_ray.run_summary import fmt_eval, init_provenance, summary_text
from atesd_ray.runtime.checkpoint import (
    PREFETCHED,
    PROBE_ROLLOUTS,
    PROBE_TARGETS,
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


@dataclass
class Run:
    """One training run's state in the driver, from step to step."""

    cfg: Config
    run_dir: Path
    data: RunData
    sampler: EpochSampler
    checkpoints: CheckpointManager
    checkpoint: Path | None  # the last complete one: this run's, or the one it resumed from
    actors: Actors | None = None
    prefetched: list[ray.ObjectRef] | None = None  # the next step's rollouts, generated a step ahead
    probe_rollouts: list[ray.ObjectRef] | None = None  # what probe_kl is measured on
    probe_targets: list[ray.ObjectRef] | None = None  # against these teacher targets
    summary: dict = field(default_factory=dict)
    step: int = 0  # the step training now

    def draw(self) -> list[dict]:
        return [self.data.train[i] for i in self.sampler.next_indices()]

    def launch(self) -> int:
        """Build the actors and bring them to the last checkpoint (or to step 0), with the weights
        synced and checked; returns the step to train next."""
        cfg, run_dir = self.cfg, self.run_dir
        self.actors = algorithms.build_actors(
            cfg,
            cfg.trainer.total_steps,
            name=f"atesd-{run_dir.resolve().name}-{int(time.time())}",
            timeline_path=str(run_dir / "controller_timeline.jsonl"),
            run=run_dir.resolve().name,
        )
        actors = self.actors
        try:
            (run_dir / "topology.json").write_text(json.dumps(actors.placement_report(), indent=2))
            actors.students.set_probe(self.data.probe).get()
            self.sampler.consumed, start, self.prefetched = 0, 0, None
            if self.checkpoint:
                start = self._restore(self.checkpoint)
            actors.weight_sync.sync(version=start).get()
            check_sync(cfg, start, sync_gap(ray.get(actors.weight_sync.verify())), self.checkpoint)
            if "probe_kl" in actors.signals:
                self._set_probe_rollouts()
            probes = [name for name in PROBES if name in actors.signals]
            if start == 0 and probes:
                ray.get(actors.controller.baseline.remote(0, actors.students.probe(probes).ref))
        except BaseException:
            actors.shutdown()
            raise
        return start

    def _set_probe_rollouts(self) -> None:
        """The fixed probe rollouts (the step-0 student's samples of the probe problems, seeded apart
        from every training step's) and the full-exposure step-0 teacher's targets on them: the
        checkpoint's, so that a resume measures against the very targets a live or EMA teacher gave
        at step 0."""
        rollouts, targets = (
            self.checkpoint / n if self.checkpoint else None for n in (PROBE_ROLLOUTS, PROBE_TARGETS)
        )
        if rollouts is not None and rollouts.exists():
            self.probe_rollouts = [ray.put(r) for r in load_rollouts(rollouts)]
        else:
            self.probe_rollouts = [self.actors.rollouts.generate(0, self.data.probe, -1, 0)]
        if targets is not None and targets.exists():
            self.probe_targets = [ray.put(r) for r in load_rollouts(targets)]
        else:  # a new run, or a checkpoint written before the targets were kept
            self.probe_targets = self.actors.teachers.score(self.probe_rollouts, 1.0)
        self.actors.students.set_probe_rollouts(self.probe_rollouts, self.probe_targets).get()

    def _restore(self, checkpoint: Path) -> int:
        """The actors and the sampler at ``checkpoint``, with the next step's rollouts when it holds
        them (one-step-off rollouts); returns its step."""
        state, actors = read_state(checkpoint), self.actors
        actors.students.load(str(checkpoint / "student")).get()
        ray.get(actors.teachers.load(str(checkpoint), state["weight_version"]))
        ray.get(actors.controller.load.remote(str(checkpoint)))
        self.sampler.consumed = state["consumed"]
        held = checkpoint / PREFETCHED
        self.prefetched = [ray.put(r) for r in load_rollouts(held)] if held.exists() else None
        return state["step"]

    def train(self, step: int, batch: list[dict], next_batch: list[dict] | None) -> dict:
        """The algorithm's step, run again after an actor fault (rollouts launched ahead are redone);
        stops the run when its rollouts or its weight sync were not the student's."""
        algorithm, cfg = algorithms.get(self.cfg.algorithm.name), self.cfg
        metrics, self.prefetched = retrying(
            cfg,
            self.actors,
            f"step {step + 1}",
            lambda retry: run_step(
                algorithm, cfg, self.actors, step, batch, next_batch, None if retry else self.prefetched
            ),
            self.checkpoint,
        )
        check_step_gap(cfg, step, metrics, self.checkpoint)
        check_sync(cfg, step + 1, metrics.get("sync_logprob_gap"), self.checkpoint)
        return metrics | {"total_steps": cfg.trainer.total_steps, "epoch": self.sampler.epoch}

    def evaluate(self, done: int) -> dict:
        """Held-out evaluation after ``done`` steps, on weights of version ``done`` (run again after
        an actor fault)."""
        return retrying(
            self.cfg, self.actors, f"eval after step {done}", lambda _: self._evaluate(done), self.checkpoint
        )

    def _evaluate(self, done: int) -> dict:
        cfg, evals = self.cfg, self.data.evals
        records = evals[: cfg.eval.max_problems] if cfg.eval.max_problems else evals
        rows = generate_and_grade(
            self.actors.rollouts, records, cfg.eval, done, done, what=f"held-out at step {done}"
        )
        write_rows(self.run_dir / "eval" / f"step_{done}.jsonl", rows)
        return summarize_rows(rows, cfg.eval.grade_timeout_s)

    def evaluation_due(self, done: int) -> bool:
        e = self.cfg.eval
        periodic = e.every_n_steps and done % e.every_n_steps == 0
        return bool(self.data.evals) and bool(periodic or (done == self.cfg.trainer.total_steps and e.at_end))

    def save(self, done: int, metrics: dict, next_batch: list[dict] | None) -> Path:
        """Checkpoint after ``done`` steps (tried again after an actor fault)."""
        return retrying(
            self.cfg,
            self.actors,
            f"checkpoint {done}",
            lambda _: self._save(done, metrics, next_batch),
            self.checkpoint,
        )

    def _save(self, done: int, metrics: dict, next_batch: list[dict] | None) -> Path:
        """The actors' states, the trainer state and, with
        one-step-off rollouts, the rollouts already generated for the next step, so that a resume
        trains on them as the uninterrupted run does (their weights are gone once the student has
        updated). The batch drawn for the next step is given back, so a resume draws it again."""
        given_back = len(next_batch) if next_batch else 0
        self.sampler.consumed -= given_back
        try:
            tmp = self.checkpoints.begin(done)
            try:
                (tmp / "student").mkdir()
                refs = self.actors.students.save(str(tmp / "student")).refs
                refs += [self.actors.teachers.save(str(tmp)), self.actors.controller.save.remote(str(tmp))]
                ray.get(refs)
                if self.prefetched:
                    save_rollouts(ray.get(self.prefetched), tmp / PREFETCHED)
                if self.probe_rollouts:
                    save_rollouts(ray.get(self.probe_rollouts), tmp / PROBE_ROLLOUTS)
                    save_rollouts(ray.get(self.probe_targets), tmp / PROBE_TARGETS)
            except (OSError, ray.exceptions.RayTaskError) as err:  # a full disk, a quota, a lost mount
                raise self.checkpoints.abandon(done, tmp, err) from err
            state = {
                "step": done,
                "consumed": self.sampler.consumed,
                "weight_version": done,
                "seed": self.cfg.seed,
                "time": time.time(),
                "last_metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
            }
            try:
                self.checkpoint = self.checkpoints.commit(done, tmp, state)
            except OSError as err:
                raise self.checkpoints.abandon(done, tmp, err) from err
        finally:
            self.sampler.consumed += given_back
        return self.checkpoint


def run(cfg: Config, run_dir: Path, watchers: Sequence[Watcher] = ()) -> dict:
    """Train; returns the summary (also written to ``summary.json``). ``watchers`` are told each
    step's metrics once recorded, in the driver (a notebook can plot there; a test can hold the run
    there while it looks at the live page), and the end of the run.

    A step's metrics line is written before its checkpoint: a run killed in between resumes from the
    checkpoint before and rewrites the line, and a line cut short by a kill belongs to a step no
    checkpoint holds yet, so no step's line is lost or written twice."""
    algorithms.check(cfg)
    with open_run_dir(run_dir, cfg, resumes=True) as lock:
        return _train(cfg, run_dir, lock.checkpoint, watchers)


def _train(cfg: Config, run_dir: Path, checkpoint: Path | None, watchers: Sequence[Watcher]) -> dict:
    place(cfg)  # join (or start) the cluster first: a wrong address fails in seconds, before data loading
    data = prepare_data(cfg)
    print(data.summary, flush=True)
    total = cfg.trainer.total_steps
    checkpoints = CheckpointManager(run_dir, cfg.trainer.keep_last)
    r = Run(
        cfg,
        run_dir,
        data,
        EpochSampler(len(data.train), cfg.trainer.prompts_per_step, cfg.seed, cfg.data.shuffle),
        checkpoints,
        checkpoint,
    )
    r.summary = {
        "run_dir": str(run_dir),
        "start_step": read_state(r.checkpoint)["step"] if r.checkpoint else 0,
        "total_steps": total,
        "algorithm": cfg.algorithm.name,
        "model": cfg.model.name,
        "data": data.summary,
        "init": init_provenance(cfg),
    }
    if r.summary["start_step"] >= total:  # said before any actor is built
        print(
            f"run already complete at step {r.summary['start_step']} of {total}: nothing to train "
            f"(raise trainer.total_steps, or start over with resume=never or a new run_dir)",
            flush=True,
        )
        return r.summary
    step = r.launch()
    tracker = None
    try:
        if r.checkpoint:
            print(f"resumed from {r.checkpoint} at step {step}", flush=True)
        config = OmegaConf.to_container(OmegaConf.structured(cfg))
        tracker = Tracker(
            run_dir,
            cfg.tracking.backends,
            cfg.tracking.project,
            cfg.tracking.experiment or run_dir.name,
            config,
            resume_step=step,
        )
        if cfg.eval.at_start and data.evals and step == 0:
            r.summary["eval_before"] = r.evaluate(0)
            print(f"held-out before training: {fmt_eval(r.summary['eval_before'])}", flush=True)
        try:
            return _loop(r, tracker, watchers, step, r.draw())
        except KeyboardInterrupt as err:  # a signal (interrupts.py); Ray may have made it a plain one
            stop = stopped(err)
            stop.where = (
                f"stopped by {stop.signame} at step {r.step + 1} of {total}; the last complete checkpoint is "
                f"{r.checkpoint or 'none yet'}; the same command resumes from it"
            )
            raise stop from None
    finally:
        if sys.exc_info()[0] is not None:
            # the run is stopping: the tasks its teardown cuts short fail as expected, and Ray would
            # print each of them after the run's own message
            os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
        if tracker is not None:
            tracker.close()
        if r.actors is not None:
            r.actors.shutdown()


def _loop(r: Run, tracker: Tracker, watchers: Sequence[Watcher], step: int, batch: list[dict]) -> dict:
    """The step loop, from ``step`` to the end; returns the run's summary."""
    cfg, total, metrics, first, rollbacks = r.cfg, r.cfg.trainer.total_steps, {}, None, 0
    while step < total:
        r.step = step
        try:
            next_batch = r.draw() if step + 1 < total else None
            metrics = r.train(step, batch, next_batch)
            done = step + 1
            if r.evaluation_due(done):
                ev = r.evaluate(done)
                metrics.update({f"eval/{k}": v for k, v in ev.items()})
                print(f"held-out after step {done}: {fmt_eval(ev)}", flush=True)
                if done == total:
                    r.summary["eval_after"] = ev
            tracker.log(step, metrics)
            for watcher in watchers:
                watcher.record(step, metrics)
            if done % cfg.trainer.save_every == 0 or done == total:
                r.save(done, metrics, next_batch)
        except Rollback as fault:
            rollbacks += 1
            if rollbacks > cfg.trainer.fault_retries:
                raise
            r.summary["rollbacks"] = r.summary.get("rollbacks", 0) + 1
            print(f"step {step + 1}: {fault}; rolling back to {r.checkpoint or 'the start'}", flush=True)
            r.actors.shutdown()
            # from this run's last checkpoint (or the one it resumed from): never an older run's
            step = r.launch()
            tracker.rewind(step)
            batch = r.draw()
            continue
        first = first or dict(metrics)
        batch, step, rollbacks = next_batch, step + 1, 0
    for watcher in watchers:
        r.summary.update(watcher.finish())
    r.summary.update(
        final_metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
        checkpoint=str(r.checkpoints.latest()),
    )
    (r.run_dir / "summary.json").write_text(json.dumps(r.summary, indent=2))
    print(summary_text(r.summary, first), flush=True)
    return r.summary
