"""The privileged context and the teacher-signal transforms (``teacher.context``, ``teacher.signal``).

Context. The self-teacher reads, exposed at α, either the reference (OPSD) or, with
``teacher.context=hindsight`` (hindsight self-distillation, arXiv 2606.15576), a correct peer: another
sample of the same problem from the same step that the grader accepted; the reference where there is
none. A peer is an exact sample of the success-conditioned policy and costs no extra rollout.

Contrast (``teacher.signal.contrast``). The plain target is the teacher p_T. A contrast takes a second
teacher pass p_N on a negative context over the same student tokens and targets

    q ∝ p_S · (p_T / p_N)^λ    on the teacher's support (its top-k and one tail bucket, or the vocabulary),

p_S the student (detached; applied in the loss, :func:`contrasted`). The signal the student follows is then λ·(log p_T - log p_N), the teacher's
gap under the right context minus its gap under the negative one: what any context does to the
teacher alike (style, "privilege-induced style drift") cancels, and a position where both contexts
agree leaves the student where it is. λ = 1 and the negative

- ``reference_only``: the teacher's own template with the problem left empty (Purified OPSD, arXiv
  2607.02234: the reference-induced component; p_T/p_N is the pointwise mutual information of the
  question and the token given the reference);
- ``wrong_hint``: a wrong peer (a sample of the same problem the grader rejected, other than the row
  itself), exposed at the same α in the same template (RLCSD, arXiv 2606.11709, with one negative);

give those papers' signals. A row without a negative (no wrong peer) keeps the plain target.

Gate (``teacher.signal.entropy_gate``, EGRSD, arXiv 2605.13255): each token's loss is weighed by
w = floor + (1 - floor)·exp(-H_T / τ), H_T the entropy of the teacher's distribution at that position
(at the teacher's temperature, over the full vocabulary): confident teacher positions count fully,
uncertain ones down to ``floor``, never 0.

Both transforms need the teacher's full log-probs (the HF teacher; the config refuses vLLM's top-k
prompt logprobs) and cost nothing when off: no second pass, no extra tensors on the wire.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def peer(uids: Sequence, samples: Sequence, rewards: Sequence[float], row: int, correct: bool) -> int | None:
    """The row of the first other sample (by sample index) of row ``row``'s problem that the grader
    accepted (``correct``) or rejected; None when there is none."""
    found = [
        j for j in range(len(uids)) if j != row and uids[j] == uids[row] and (rewards[j] > 0.5) == correct
    ]
    return min(found, key=lambda j: samples[j]) if found else None


def privileged_contexts(
    rows: dict, rewards: list[float] | None, hindsight: bool
) -> tuple[list[tuple[str, str]], list[bool]]:
    """Per row of a rollout chunk (its non-tensor columns ``rows``), what the privileged teacher reads,
    (text, answer), and whether it is a correct peer (``hindsight``) rather than the reference."""
    contexts, peers = [], []
    for i in range(len(rows["uid"])):
        j = peer(rows["uid"], rows["sample"], rewards, i, correct=True) if hindsight else None
        contexts.append((rows["reference"][i] if j is None else rows["response_text"][j], rows["answer"][i]))
        peers.append(j is not None)
    return contexts, peers


def negative_contexts(
    rows: dict, rewards: list[float] | None, contexts: list[tuple[str, str]], contrast: str
) -> list[tuple[str, str, str] | None]:
    """Per row, the negative context of the contrast as (problem, text, answer) of the teacher's
    template: the row's context without the problem (``reference_only``), or its first other wrong
    sample (``wrong_hint``) with that sample's own answer, never the right one, which the exposure
    would otherwise add; None where the problem has no other wrong sample."""
    out: list[tuple[str, str, str] | None] = []
    for i, (text, answer) in enumerate(contexts):
        if contrast == "reference_only":
            out.append(("", text, answer))
            continue
        j = peer(rows["uid"], rows["sample"], rewards, i, correct=False)
        out.append(
            None if j is None else (rows["problem"][i], rows["response_text"][j], rows["extracted"][j] or "")
        )
    return out


def contrast_shift(
    logp: Tensor, logp_negative: Tensor, weight: float, indices: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """λ·(log p_T - log p_N) on the teacher's support: at ``indices`` [..., k] (the teacher's top-k) with
    one more value for the mass outside them (log of each side's tail), or on the whole vocabulary
    (``indices`` None). Inputs: full log-probs [..., V]. Returns (shift [..., k or V], tail shift [...] or None)."""
    if indices is None:
        return weight * (logp - logp_negative), None
    top = weight * (logp.gather(-1, indices) - logp_negative.gather(-1, indices))
    if indices.shape[-1] >= logp.shape[-1]:
        return top, None
    return top, weight * (outside(logp, indices) - outside(logp_negative, indices))


def outside(log_p: Tensor, indices: Tensor) -> Tensor:
    """[N] log of the mass of ``log_p`` [N, V] outside ``indices`` [N, k] (k < V), in log space: exact
    however small it is (what a tail bucket holds)."""
    return log_p.scatter(-1, indices, -math.inf).logsumexp(-1)


def contrasted(log_s: Tensor, log_t: Tensor, shift: Tensor, on: Tensor) -> Tensor:
    """The target of a contrast on one support: log_softmax(log p_S + shift) on the tokens ``on`` [N]
    (the student detached: it is the anchor, not a prediction), the plain teacher ``log_t`` on the others."""
    q = torch.log_softmax(log_s.detach() + shift.to(log_s.dtype), dim=-1)
    return torch.where(on[:, None], q, log_t)


def entropy(logp: Tensor) -> Tensor:
    """[...] the entropy of each distribution ``logp`` [..., V] (0 · log 0 = 0)."""
    return -torch.where(logp > -math.inf, logp.exp() * logp, 0.0).sum(-1)


def gate_weight(teacher_entropy: Tensor, temperature: float, floor: float) -> Tensor:
    """EGRSD's confidence gate: floor + (1 - floor)·exp(-H_T / τ)."""
    return floor + (1.0 - floor) * torch.exp(-teacher_entropy / temperature)
