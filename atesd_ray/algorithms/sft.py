"""SFT (baseline): the student's NLL of the reference solutions after the problem-only prompt.

No rollouts and no teacher: the batch's records go to the student group (one object in the store,
read by every rank); the new weights then reach the rollout actors, so that evaluation during
training sees them. The embedded demo's warm-up trains some references after the privileged teacher
prompt instead (``teacher_prompt_frac``), so that the small model can read a reference afterwards.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import ray

from atesd_ray.algorithms.base import Algorithm, Launched
from atesd_ray.losses import nll_loss
from atesd_ray.objective import Objective, Prepared, Response
from atesd_ray.prompts import encode_chat, teacher_messages
from atesd_ray.sequences import left_pad, right_pad

if TYPE_CHECKING:
    from atesd_ray.assembly import Actors
    from atesd_ray.config import Config
    from atesd_ray.objective import Trainer


class SFTObjective(Objective):
    """The NLL of each reference solution, ended by EOS, summed and divided by the batch's tokens."""

    stats = ("loss",)

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def prepare(self, trainer: Trainer, step: int, records: list[dict]) -> Prepared:
        tokenizer, limit = trainer.tokenizer, self.cfg.algorithm.sft.max_response_tokens
        refs = [
            tokenizer(r["reference"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for r in records
        ]
        p_ids, p_mask = left_pad(self._prompts(trainer, step, records), tokenizer.pad_token_id)
        r_ids, r_mask = right_pad([r[:limit] for r in refs], tokenizer.pad_token_id)
        rows = {"prompt_ids": p_ids, "prompt_mask": p_mask, "response_ids": r_ids, "response_mask": r_mask}
        tokens = float(r_mask.sum())
        info = {
            "tokens": tokens,
            "response_len": tokens / len(records),
            "truncated_frac": sum(len(r) > limit for r in refs) / len(records),
        }
        return Prepared(rows, trainer.world / max(tokens, 1.0), info)

    def _prompts(self, trainer: Trainer, step: int, records: list[dict]) -> list[list[int]]:
        """The student prompt, or for ``teacher_prompt_frac`` of the examples the teacher's
        privileged prompt at a uniform random exposure (seeded by run seed and step)."""
        rng = random.Random(f"sft-prompts/{self.cfg.seed}/{step}")
        frac = self.cfg.algorithm.sft.teacher_prompt_frac
        prompts = []
        for r in records:
            if frac and rng.random() < frac:
                messages = teacher_messages(
                    r["problem"], r["reference"], r["answer"], rng.random(), self.cfg.prompts
                )
                prompts.append(encode_chat(trainer.tokenizer, messages, self.cfg.model.teacher_thinking))
            else:
                prompts += trainer.student_prompts([r["problem"]])
        return prompts

    def loss(self, out: Response, rows: dict, prepared: Prepared) -> tuple:
        loss = nll_loss(out.hidden, out.tokens, project=out.head)
        return loss * prepared.scale, loss.detach()[None]

    def metrics(self, totals: dict[str, float], prepared: Prepared) -> dict:
        tokens = prepared.info["tokens"]
        return prepared.info | {"loss": totals["loss"] / max(tokens, 1.0), "tokens": int(tokens)}


class SFT(Algorithm):
    def objective(self, cfg: Config, signals: frozenset[str]) -> SFTObjective:
        return SFTObjective(cfg)

    def launch(
        self, cfg: Config, actors: Actors, step: int, batch: list[dict], rollouts: list[ray.ObjectRef] | None
    ) -> Launched:
        return Launched(actors.students.train_step(step, ray.put(batch)))


ALGORITHMS = (SFT("sft"),)
