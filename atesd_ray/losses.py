"""Losses: on-policy distillation (OPSD / ATESD / MOTAB / OPD) and NLL (SFT, probe, teacher-forced
suffix); GRPO's policy gradient is in its algorithm module, on the same chunked driver.

Distillation compares the student's distribution at each valid response position with what the
teacher actor sent for that position (:class:`TeacherTargets`). Everything is flattened over
valid positions: row ``i`` of the student tensor, of the teacher targets and of ``tokens`` is the
same response token. The loss functions return SUMS over tokens; the caller divides by the global
number of valid tokens (all micro-batches, all ranks), which is what OPSD's "sum over (token,
vocab), divide by the number of valid response tokens" means under gradient accumulation.

Choices (and where they come from):

- Generalized JSD_β follows TRL's ``generalized_jsd_loss`` (which OPSD's ``opsd_trainer.py``
  copies): m = β p_T + (1-β) p_S, JSD_β = β KL(p_T||m) + (1-β) KL(p_S||m), with β = 0 taken as
  forward KL(p_T||p_S) and β = 1 as reverse KL(p_S||p_T) (the general formula is identically 0
  at both ends). The mixture is formed in log space.
- Point-wise clip, as OPSD's ``jsd_token_clip``: the elementwise (token, vocab-entry) summand of
  the β-weighted divergence is clamped with ``max=clip`` before the sum over the vocabulary;
  clamped entries get no gradient. In the top-k variant the entries are the k ids (and the tail
  bucket, in "bucket" mode).
- Top-k: OPSD takes the teacher's top-k ids, gathers both sides' logits there and takes a softmax
  over the k ids; that is ``topk_tail="renormalize"``. ``"bucket"`` instead keeps a (k+1)-th
  "everything else" entry with each side's remaining mass, so the loss is a true divergence
  between the coarsened distributions. Both tails are computed in log space, exactly: the
  student's as the log-sum-exp of its log-probs outside the teacher's ids, the teacher's the same
  way from its full logits (``teacher_tail``, sent beside the top-k). Only a teacher that sends no
  tail (vLLM's prompt logprobs) has it derived from its top-k, log(1 - Σ p) in float64, floored at
  the precision of float32 log-probs (k · 2^-24). With k = vocab there is no tail and both modes
  equal the full loss. ``"none"`` is verl's ``forward_kl_topk``: Σ over the top-k of
  p_T (log p_T - log p_S), neither side renormalized, no tail, each token's sum clamped at 0 (with
  ``logprob_floor`` and ``token_max``, verl's ``log_prob_min_clamp`` and ``loss_max_clamp``).
- ``LossConfig.kind`` and the targets: "jsd" and "topk" both compute JSD_β, on the full
  vocabulary when ``teacher.indices is None`` and with the top-k variant otherwise (top-k with
  k = vocab is the full loss, so "topk" with full targets is exactly "jsd"). "sampled_token" uses
  only ``teacher.sampled_logprob`` for the loss (the rest feeds the statistics); neither ``beta``
  nor ``clip`` applies to it (as in OPSD).
- Statistics (mismatch KL, top-1 disagreement, student confidence) are taken at the loss
  temperature. Mismatch KL is KL(p_T||p_S) between the distributions coarsened to the teacher's
  support plus one tail bucket: the full KL when the teacher sent the full vocabulary, a lower
  bound of it (data processing) with top-k, and never negative.
- Computation is in at least float32, whatever the dtype of the logits.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from atesd_ray.chunked import Project, over_chunks, student_logprobs
from atesd_ray.teacher_signal import contrasted, outside

if TYPE_CHECKING:
    from atesd_ray.config import LossConfig


@dataclass(frozen=True)
class _Support:
    """The coarsening the mismatch statistic always uses: the teacher's top-k plus one tail bucket."""

    topk_tail: str = "bucket"
    logprob_floor: float | None = None


_BUCKET = _Support()


