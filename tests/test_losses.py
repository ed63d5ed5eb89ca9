"""Losses against plain dense computations (float64, small vocabulary)."""

from __future__ import annotations

import math

import pytest
import torch

from atesd_ray.algorithms.grpo import group_advantages, policy_gradient_loss
from atesd_ray.config import LossConfig
from atesd_ray.losses import DistillStats, TeacherTargets, distill_loss, nll_loss

N, V, H, K, T = 37, 50, 16, 7, 1.1
BETAS = [0.0, 0.3, 0.5, 1.0]
f64 = torch.float64


def make_teacher(teacher_logits: torch.Tensor, tokens: torch.Tensor, k: int | None = None) -> TeacherTargets:
    """What the teacher actor would send: temperature-scaled log-probs, full or top-k."""
    full = torch.log_softmax(teacher_logits / T, dim=-1)
    sampled = full.gather(-1, tokens[:, None]).squeeze(-1)
    if k is None:
        return TeacherTargets(full, None, sampled)
    values, indices = full.topk(k, dim=-1)
    return TeacherTargets(values, indices, sampled)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(N, V, generator=g, dtype=f64) * 2
    teacher = torch.randn(N, V, generator=g, dtype=f64) * 2
    tokens = torch.randint(0, V, (N,), generator=g)
    return student, teacher, tokens


def dense_jsd(p_s: torch.Tensor, p_t: torch.Tensor, beta: float, clip: float | None = None) -> torch.Tensor:
    """Per-token generalized JSD in probability space (rows of p_s, p_t are distributions)."""
    if beta == 0:
        terms = p_t * (p_t / p_s).log()
    elif beta == 1:
        terms = p_s * (p_s / p_t).log()
    else:
        m = beta * p_t + (1 - beta) * p_s
        terms = beta * p_t * (p_t / m).log() + (1 - beta) * p_s * (p_s / m).log()
    if clip is not None:
        terms = terms.clamp(max=clip)
    return terms.sum(-1)


def dense_topk(
    p_s: torch.Tensor, p_t: torch.Tensor, idx: torch.Tensor, tail: str
) -> tuple[torch.Tensor, ...]:
    ps, pt = p_s.gather(-1, idx), p_t.gather(-1, idx)
    if tail == "renormalize":
        return ps / ps.sum(-1, keepdim=True), pt / pt.sum(-1, keepdim=True)
    return torch.cat([ps, 1 - ps.sum(-1, keepdim=True)], -1), torch.cat(
        [pt, 1 - pt.sum(-1, keepdim=True)], -1
    )


def cfg(**kw) -> LossConfig:
    return LossConfig(**{"temperature": T, "clip": None, **kw})


