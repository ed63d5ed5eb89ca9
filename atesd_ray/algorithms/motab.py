"""MOTAB and SKD on-policy (DESIGN §5b): step-wise monitored rollouts, then distillation on the
student's accepted steps and a teacher-forced NLL on the teacher's tokens.

exposure (controller) -> monitored rollouts (``atesd_ray/monitored.py``; the rules are
``atesd_ray/trajectories.py``) -> targets as training rows -> teacher scoring -> student update.
The self-teacher's exposure comes from the controller actor, so ``controller.kind=atesd`` drives
MOTAB's teacher as it drives ATESD's; ``teacher.model=<preset>`` is a separate teacher instead.
A Ray task runs the rounds, grades the trajectories and builds the rows (one chunk per teacher
replica); the driver passes its refs on, as for every algorithm. Offline synthesis of the same
trajectories is ``mode=motab_synthesize`` (``atesd_ray/motab_synthesize.py``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import ray
import torch

from atesd_ray.algorithms.base import Algorithm, Launched
from atesd_ray.grading import Grade, grade_many
from atesd_ray.losses import DistillStats, distill_loss, nll_loss
from atesd_ray.models import load_tokenizer, tokenizer_path
from atesd_ray.monitored import monitored_rollouts
from atesd_ray.objective import (
    ROLLOUT_KEYS,
    TEACHER_KEYS,
    Objective,
    Prepared,
    Response,
    fetch,
    rollout_metrics,
    take,
    teacher_metrics,
    teacher_targets,
)
from atesd_ray.prompts import encode_chat, student_messages
from atesd_ray.rollout_batch import rollout_batch
from atesd_ray.runtime.cluster import ActorGroup, split_evenly
from atesd_ray.schema import require
from atesd_ray.trajectories import Trajectory, summarize

if TYPE_CHECKING:
    from verl import DataProto

    from atesd_ray.assembly import Actors
    from atesd_ray.config import Config, LossConfig, ModelConfig, MotabConfig
    from atesd_ray.objective import Trainer

ROLES = ("distill", "nll")


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(model: ModelConfig):
    """The student's tokenizer, loaded once per process."""
    path = tokenizer_path(model)
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = load_tokenizer(model)
    return _TOKENIZERS[path]


def training_rows(
    cfg: Config, trajectories: list[Trajectory], tokenizer, grades: list[Grade], meta: dict
) -> DataProto:
    """The trajectories as a rollout batch (``atesd_ray/rollout_batch.py``): their targets after the
    student's problem-only prompt, with per-token loss masks ``distill_mask`` / ``nll_mask`` (see
    :meth:`Trajectory.segments`). They carry no rollout log-probs: the teacher wrote part of them."""
    prompts, responses, masks = [], [], {role: [] for role in ROLES}
    for t in trajectories:
        messages = student_messages(t.record["problem"], cfg.prompts)
        prompts.append(encode_chat(tokenizer, messages, cfg.model.student_thinking))
        revise_ids = tokenizer(t.revise(cfg.prompts.revise_phrase), add_special_tokens=False)["input_ids"]
        pieces = t.segments(revise_ids, tokenizer.eos_token_id)
        responses.append([i for ids, _ in pieces for i in ids])
        for role in ROLES:
            masks[role].append([int(r == role) for ids, r in pieces for _ in ids])
    return rollout_batch(
        records=[t.record for t in trajectories],
        samples=[t.sample for t in trajectories],
        prompts=prompts,
        responses=responses,
        pad_id=tokenizer.pad_token_id,
        finish_reasons=["stop" if t.ends_with_eos else "length" for t in trajectories],
        texts=[t.text(cfg.prompts.revise_phrase) for t in trajectories],
        grades=grades,
        meta=meta,
        masks={f"{role}_mask": rows for role, rows in masks.items()},
    )


def monitored_batch(
    cfg: Config,
    rollouts: ActorGroup,
    teachers: ActorGroup,
    records: list[dict],
    alpha: float | dict[str, float],
    step: int,
    chunks: int,
) -> list:
    """One step's monitored rollouts as training rows, in ``chunks`` chunks of one width, then a
    summary of the trajectories: run as a Ray task (``Monitored.launch``), so the rounds, the
    grading and the rows stay off the driver, which passes refs."""
    t0 = time.perf_counter()
    trajectories = monitored_rollouts(cfg, rollouts, teachers, records, alpha, step, min_version=step)
    meta = {"weight_version": step, "step": step, "time_s": time.perf_counter() - t0}
    grades = grade_many(
        [t.text(cfg.prompts.revise_phrase) for t in trajectories],
        [str(t.record["answer"]) for t in trajectories],
        cfg.eval.grade_timeout_s,
    )
    full = training_rows(cfg, trajectories, _tokenizer(cfg.model), grades, meta)
    summary = {k: v for k, v in summarize(trajectories).items() if k != "trajectories"}
    return [full[chunk] for chunk in split_evenly(list(range(len(full))), chunks)] + [summary]