@dataclass
class TeacherTargets:
    """What the teacher sends per valid response token (rows aligned with the student's).

    logprobs: [N, k] temperature-scaled log-probs, normalized over the full vocabulary, of the
        teacher's top-k ids (k = vocab: the whole distribution).
    indices: [N, k] the token ids of ``logprobs``; None means the full vocabulary in natural order.
    sampled_logprob: [N] the teacher's log-prob of the token the student sampled.
    tail: [N] the log of the teacher's mass outside its top-k, exact (from its full logits); None
        for a teacher that sends only its top-k (then derived from them) or its whole distribution.
    shift, shift_tail, contrast: a contrast of the teacher signal (``atesd_ray/teacher_signal.py``):
        λ·(log p_T - log p_N) at the ``logprobs`` entries [N, k] and for the tail bucket [N], and which
        tokens [N] (bool) take the contrasted target q ∝ p_S·exp(shift) instead of p_T; None: plain.
    weight: [N] each token's loss weight (the entropy gate); None: 1.
    """

    logprobs: Tensor
    indices: Tensor | None
    sampled_logprob: Tensor
    tail: Tensor | None = None
    shift: Tensor | None = None
    shift_tail: Tensor | None = None
    contrast: Tensor | None = None
    weight: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.logprobs.shape[0]
        if self.logprobs.dim() != 2:
            raise ValueError(f"teacher logprobs must be [N, k], got {tuple(self.logprobs.shape)}")
        if self.indices is not None and self.indices.shape != self.logprobs.shape:
            raise ValueError(
                f"teacher indices {tuple(self.indices.shape)} do not match logprobs {tuple(self.logprobs.shape)}"
            )
        if self.sampled_logprob.shape != (n,):
            raise ValueError(
                f"teacher sampled_logprob must be [{n}], got {tuple(self.sampled_logprob.shape)}"
            )
        if (self.shift is None) != (self.contrast is None):
            raise ValueError("a contrast needs both its shift and the tokens it applies to")
        if self.shift is not None and self.shift.shape != self.logprobs.shape:
            raise ValueError(
                f"teacher shift {tuple(self.shift.shape)} does not match logprobs {tuple(self.logprobs.shape)}"
            )

    def to(self, device: torch.device | str) -> TeacherTargets:
        tensors = (getattr(self, f.name) for f in dataclasses.fields(self))
        return TeacherTargets(*(None if t is None else t.to(device) for t in tensors))


# A response position is a fork when the student's entropy there exceeds this (nats): the 80th
# percentile of token entropy in Wang et al. 2025, "Beyond the 80/20 rule" (forking tokens), which
# "Rethinking OPSD for thinking models" (arXiv 2607.05184) finds privileged teachers suppress.
FORK_ENTROPY = 0.672


@dataclass
class DistillStats:
    """Sums over tokens (0-d tensors), so they add up across micro-batches and ranks. Besides the
    teacher-student statistics, the guardrails of the student's own rollouts: its entropy (at the
    loss temperature), how many positions are forks (entropy > ``FORK_ENTROPY``) and their entropy."""

    loss: Tensor
    mismatch_kl: Tensor
    top1_disagree: Tensor
    confidence: Tensor
    entropy: Tensor
    forks: Tensor
    fork_entropy: Tensor
    tokens: Tensor

    FIELDS: ClassVar[tuple[str, ...]] = tuple(
        "loss mismatch_kl top1_disagree confidence entropy forks fork_entropy tokens".split()
    )

    def merge(self, other: DistillStats) -> DistillStats:
        return DistillStats(
            *(getattr(self, f) + getattr(other, f).to(getattr(self, f).device) for f in self.FIELDS)
        )

    def as_tensor(self) -> Tensor:
        """[5] float64 tensor, e.g. for ``dist.all_reduce``; inverse: :meth:`from_tensor`."""
        return torch.stack([getattr(self, f).double() for f in self.FIELDS])

    @classmethod
    def from_tensor(cls, t: Tensor) -> DistillStats:
        return cls(*t.unbind())

    def means(self) -> dict[str, float]:
        """Token means (0 for an empty batch) and the token count; ``fork_rate``, the forks' share
        of the tokens, and ``fork_entropy``, the mean entropy at the forks (0 without any)."""
        n = float(self.tokens)
        out = {f: float(getattr(self, f)) / max(n, 1.0) for f in self.FIELDS[:4]}
        out["entropy"] = float(self.entropy) / max(n, 1.0)
        out["fork_rate"] = float(self.forks) / max(n, 1.0)
        out["fork_entropy"] = float(self.fork_entropy) / max(float(self.forks), 1.0)
        out["tokens"] = n
        return out


# --- per-entry terms (student log-probs in, summands out) ------------------------------------


def _kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """p · (log p - log q) per entry, with 0 · log 0 = 0 (a teacher may send -inf log-probs)."""
    return torch.where(log_p > -math.inf, log_p.exp() * (log_p - log_q), 0.0)