def per_token(s: torch.Tensor, teacher: TeacherTargets, c: LossConfig, tokens=None) -> torch.Tensor:
    """[N] the production loss of each token on its own (distill_loss returns the sum)."""
    rows = [
        distill_loss(
            s[i : i + 1],
            TeacherTargets(
                teacher.logprobs[i : i + 1],
                None if teacher.indices is None else teacher.indices[i : i + 1],
                teacher.sampled_logprob[i : i + 1],
            ),
            c,
            tokens=None if tokens is None else tokens[i : i + 1],
        )[0]
        for i in range(s.shape[0])
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("clip", [None, 0.01])
def test_jsd_matches_dense(batch, beta, clip):
    s, t, tokens = batch
    p_s, p_t = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    teacher = make_teacher(t, tokens)
    torch.testing.assert_close(
        per_token(s, teacher, cfg(beta=beta, clip=clip)), dense_jsd(p_s, p_t, beta, clip)
    )
    loss, _ = distill_loss(s, teacher, cfg(beta=beta, clip=clip))
    torch.testing.assert_close(loss, dense_jsd(p_s, p_t, beta, clip).sum())


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_topk_matches_dense(batch, beta, tail):
    s, t, tokens = batch
    teacher = make_teacher(t, tokens, K)
    p_s, p_t = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    expected = dense_jsd(*dense_topk(p_s, p_t, teacher.indices, tail), beta)
    torch.testing.assert_close(per_token(s, teacher, cfg(beta=beta, topk_tail=tail)), expected)
    for kind in ("jsd", "topk"):
        loss, _ = distill_loss(s, teacher, cfg(kind=kind, beta=beta, topk_tail=tail))
        torch.testing.assert_close(loss, expected.sum())


def test_sampled_token_matches_dense(batch):
    s, t, tokens = batch
    s = s.requires_grad_()
    teacher = make_teacher(t, tokens)
    log_s_y = torch.log_softmax(s / T, -1)[torch.arange(N), tokens]
    advantage = (teacher.sampled_logprob - log_s_y).detach()
    expected = -advantage * log_s_y
    torch.testing.assert_close(per_token(s, teacher, cfg(kind="sampled_token"), tokens), expected)

    loss, _ = distill_loss(s, teacher, cfg(kind="sampled_token"), tokens=tokens)
    torch.testing.assert_close(loss, expected.sum())
    (got_grad,) = torch.autograd.grad(loss, s)
    (want_grad,) = torch.autograd.grad(expected.sum(), s)
    torch.testing.assert_close(got_grad, want_grad)


def test_student_equal_teacher_gives_zero(batch):
    s, _, tokens = batch
    for k in (None, K):
        teacher = make_teacher(s, tokens, k)
        for beta in BETAS:
            for tail in ("renormalize", "bucket"):
                loss, stats = distill_loss(s, teacher, cfg(beta=beta, topk_tail=tail))
                assert abs(loss.item()) < 1e-12, (k, beta, tail)
                assert abs(stats.mismatch_kl.item()) < 1e-12
                assert stats.top1_disagree.item() == 0


def test_beta_endpoints_are_forward_and_reverse_kl(batch):
    s, t, _ = batch
    log_s, log_t = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
    forward = (log_t.exp() * (log_t - log_s)).sum(-1)
    reverse = (log_s.exp() * (log_s - log_t)).sum(-1)
    teacher = make_teacher(t, torch.zeros(N, dtype=torch.long))
    torch.testing.assert_close(per_token(s, teacher, cfg(beta=0.0)), forward)
    torch.testing.assert_close(per_token(s, teacher, cfg(beta=1.0)), reverse)
    assert forward.min() > 0.01 and not torch.allclose(forward, reverse)


@pytest.mark.parametrize(("kind", "k"), [("jsd", None), ("topk", K), ("sampled_token", None)])
def test_gradient_reaches_only_the_student(batch, kind, k):
    s, t, tokens = batch
    s = s.requires_grad_()
    teacher = make_teacher(t, tokens, k)
    teacher = TeacherTargets(
        teacher.logprobs.clone().requires_grad_(),
        teacher.indices,
        teacher.sampled_logprob.clone().requires_grad_(),
    )
    loss, _ = distill_loss(s, teacher, cfg(kind=kind, beta=0.5), tokens=tokens)
    loss.backward()
    assert teacher.logprobs.grad is None and teacher.sampled_logprob.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("beta", BETAS)
def test_topk_with_full_vocab_equals_full_loss(batch, tail, beta):
    s, t, tokens = batch
    full = make_teacher(t, tokens)
    perm = torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(i)) for i in range(N)])
    shuffled = TeacherTargets(full.logprobs.gather(-1, perm), perm, full.sampled_logprob)
    want, _ = distill_loss(s, full, cfg(beta=beta, clip=0.05))
    got, _ = distill_loss(s, shuffled, cfg(kind="topk", beta=beta, clip=0.05, topk_tail=tail))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("kind", "k", "tail"),
    [
        ("jsd", None, "renormalize"),
        ("topk", K, "renormalize"),
        ("topk", K, "bucket"),
        ("sampled_token", None, "bucket"),
    ],
)
def test_chunked_equals_unchunked(batch, kind, k, tail):
    _, t, tokens = batch
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, H, generator=g, dtype=f64)
    lm_head = torch.nn.Linear(H, V, bias=False, dtype=f64)
    teacher = make_teacher(t, tokens, k)

    def run(chunk_size: int | None) -> tuple[torch.Tensor, ...]:
        h = hidden.clone().requires_grad_()
        lm_head.zero_grad()
        c = cfg(kind=kind, beta=0.3, clip=0.02, topk_tail=tail, chunk_size=chunk_size or 1)
        if chunk_size is None:
            loss, stats = distill_loss(lm_head(h), teacher, c, tokens=tokens)
        else:
            loss, stats = distill_loss(h, teacher, c, tokens=tokens, project=lm_head)
        loss.backward()
        return loss.detach(), stats.as_tensor(), h.grad, lm_head.weight.grad.clone()

    want = run(None)
    for chunk_size in (1, 5, 16, N, 100):
        for got_part, want_part in zip(run(chunk_size), want, strict=True):
            torch.testing.assert_close(got_part, want_part)


