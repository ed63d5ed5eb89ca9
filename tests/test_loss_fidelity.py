"""The distillation loss against references it must equal: the tail bucket in float32 and bfloat16
against float64 (and against the full-vocabulary loss at k = vocab), and ``topk_tail=none``
against verl 0.9.1's own ``forward_kl_topk`` (called directly: verl is installed)."""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch

from atesd_ray.config import LossConfig
from atesd_ray.losses import TeacherTargets, distill_loss
from atesd_ray.teacher_signal import outside

V, N = 512, 24
f64 = torch.float64


def _logits(seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(N, V, generator=g, dtype=f64) * scale
    teacher = torch.randn(N, V, generator=g, dtype=f64) * scale
    teacher[:, :4] += 12.0  # a confident teacher: its top-k mass rounds to 1 in float32 for larger k
    return student, teacher, torch.randint(0, V, (N,), generator=g)


def _teacher(
    teacher_logits: torch.Tensor, tokens: torch.Tensor, k: int, temperature: float
) -> TeacherTargets:
    """What the HF teacher sends, from logits in the teacher's float type: its top-k log-probs and the
    exact log-mass outside them, at ``temperature``."""
    logp = torch.log_softmax(teacher_logits / temperature, dim=-1)
    top = logp.topk(k, dim=-1)
    tail = outside(logp, top.indices) if k < V else None
    return TeacherTargets(top.values, top.indices, logp.gather(-1, tokens[:, None])[:, 0], tail)


def _reference(
    student: torch.Tensor, teacher: torch.Tensor, k: int, beta: float, temperature: float
) -> float:
    """The bucket loss in float64, probability space: the two distributions coarsened to the teacher's
    top-k and the rest (no rest at k = vocab), then generalized JSD, summed over tokens."""
    p_s = torch.softmax(student.double() / temperature, -1)
    p_t = torch.softmax(teacher.double() / temperature, -1)
    idx = p_t.topk(k, -1).indices
    ps, pt = p_s.gather(-1, idx), p_t.gather(-1, idx)
    if k < V:
        rest = torch.ones(N, V, dtype=torch.bool).scatter(-1, idx, False)
        ps = torch.cat([ps, (p_s * rest).sum(-1, keepdim=True)], -1)
        pt = torch.cat([pt, (p_t * rest).sum(-1, keepdim=True)], -1)
    m = beta * pt + (1 - beta) * ps

    def kl(p, q):
        return torch.where(p > 0, p * (p / q).log(), 0.0).sum(-1)

    if beta == 0:
        per_token = kl(pt, ps)
    elif beta == 1:
        per_token = kl(ps, pt)
    else:
        per_token = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    return float(per_token.sum())


def _cfg(**kw) -> LossConfig:
    return LossConfig(**({"kind": "topk", "clip": None, "topk_tail": "bucket", "temperature": 1.1} | kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", [1, 16, V - 1, V])
def test_the_tail_bucket_equals_float64_for_every_beta_and_k(dtype, beta, k):
    """Before, the tail was 1 - Σp floored at the smallest normal number: at k = vocab each token
    gained ~8.5e-6 nats from rounding noise, and reverse KL gained 0.097 nats on a token whose
    top-k mass rounded to 1. Now both tails are exact in log space."""
    student, teacher, tokens = _logits(seed=k)
    student, teacher = student.to(dtype), teacher.to(dtype)  # what each side actually holds
    targets = _teacher(teacher.float(), tokens, k, 1.1)
    ours, _ = distill_loss(student, targets, _cfg(beta=beta), tokens=tokens)
    ref = _reference(student, teacher, k, beta, 1.1)
    assert abs(float(ours) - ref) <= 3e-7 * abs(ref), (float(ours), ref)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_bucket_at_k_equal_vocab_is_the_full_vocabulary_loss(beta):
    student, teacher, tokens = _logits(seed=7)
    full_t = torch.log_softmax(teacher.float() / 1.1, -1)
    full, _ = distill_loss(
        student.float(),
        TeacherTargets(full_t, None, full_t[:, 0]),
        _cfg(kind="jsd", beta=beta),
        tokens=tokens,
    )
    bucket, _ = distill_loss(student.float(), _teacher(teacher.float(), tokens, V, 1.1), _cfg(beta=beta))
    assert float(bucket) == pytest.approx(float(full), rel=1e-6, abs=1e-7)


def test_a_teacher_that_sends_no_tail_gets_one_from_its_top_k_within_float32_precision():
    """vLLM's prompt logprobs carry only the top-k: the tail is then log(1 - Σp) in float64, floored
    at k·2^-24; the loss stays finite for reverse KL even where the top-k mass rounds to 1."""
    student, teacher, tokens = _logits(seed=3)
    targets = _teacher(teacher.float(), tokens, 16, 1.0)
    bare = TeacherTargets(targets.logprobs, targets.indices, targets.sampled_logprob)
    for beta in (0.0, 1.0):
        exact, _ = distill_loss(student.float(), targets, _cfg(beta=beta, temperature=1.0))
        derived, _ = distill_loss(student.float(), bare, _cfg(beta=beta, temperature=1.0))
        assert math.isfinite(float(derived))
        assert float(derived) == pytest.approx(float(exact), rel=1e-4)


def _verl_forward_kl_topk(student_logits, teacher: TeacherTargets, floor: float, top: float) -> torch.Tensor:
    """verl 0.9.1's per-token forward_kl_topk (fsdp), then the two clamps its loss applies after it."""
    from verl.trainer.distillation.fsdp.losses import compute_forward_kl_topk
    from verl.workers.config import DistillationLossConfig

    loss_cfg = DistillationLossConfig(
        loss_mode="forward_kl_topk",
        topk=teacher.indices.shape[-1],
        use_policy_gradient=False,
        log_prob_min_clamp=floor,
        loss_max_clamp=top,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compute_forward_kl_topk(
            student_logits[None],
            torch.nested.nested_tensor([teacher.logprobs], layout=torch.jagged),
            torch.nested.nested_tensor([teacher.indices], layout=torch.jagged),
            types.SimpleNamespace(distillation_loss=loss_cfg),
            "thd",
        )
    # verl/trainer/distillation/losses.py: compute_forward_kl_topk, then distillation_loss
    return out["distillation_losses"][0].clamp_min(0.0).clamp(min=-top, max=top)


@pytest.mark.parametrize("temperature", [1.0, 1.1])
def test_topk_tail_none_is_verls_forward_kl_topk(temperature):
    """verl scores the teacher at temperature 1 and divides the student's logits by the rollout
    temperature; ``teacher_temperature: 1`` with ``temperature: T`` does the same. Same loss per token
    and the same gradient."""
    student, teacher, tokens = _logits(seed=11)
    targets = _teacher(teacher.float(), tokens, 16, 1.0)
    cfg = _cfg(
        topk_tail="none",
        temperature=temperature,
        teacher_temperature=1.0,
        logprob_floor=-10.0,
        token_max=10.0,
    )
    ours_in = student.float().requires_grad_()
    ours, _ = distill_loss(ours_in, targets, cfg, tokens=tokens)
    ours.backward()
    theirs_in = student.float().requires_grad_()
    theirs = _verl_forward_kl_topk(theirs_in / temperature, targets, -10.0, 10.0).sum()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-5, atol=1e-7)


def test_topk_tail_none_is_forward_kl_only():
    with pytest.raises(Exception, match="topk_tail=none is verl's forward KL"):
        _cfg(topk_tail="none", beta=1.0).validate("algorithm.loss")
