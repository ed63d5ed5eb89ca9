"""The train-inference gap: how far the rollout engine's log-probs of the tokens it sampled are from
the student's own, |log p_rollout(y) - log p_student(y)| per sampled token (verl logs the same as
``training/rollout_probs_diff_*``). The student computes it from the logits it already has in its
training step, and the run stops when a sync went wrong (:func:`check_rollout_gap`).

Like for like. vLLM reports ``processed_logprobs``: of the distribution it sampled from, logits / T,
then the top-k cut, then the top-p cut over what is left (``vllm/v1/sample/ops/topk_topp_sampler.py``
in vLLM 0.30, which the student's :func:`sampler_logprobs` repeats). The HF engine reports
softmax(logits / T) over the whole vocabulary. Where the student's own cut would leave the sampled
token out (its logits differ from the engine's in the last bits, at the edge of the cut), the token
is kept, so the gap stays finite and as small as the logits' difference.

With ``rollout.max_staleness: 1`` a step trains on rollouts of the weights one update older than
the student's, so the gap then also holds one update's change of the policy (measured on the bundled
SmolLM2 at lr 5e-6: 0.02-0.03 nats, at 1e-4: 0.5, as much as a corrupted load). So every sync is
also checked as it lands, whatever the staleness: the student's log-probs of one fixed short
sequence travel with it, and each receiver that mirrors the student scores the sequence too
(``WeightTransport.verify``; ``sync_logprob_gap``, the largest mean over the receivers). The guard
holds both to ``rollout.max_logprob_gap``: every sync check (:func:`check_sync`), and the step's gap
on the steps whose rollouts came from the student's own weights (:func:`check_step_gap`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from pathlib import Path

    from atesd_ray.config import Config, RolloutConfig

# the sequence every sync is checked on (student prompt and response, in the student's tokens)
CHECK_PROBLEM = "Sam has 12 apples and buys 30 more. How many apples does Sam have now?"
CHECK_RESPONSE = "Sam starts with 12 apples and buys 30 more, so he has 12 + 30 = 42 apples.\n\nThe final answer is \\boxed{42}."

# rollout.max_logprob_gap when it is null: a bound on the token mean of the gap per model dtype,
# far above honest rounding noise and far below what a corrupted weight load gives (README, "The
# train-inference gap"): float32 measured ~1e-6 honest against 0.3-3 nats corrupted on CPU.
DEFAULT_MAX_GAP = {"float32": 0.01, "bfloat16": 0.25, "float16": 0.25}


@dataclass(frozen=True)
class SamplerCut:
    """The distribution the rollout engine's log-probs are of."""

    temperature: float
    top_k: int = 0  # 0: no cut
    top_p: float = 1.0

    @classmethod
    def of(cls, rollout: RolloutConfig) -> SamplerCut:
        """vLLM's processed log-probs carry the sampler's cuts; the HF engine's do not."""
        if rollout.engine == "vllm":
            return cls(rollout.temperature, rollout.top_k, rollout.top_p)
        return cls(rollout.temperature)


def sampler_logprobs(logits: Tensor, tokens: Tensor, cut: SamplerCut) -> Tensor:
    """[N] log-prob of ``tokens`` [N] under logits [N, V] / T with the top-k, then top-p, cut of
    ``cut`` applied (each sampled token kept)."""
    scaled = logits.float() / cut.temperature
    drop = torch.zeros_like(scaled, dtype=torch.bool)
    if 0 < cut.top_k < scaled.shape[-1]:
        kth = scaled.topk(cut.top_k, dim=-1).values[:, -1:]
        drop |= scaled < kth
    if cut.top_p < 1.0:
        ordered, order = scaled.masked_fill(drop, -math.inf).sort(dim=-1)
        tail = ordered.softmax(-1).cumsum(-1) <= 1.0 - cut.top_p
        tail[:, -1] = False  # the most likely token always stays
        drop |= torch.zeros_like(drop).scatter(-1, order, tail)
    drop.scatter_(-1, tokens[:, None], False)
    return scaled.masked_fill(drop, -math.inf).log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


