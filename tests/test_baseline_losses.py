"""GRPO's group advantages and chunked policy-gradient loss; the per-token mismatch statistics of the sweep."""

from __future__ import annotations

import math

import pytest
import torch

from atesd_ray.algorithms.grpo import advantages_by_group, policy_gradient_loss, policy_gradient_sum
from atesd_ray.config import LossConfig
from atesd_ray.losses import TeacherTargets, distill_loss, mismatch_per_token

N, V, H = 29, 40, 12
f64 = torch.float64


def test_advantages_by_group_by_hand():
    # two prompts, their samples interleaved as they might arrive from several rollout replicas
    ids = ["a", "b", "a", "b", "a", "b", "a", "b"]
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    # group a: 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3); group b: all 1 -> no signal
    s = 0.5 / math.sqrt(1 / 3)
    want = torch.tensor([s, 0.0, -s, 0.0, -s, 0.0, s, 0.0])
    torch.testing.assert_close(advantages_by_group(ids, rewards), want, rtol=0, atol=1e-5)
    centered = torch.tensor([0.5, 0.0, -0.5, 0.0, -0.5, 0.0, 0.5, 0.0])
    torch.testing.assert_close(advantages_by_group(ids, rewards, scale=False), centered)
    with pytest.raises(ValueError, match="group 'c' has one response"):
        advantages_by_group(["a", "a", "c"], torch.tensor([1.0, 0.0, 1.0]))


@pytest.fixture
def pg_batch():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, H, generator=g, dtype=f64)
    head = torch.nn.Linear(H, V, bias=False).to(f64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g, dtype=f64))
    tokens = torch.randint(0, V, (N,), generator=g)
    old = torch.log_softmax(head(hidden) / 1.2, -1).gather(-1, tokens[:, None]).squeeze(-1).detach()
    old = old + 0.3 * torch.randn(N, generator=g, dtype=f64)  # a policy that has moved since sampling
    ref = old + 0.2 * torch.randn(N, generator=g, dtype=f64)
    advantages = torch.randn(N, generator=g, dtype=f64)
    weights = torch.rand(N, generator=g, dtype=f64)
    return hidden, head, tokens, old, ref, advantages, weights


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_policy_gradient_sum_matches_dense(pg_batch, kl_coef):
    hidden, head, tokens, old, ref, adv, w = pg_batch
    h1 = hidden.clone().requires_grad_()
    loss, stats = policy_gradient_sum(
        h1, tokens, old, adv, w, clip_eps=0.2, temperature=1.2, ref_logprobs=ref, kl_coef=kl_coef,
        project=head, chunk_size=8,
    )  # fmt: skip
    h2 = hidden.clone().requires_grad_()
    logprobs = torch.log_softmax(head(h2) / 1.2, -1).gather(-1, tokens[:, None]).squeeze(-1)
    per_token = policy_gradient_loss(logprobs, old, adv, 0.2, ref, kl_coef)
    dense = (per_token * w).sum()
    torch.testing.assert_close(loss, dense)
    (g1,) = torch.autograd.grad(loss, h1)
    (g2,) = torch.autograd.grad(dense, h2)
    torch.testing.assert_close(g1, g2)

    ratio = (logprobs - old).exp().detach()
    clipped = ((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8))
    r = (ref - logprobs).detach()
    assert stats[0].item() == pytest.approx(per_token.sum().item())
    assert stats[1].item() == pytest.approx((r.exp() - r - 1).sum().item())
    assert stats[2].item() == clipped.sum().item() and 0 < stats[2].item() < N
    assert stats[3].item() == N


def test_policy_gradient_sum_on_the_old_policy_is_minus_the_weighted_advantage(pg_batch):
    hidden, head, tokens, _, _, adv, w = pg_batch
    old = torch.log_softmax(head(hidden), -1).gather(-1, tokens[:, None]).squeeze(-1).detach()
    loss, stats = policy_gradient_sum(
        hidden, tokens, old, adv, w, clip_eps=0.2, temperature=1.0, project=head
    )
    assert loss.item() == pytest.approx(-(adv * w).sum().item())  # ratio 1: nothing clipped
    assert stats[1].item() == 0 and stats[2].item() == 0


@pytest.mark.parametrize("k", [None, 7])
def test_mismatch_per_token_sums_to_the_training_statistics(k):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(N, H, generator=g, dtype=f64)
    head = torch.nn.Linear(H, V, bias=False).to(f64)
    teacher_full = torch.log_softmax(torch.randn(N, V, generator=g, dtype=f64) * 2 / 1.1, -1)
    tokens = torch.randint(0, V, (N,), generator=g)
    sampled = teacher_full.gather(-1, tokens[:, None]).squeeze(-1)
    if k is None:
        teacher = TeacherTargets(teacher_full, None, sampled)
    else:
        top = teacher_full.topk(k, -1)
        teacher = TeacherTargets(top.values, top.indices, sampled)
    cfg = LossConfig(temperature=1.1, clip=None, chunk_size=8)
    per_token = mismatch_per_token(hidden, teacher, cfg.temperature, project=head, chunk_size=8)
    _, stats = distill_loss(hidden, teacher, cfg, project=head)
    assert per_token.shape == (N, 3) and not per_token.requires_grad
    torch.testing.assert_close(
        per_token.sum(0), torch.stack([stats.mismatch_kl, stats.top1_disagree, stats.confidence])
    )
    assert (per_token[:, 0] >= 0).all() and set(per_token[:, 1].tolist()) <= {0.0, 1.0}