def distill_and_nll(out: Response, rows: dict, loss: LossConfig) -> tuple:
    """The two sums apart: the distillation loss at the ``distill_mask`` positions (the teacher's
    targets there) and the NLL at the ``nll_mask`` positions; statistics: the distillation part's
    :class:`DistillStats`, then the NLL sum and its token count."""
    on_distill = rows["distill_mask"].bool()
    on_nll = rows["nll_mask"].bool()[out.valid]
    targets = teacher_targets(rows, on_distill)
    distill, stats = distill_loss(
        out.hidden[on_distill[out.valid]],
        targets,
        loss,
        tokens=out.tokens[on_distill[out.valid]],
        project=out.head,
    )
    nll = nll_loss(out.hidden[on_nll], out.tokens[on_nll], project=out.head)
    extra = torch.stack([nll.detach().double(), on_nll.sum().double()]).to(stats.loss.device)
    return distill, nll, torch.cat([stats.as_tensor(), extra])


class DistillNLLObjective(Objective):
    """``prefix_weight`` x the distillation loss at the student's accepted steps plus
    ``suffix_weight`` x the teacher-forced NLL of teacher-written tokens, both summed and divided by
    the number of those tokens over the whole batch."""

    stats = (*DistillStats.FIELDS, "nll", "nll_tokens")

    def __init__(self, loss: LossConfig, settings: MotabConfig):
        self.loss_cfg = loss
        self.settings = settings

    def prepare(self, trainer: Trainer, step: int, rollout_refs: list, teacher_refs: list) -> Prepared:
        rollout, rollout_meta = fetch(rollout_refs)
        teacher, teacher_meta = fetch(teacher_refs)
        tokens = trainer.total_over_ranks(rollout.batch["distill_mask"] + rollout.batch["nll_mask"])
        info = rollout_metrics(step, rollout, rollout_meta) | teacher_metrics(teacher, teacher_meta)
        info["tokens"] = tokens
        rows = take(rollout, ROLLOUT_KEYS + ("distill_mask", "nll_mask")) | take(teacher, TEACHER_KEYS)
        return Prepared(rows, trainer.world / max(tokens, 1.0), info)

    def loss(self, out: Response, rows: dict, prepared: Prepared) -> tuple:
        distill, nll, stats = distill_and_nll(out, rows, self.loss_cfg)
        weighted = self.settings.prefix_weight * distill + self.settings.suffix_weight * nll
        return weighted * prepared.scale, stats

    def metrics(self, totals: dict[str, float], prepared: Prepared) -> dict:
        m, tokens = self.settings, prepared.info["tokens"]
        prefix = DistillStats.from_tensor(torch.tensor([totals[f] for f in DistillStats.FIELDS])).means()
        return prepared.info | {
            "loss": (m.prefix_weight * totals["loss"] + m.suffix_weight * totals["nll"]) / max(tokens, 1.0),
            "mismatch_kl": prefix["mismatch_kl"],
            "top1_disagree": prefix["top1_disagree"],
            "confidence": prefix["confidence"],
            "distill_loss": prefix["loss"],
            "teacher_nll": totals["nll"] / max(totals["nll_tokens"], 1.0),
            "distill_tokens": int(totals["tokens"]),
            "nll_tokens": int(totals["nll_tokens"]),
            "tokens": int(tokens),
        }


class Monitored(Algorithm):
    """``motab``: MOTAB's entropy-adaptive gate with one rewind and teacher takeover per
    trajectory; ``skd``: the teacher rewrites each step it rejects. No rollouts ahead: a round
    needs the last one's decisions."""

    stepwise = True

    def check(self, cfg: Config) -> None:
        require(
            cfg.controller.granularity == "batch",
            "controller.granularity",
            f"algorithm={self.name} takes one exposure per batch; got {cfg.controller.granularity}",
        )
        require(
            cfg.teacher_engine != "vllm",
            "teacher.engine",
            f"algorithm={self.name} asks the teacher for step values and continuations, which "
            "the vLLM scorer does not give; use teacher.engine=hf",
        )

    def objective(self, cfg: Config, signals: frozenset[str]) -> DistillNLLObjective:
        return DistillNLLObjective(cfg.algorithm.loss, cfg.algorithm.motab)

    def launch(
        self, cfg: Config, actors: Actors, step: int, batch: list[dict], rollouts: list[ray.ObjectRef] | None
    ) -> Launched:
        alpha = actors.controller.exposure.remote(step)
        # one chunk per teacher replica (or student rank), all of one width
        chunks = max(len(actors.teachers), len(actors.students))
        task = ray.remote(num_cpus=0)(monitored_batch).options(num_returns=chunks + 1)
        *rows, summary = task.remote(cfg, actors.rollouts, actors.teachers, batch, alpha, step, chunks)
        scored = actors.teachers.score(rows, alpha)
        return Launched(actors.students.train_step(step, rows, scored), alpha, summary)


ALGORITHMS = (Monitored("motab"), Monitored("skd"))