@torch.no_grad()
def gap_terms(
    hidden: Tensor, tokens: Tensor, rollout_logprobs: Tensor, project, cut: SamplerCut, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """(sum, max) of |rollout log-prob - student log-prob| over the N response tokens of one
    micro-batch (``hidden`` [N, H] final hidden states, ``project`` the LM head), chunk by chunk."""
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    largest = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        student = sampler_logprobs(project(hidden[part]), tokens[part], cut)
        gap = (rollout_logprobs[part].to(student) - student).abs().double()
        total += gap.sum()
        largest = torch.maximum(largest, gap.max())
    return total, largest


class RolloutGapError(RuntimeError):
    """The rollouts were sampled from weights that are not the student's."""


def max_gap(rollout: RolloutConfig, dtype: str) -> float:
    """``rollout.max_logprob_gap``, or the default for the model's dtype."""
    return DEFAULT_MAX_GAP[dtype] if rollout.max_logprob_gap is None else rollout.max_logprob_gap


def check_step_gap(cfg: Config, step: int, metrics: dict, checkpoint: Path | None) -> None:
    """Stop the run before recording step ``step`` when it trained on rollouts of the student's own
    weights (staleness 0) whose log-probs are not the student's: the token mean of the gap (a
    corrupted layer moves it by orders of magnitude, honest rounding noise does not) above
    ``rollout.max_logprob_gap``."""
    gap = metrics.get("rollout_logprob_gap_mean")
    if metrics.get("staleness") != 0 or _within(cfg, gap):
        return
    _stop(
        cfg,
        f"step {step + 1} trained on rollouts of weights v{metrics.get('rollout_version')} whose log-probs "
        f"differ from the student's by {gap:.3g} nats per token on average (max "
        f"{metrics.get('rollout_logprob_gap_max', math.nan):.3g})",
        f"The run stopped before recording step {step + 1}",
        checkpoint,
    )


def check_sync(cfg: Config, version: int, gap: float | None, checkpoint: Path | None) -> None:
    """Stop the run when the sync of weights ``version`` left a receiver holding other weights than
    the student's: ``sync_logprob_gap`` above ``rollout.max_logprob_gap``. It runs before the step
    that sent them is recorded (its held-out evaluation would sample from them), so a resume from
    the last checkpoint trains that step again."""
    if _within(cfg, gap):
        return
    _stop(
        cfg,
        f"the sync of weights v{version} left a receiver holding other weights than the student's: on "
        f"the check sequence their log-probs differ by {gap:.3g} nats per token on average",
        "The run stopped before any rollout used them, and before recording the step that sent them",
        checkpoint,
    )


def _within(cfg: Config, gap: float | None) -> bool:
    bound = max_gap(cfg.rollout, cfg.model.dtype)
    return gap is None or bound == math.inf or gap <= bound  # a NaN gap is over any finite bound


def _stop(cfg: Config, found: str, stopped: str, checkpoint: Path | None) -> None:
    t = cfg.trainer
    raise RolloutGapError(
        f"{found}, beyond rollout.max_logprob_gap={max_gap(cfg.rollout, cfg.model.dtype):g} "
        f"({cfg.model.dtype}). Suspect the weight sync into rollout.engine={cfg.rollout.engine}: "
        f"trainer.weight_transport={t.weight_transport}, trainer.weight_bucket_mb={t.weight_bucket_mb}. "
        f"{stopped}; the last complete checkpoint, {checkpoint or 'none (no step was saved)'}, is kept"
    )


def sync_gap(gaps: list[float | None]) -> float | None:
    """``sync_logprob_gap``: the largest of the receivers' check gaps (None: no receiver checks)."""
    measured = [g for g in gaps if g is not None]
    return max(measured, key=lambda g: math.inf if math.isnan(g) else g) if measured else None
