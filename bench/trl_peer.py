"""TRL's trainers on the bench workload: the peers for (c).

``GKDTrainer``: on-policy (``lmbda=1``), forward KL (``beta=0``), the same model as student and as teacher (a
frozen copy), temperature 1, the same prompts and ``max_new_tokens``. TRL's teacher scores the
sequence the student generated, so it sees the student's problem-only prompt: GKD has no place
for a privileged prompt. One step is what ``Trainer``'s inner loop does per batch:
``training_step`` (generate, teacher and student forward, loss, backward), gradient clipping,
``optimizer.step``, ``lr_scheduler.step``, ``zero_grad``; the loop's logging is left out.

``DistillationTrainer`` (TRL's maintained on-policy distillation trainer): the same settings
(``beta=0``: forward KL; generation with transformers, as ours uses the HF engine), the same step.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time

import torch

from atesd_ray.config import Config
from atesd_ray.models import load_model, load_tokenizer
from atesd_ray.prompts import student_messages


def trl_version() -> str | None:
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


class TRLStep:
    """One TRL trainer on the bench workload, driven one step at a time: the student and a frozen
    copy as teacher, the run's lr, clipping, seed and temperature, ``max_steps`` for the schedule."""

    def __init__(self, cfg: Config, batch: list[dict]):
        from datasets import Dataset

        self.tokenizer = load_tokenizer(cfg.model)
        student = load_model(cfg.model, vocab_size=len(self.tokenizer))
        teacher = copy.deepcopy(student).eval().requires_grad_(False)
        self.examples = self.dataset(cfg, batch)
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-trl-")
        common = {
            "output_dir": self.tmp.name,
            "per_device_train_batch_size": len(batch),
            "learning_rate": cfg.trainer.lr,
            "max_grad_norm": cfg.trainer.grad_clip,
            "beta": 0.0,
            "temperature": cfg.rollout.temperature,
            "max_steps": 1000,
            "use_cpu": True,
            "report_to": [],
            "save_strategy": "no",
            "seed": cfg.seed,
        }
        config_cls, trainer_cls, own = self.trainer_classes(cfg)
        args = config_cls(**common, **own)
        self.trainer = trainer_cls(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=Dataset.from_list(self.examples),
            processing_class=self.tokenizer,
        )
        self.trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
        self.trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which is not run
        self.max_grad_norm = args.max_grad_norm

    def dataset(self, cfg: Config, batch: list[dict]) -> list[dict]:
        raise NotImplementedError

    def trainer_classes(self, cfg: Config) -> tuple[type, type, dict]:
        """The trainer's config class, trainer class, and its own settings."""
        raise NotImplementedError

    def training_step(self) -> tuple[torch.Tensor, int]:
        """``Trainer.training_step`` on the batch (generation, teacher, loss, backward); the loss and
        the completion tokens it trained on."""
        raise NotImplementedError

    def run(self) -> dict:
        trainer = self.trainer
        model = trainer.model
        t0 = time.perf_counter()
        loss, tokens = self.training_step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
        return {"step_time_s": time.perf_counter() - t0, "tokens": tokens, "loss": float(loss)}

    def close(self) -> None:
        self.tmp.cleanup()


class TRLGKDStep(TRLStep):
    def dataset(self, cfg: Config, batch: list[dict]) -> list[dict]:
        return [
            {
                "messages": student_messages(r["problem"], cfg.prompts)
                + [{"role": "assistant", "content": r["reference"]}]
            }
            for r in batch
        ]

    def trainer_classes(self, cfg: Config) -> tuple[type, type, dict]:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        return GKDConfig, GKDTrainer, {"lmbda": 1.0, "max_new_tokens": cfg.rollout.max_new_tokens}

    def training_step(self) -> tuple[torch.Tensor, int]:
        collated = self.trainer.data_collator(self.examples)
        loss = self.trainer.training_step(self.trainer.model, collated)
        return loss, int((collated["labels"] != -100).sum())


class TRLDistillationStep(TRLStep):
    def dataset(self, cfg: Config, batch: list[dict]) -> list[dict]:
        return [{"prompt": student_messages(r["problem"], cfg.prompts)} for r in batch]

    def trainer_classes(self, cfg: Config) -> tuple[type, type, dict]:
        from trl import DistillationConfig, DistillationTrainer

        own = {"top_p": 1.0, "top_k": 0, "max_completion_length": cfg.rollout.max_new_tokens}
        return DistillationConfig, DistillationTrainer, own

    def training_step(self) -> tuple[torch.Tensor, int]:
        loss = self.trainer.training_step(self.trainer.model, list(self.examples), None)
        return loss, int(self.trainer._buffered_inputs[0]["completion_mask"].sum())


PEERS = {"trl_gkd": TRLGKDStep, "trl_distillation": TRLDistillationStep}