def _jsd_terms(log_s: Tensor, log_t: Tensor, beta: float) -> Tensor:
    """Per-entry summands of generalized JSD_β; β = 0 / 1 are forward / reverse KL, as in TRL."""
    if beta == 0.0:
        return _kl_terms(log_t, log_s)
    if beta == 1.0:
        return _kl_terms(log_s, log_t)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return beta * _kl_terms(log_t, log_m) + (1.0 - beta) * _kl_terms(log_s, log_m)


def _clipped_sum(terms: Tensor, clip: float | None) -> Tensor:
    return (terms if clip is None else terms.clamp(max=clip)).sum(-1)


def tail_from_topk(log_p_k: Tensor) -> Tensor:
    """[N] log(1 - Σ exp(log_p_k)) from top-k log-probs alone, in float64, floored at the precision
    of float32 log-probs (k · 2^-24): what rounding leaves of a tail is not known more closely."""
    lse = log_p_k.double().logsumexp(-1)
    tail = torch.where(
        lse < -math.log(2), torch.log1p(-lse.exp()), torch.log((-torch.expm1(lse)).clamp(min=0.0))
    )
    return tail.clamp(min=math.log(log_p_k.shape[-1] * 2.0**-24)).to(log_p_k.dtype)


def _bucketed(log_k: Tensor, tail: Tensor) -> Tensor:
    return torch.cat([log_k, tail.to(log_k.dtype)[:, None]], dim=-1)


def _on_teacher_support(
    log_s: Tensor, log_t_k: Tensor, indices: Tensor, teacher_tail: Tensor | None, cfg: LossConfig
) -> tuple[Tensor, Tensor]:
    """Both sides on the teacher's top-k ids (and, in "bucket" mode, one entry for the rest, when
    there is a rest: k < vocab)."""
    log_s_k = log_s.gather(-1, indices)
    if cfg.topk_tail == "renormalize":
        return log_s_k.log_softmax(-1), log_t_k.log_softmax(-1)
    if cfg.topk_tail == "none":
        if cfg.logprob_floor is None:
            return log_s_k, log_t_k
        return log_s_k.clamp(min=cfg.logprob_floor), log_t_k.clamp(min=cfg.logprob_floor)
    if cfg.topk_tail == "bucket":
        if indices.shape[-1] >= log_s.shape[-1]:
            return log_s_k, log_t_k
        t_tail = tail_from_topk(log_t_k) if teacher_tail is None else teacher_tail
        return _bucketed(log_s_k, outside(log_s, indices)), _bucketed(log_t_k, t_tail)
    raise ValueError(f"unknown topk_tail {cfg.topk_tail!r}; expected 'renormalize', 'bucket' or 'none'")


# --- per-token losses on logits ---------------------------------------------------------------


def _sampled_token(log_s_y: Tensor, teacher_logprob_y: Tensor) -> Tensor:
    advantage = (teacher_logprob_y.to(log_s_y.dtype) - log_s_y).detach()
    return -advantage * log_s_y


def _distill_chunk(
    logits: Tensor,
    t_logprobs: Tensor,
    t_indices: Tensor | None,
    t_sampled: Tensor,
    t_tail: Tensor | None,
    t_shift: Tensor | None,
    t_shift_tail: Tensor | None,
    t_contrast: Tensor | None,
    t_weight: Tensor | None,
    tokens: Tensor | None,
    cfg: LossConfig,
) -> tuple[Tensor, ...]:
    """(loss, then the statistics of :class:`DistillStats` but the count) summed over the chunk's tokens.

    The statistics come after the loss: a non-reentrant checkpoint stops recomputing once it has
    rebuilt every tensor backward needs, so they are not recomputed in backward.
    """
    log_s = student_logprobs(logits, cfg.temperature)
    log_t = t_logprobs.to(log_s.dtype)

    if cfg.kind == "sampled_token":
        if tokens is None:
            raise ValueError("loss kind 'sampled_token' needs the sampled tokens")
        if t_shift is not None:
            raise ValueError("a contrast needs a target distribution; loss kind 'sampled_token' has none")
        per_token = _sampled_token(log_s.gather(-1, tokens[:, None]).squeeze(-1), t_sampled)
    else:
        if t_indices is None:
            log_s_on, log_t_on = log_s, log_t
        else:
            log_s_on, log_t_on = _on_teacher_support(log_s, log_t, t_indices, t_tail, cfg)
        if t_shift is not None:
            if cfg.topk_tail == "none" and t_indices is not None:
                raise ValueError(
                    "a contrast needs a distribution on the teacher's support; topk_tail=none has none"
                )
            shift = t_shift if t_shift.shape[-1] == log_t_on.shape[-1] else _bucketed(t_shift, t_shift_tail)
            log_t_on = contrasted(log_s_on, log_t_on, shift, t_contrast)
        per_token = _clipped_sum(_jsd_terms(log_s_on, log_t_on, cfg.beta), cfg.clip)
        if cfg.topk_tail == "none" and t_indices is not None:  # verl: negative top-k sums count 0
            per_token = per_token.clamp(min=0.0, max=cfg.token_max)
    loss = (per_token if t_weight is None else per_token * t_weight.to(per_token.dtype)).sum()

    with torch.no_grad():
        terms = _mismatch_terms(log_s.detach(), log_t, t_indices, t_tail)
        kl, disagree, confidence = terms.sum(0).unbind()
        h = -(log_s.exp() * log_s).sum(-1)  # the student's entropy (log_s is finite)
        fork = h > FORK_ENTROPY
    return loss, kl, disagree, confidence, h.sum(), fork.sum().to(h.dtype), h[fork].sum()