def test_nll_chunked_equals_cross_entropy(batch):
    _, _, tokens = batch
    hidden = torch.randn(N, H, dtype=f64, requires_grad=True)
    lm_head = torch.nn.Linear(H, V, bias=False, dtype=f64)
    want = torch.nn.functional.cross_entropy(lm_head(hidden), tokens, reduction="sum")
    want_grad = torch.autograd.grad(want, (hidden, lm_head.weight))
    for chunk_size in (4, N):
        got = nll_loss(hidden, tokens, project=lm_head, chunk_size=chunk_size)
        torch.testing.assert_close(got, want)
        for g, w in zip(torch.autograd.grad(got, (hidden, lm_head.weight)), want_grad, strict=True):
            torch.testing.assert_close(g, w)
    torch.testing.assert_close(nll_loss(lm_head(hidden), tokens), want)


def test_empty_batch_still_reaches_the_weights():
    lm_head = torch.nn.Linear(H, V, bias=False)
    teacher = TeacherTargets(torch.zeros(0, V), None, torch.zeros(0))
    loss, stats = distill_loss(torch.zeros(0, H), teacher, cfg(), project=lm_head)
    loss.backward()
    assert loss.item() == 0 and stats.means()["tokens"] == 0 and stats.means()["loss"] == 0
    assert lm_head.weight.grad is not None and lm_head.weight.grad.abs().sum() == 0


def test_clip_clamps_each_vocab_entry(batch):
    """Forward KL against a one-hot teacher has one non-zero summand per token, -log p_S(y) > clip,
    and teacher == student rows have all-zero summands: the loss is exactly clip x (one-hot rows)."""
    s, _, tokens = batch
    s = s.requires_grad_()
    one_hot = torch.full((N, V), -math.inf, dtype=f64).scatter(-1, tokens[:, None], 0.0)
    same = torch.log_softmax(s.detach() / T, -1)
    rows = torch.arange(N) % 3 == 0
    teacher = TeacherTargets(torch.where(rows[:, None], one_hot, same), None, torch.zeros(N, dtype=f64))
    clip = 1e-3
    loss, _ = distill_loss(s, teacher, cfg(beta=0.0, clip=clip))
    assert loss.item() == pytest.approx(clip * rows.sum().item(), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, s)
    assert grad[rows].abs().max() == 0  # clamped entries carry no gradient
    unclipped, _ = distill_loss(s.detach(), teacher, cfg(beta=0.0))
    assert unclipped.item() > 10 * loss.item()