def _mismatch_terms(log_s: Tensor, log_t: Tensor, t_indices: Tensor | None, t_tail: Tensor | None) -> Tensor:
    """[N, 3] per token: KL(p_T||p_S) (see the module doc), top-1 disagreement (0/1), student max-prob."""
    if t_indices is None:
        kl = _kl_terms(log_t, log_s).sum(-1)
        teacher_top1 = log_t.argmax(-1)
    else:
        on_support = _on_teacher_support(log_s, log_t, t_indices, t_tail, _BUCKET)
        kl = _kl_terms(on_support[1], on_support[0]).sum(-1)
        teacher_top1 = t_indices.gather(-1, log_t.argmax(-1, keepdim=True)).squeeze(-1)
    top_s, student_top1 = log_s.max(-1)
    return torch.stack([kl, (teacher_top1 != student_top1).to(log_s.dtype), top_s.exp()], dim=-1)


@torch.no_grad()
def mismatch_per_token(
    student: Tensor,
    teacher: TeacherTargets,
    temperature: float,
    *,
    project: Project | None = None,
    chunk_size: int = 256,
) -> Tensor:
    """[N, 3] per-token statistics of :class:`DistillStats` (KL(p_T||p_S), top-1 disagreement,
    confidence) without a loss or a graph: what the fixed-exposure sweep needs for tails (p95, max)
    and per-example breakdowns. ``student``/``project`` as in :func:`distill_loss`."""
    parts = []
    for start in range(0, student.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        logits = student[part] if project is None else project(student[part])
        indices = None if teacher.indices is None else teacher.indices[part]
        tail = None if teacher.tail is None else teacher.tail[part]
        log_s = student_logprobs(logits, temperature)
        parts.append(_mismatch_terms(log_s, teacher.logprobs[part].to(log_s.dtype), indices, tail))
    return torch.cat(parts) if parts else torch.zeros(0, 3)


def distill_loss(
    student: Tensor,
    teacher: TeacherTargets,
    cfg: LossConfig,
    *,
    tokens: Tensor | None = None,
    project: Project | None = None,
) -> tuple[Tensor, DistillStats]:
    """SUM over tokens of the per-token distillation loss selected by ``cfg``, and its statistics.

    student: [N, V] logits, or [N, H] final hidden states when ``project`` (hidden -> logits, the
        lm_head) is given; then the loss runs over chunks of ``cfg.chunk_size`` rows under
        activation checkpointing. tokens: [N] the sampled tokens (needed by "sampled_token").
    Gradient flows only into the student; the teacher targets are constants.
    """
    fn = partial(_distill_chunk, cfg=cfg)
    rows = (
        teacher.logprobs.detach(),
        teacher.indices,
        teacher.sampled_logprob.detach(),
        teacher.tail,
        teacher.shift,
        teacher.shift_tail,
        teacher.contrast,
        teacher.weight,
        tokens,
    )
    loss, *stats = over_chunks(fn, student, rows, project, cfg.chunk_size)
    count = torch.tensor(float(student.shape[0]), device=loss.device, dtype=loss.dtype)
    return loss, DistillStats(loss.detach(), *stats, count)


def _nll_chunk(logits: Tensor, targets: Tensor) -> tuple[Tensor]:
    return (
        F.cross_entropy(
            logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum"
        ),
    )


def nll_loss(
    student: Tensor, targets: Tensor, *, project: Project | None = None, chunk_size: int = 256
) -> Tensor:
    """SUM of -log p(target) at temperature 1; ``student``/``project`` as in :func:`distill_loss`."""
    (total,) = over_chunks(_nll_chunk, student, (targets,), project, chunk_size)
    return total