@pytest.mark.parametrize("k", [None, K])
def test_stats_match_dense_and_merge(batch, k):
    s, t, tokens = batch
    teacher = make_teacher(t, tokens, k)
    c = cfg(beta=0.5, clip=0.05)
    loss, stats = distill_loss(s, teacher, c)

    p_s, p_t = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    if k is None:
        kl = dense_jsd(p_s, p_t, 0.0)
    else:
        kl = dense_jsd(*dense_topk(p_s, p_t, teacher.indices, "bucket"), 0.0)
    means = stats.means()
    assert means["tokens"] == N
    assert means["loss"] == pytest.approx(loss.item() / N)
    assert means["mismatch_kl"] == pytest.approx(kl.mean().item())
    assert means["top1_disagree"] == pytest.approx((p_s.argmax(-1) != p_t.argmax(-1)).double().mean().item())
    assert means["confidence"] == pytest.approx(p_s.max(-1).values.mean().item())
    assert 0 < means["top1_disagree"] < 1

    a, b = slice(0, 20), slice(20, N)
    halves = [
        distill_loss(
            s[p],
            TeacherTargets(
                teacher.logprobs[p], None if k is None else teacher.indices[p], teacher.sampled_logprob[p]
            ),
            c,
        )[1]
        for p in (a, b)
    ]
    merged = halves[0].merge(halves[1])
    torch.testing.assert_close(merged.as_tensor(), stats.as_tensor())
    assert DistillStats.from_tensor(merged.as_tensor()).means() == pytest.approx(means)


def test_teacher_targets_reject_misaligned_shapes():
    with pytest.raises(ValueError, match="indices"):
        TeacherTargets(torch.zeros(3, 4), torch.zeros(3, 5, dtype=torch.long), torch.zeros(3))
    with pytest.raises(ValueError, match="sampled_logprob"):
        TeacherTargets(torch.zeros(3, 4), None, torch.zeros(4))


def test_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 1.0]])
    # group 0: mean 0.5, unbiased std sqrt(1/3); group 1: constant; group 2: mean 1, std sqrt(2)
    s3 = 0.5 / math.sqrt(1 / 3)
    want = torch.tensor(
        [[s3, -s3, s3, -s3], [0.0] * 4, [2 / math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2), 0.0]]
    )
    torch.testing.assert_close(group_advantages(rewards, scale=True), want, rtol=0, atol=1e-5)
    centered = torch.tensor([[0.5, -0.5, 0.5, -0.5], [0.0] * 4, [2.0, -1.0, -1.0, 0.0]])
    torch.testing.assert_close(group_advantages(rewards, scale=False), centered)


def test_policy_gradient_loss_by_hand():
    logprobs = torch.tensor([0.5, 0.5, 0.5], dtype=f64).log().requires_grad_()
    old = torch.tensor([0.25, 0.5, 0.625], dtype=f64).log()  # ratios 2, 1, 0.8
    adv = torch.tensor([1.0, -1.0, -1.0], dtype=f64)
    loss = policy_gradient_loss(logprobs, old, adv, clip_eps=0.2)
    # token 0: min(2·1, 1.2·1) = 1.2 (clipped); token 1: ratio 1; token 2: min(-0.8, -0.8), inside the clip range
    torch.testing.assert_close(loss, torch.tensor([-1.2, 1.0, 0.8], dtype=f64))
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    torch.testing.assert_close(grad, torch.tensor([0.0, 1.0, 0.8], dtype=f64))

    ref = torch.tensor([0.5, 0.25, 1.0], dtype=f64).log()  # log(ref/p) = 0, -log 2, log 2
    k3 = torch.tensor([0.0, 0.5 + math.log(2) - 1, 2 - math.log(2) - 1], dtype=f64)
    with_kl = policy_gradient_loss(logprobs, old, adv, 0.2, ref_logprobs=ref, kl_coef=0.1)
    torch.testing.assert_close(with_kl, torch.tensor([-1.2, 1.0, 0.8], dtype=f64) + 0.1 * k3)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_gradient_loss(logprobs, old, adv, 0.2, kl_coef=0.1)
