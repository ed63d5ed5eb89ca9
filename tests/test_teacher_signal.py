"""The teacher-signal transforms and the guardrail statistics against hand computations (float64,
small vocabulary), and the config's refusals of the combinations they cannot serve."""

from __future__ import annotations

import math

import pytest
import torch

from atesd_ray.algorithms import check as check_algorithm
from atesd_ray.config import ConfigError, LossConfig, compose
from atesd_ray.losses import FORK_ENTROPY, TeacherTargets, distill_loss
from atesd_ray.teacher_signal import contrast_shift, entropy, gate_weight, peer

N, V, K, T = 9, 12, 4, 1.0
f64 = torch.float64


def _loss_cfg(**kw) -> LossConfig:
    return LossConfig(**{"temperature": T, "clip": None, "chunk_size": 4, **kw})


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return tuple(torch.randn(N, V, generator=g, dtype=f64) * 2 for _ in range(3))


def test_peer_picks_another_sample_of_the_same_problem_by_its_grade() -> None:
    uids = ["a", "a", "a", "b", "b"]
    samples = [0, 1, 2, 0, 1]
    rewards = [1.0, 0.0, 1.0, 0.0, 0.0]
    assert peer(uids, samples, rewards, 0, correct=True) == 2  # never the row itself
    assert peer(uids, samples, rewards, 1, correct=True) == 0  # the first by sample index
    assert peer(uids, samples, rewards, 0, correct=False) == 1
    assert peer(uids, samples, rewards, 3, correct=True) is None  # no correct sample of b
    assert peer(uids, samples, rewards, 4, correct=False) == 3


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "full"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_contrast_target_is_student_tilted_by_the_teacher_ratio(logits, tail, beta) -> None:
    """q ∝ p_S·(p_T/p_N)^λ on the coarsened support, by hand; rows without a negative keep p_T."""
    s_logits, t_logits, n_logits = logits
    lam = 0.7
    log_t, log_n = t_logits.log_softmax(-1), n_logits.log_softmax(-1)
    log_s = s_logits.log_softmax(-1)
    on = torch.tensor([True] * 6 + [False] * 3)
    indices = None if tail == "full" else log_t.topk(K, -1).indices
    shift, shift_tail = contrast_shift(log_t, log_n, lam, indices)
    values = log_t if indices is None else log_t.gather(-1, indices)
    targets = TeacherTargets(values, indices, log_t[:, 0], None, shift, shift_tail, on, None)
    cfg = _loss_cfg(beta=beta, topk_tail="bucket" if tail == "full" else tail)
    loss, _ = distill_loss(s_logits.clone().requires_grad_(), targets, cfg)

    p_s, p_t, p_n = log_s.exp(), log_t.exp(), log_n.exp()
    if indices is None:
        sup_s, sup_t, sup_n = p_s, p_t, p_n
    else:

        def coarse(p):
            top = p.gather(-1, indices)
            return top if tail == "renormalize" else torch.cat([top, 1 - top.sum(-1, keepdim=True)], -1)

        sup_s, sup_t, sup_n = coarse(p_s), coarse(p_t), coarse(p_n)
        if tail == "renormalize":
            sup_s, sup_t = sup_s / sup_s.sum(-1, keepdim=True), sup_t / sup_t.sum(-1, keepdim=True)
    q = sup_s * (sup_t / sup_n) ** lam
    q = q / q.sum(-1, keepdim=True)
    target = torch.where(on[:, None], q, sup_t)
    if beta == 0.0:
        want = (target * (target / sup_s).log()).sum()
    elif beta == 1.0:
        want = (sup_s * (sup_s / target).log()).sum()
    else:
        m = beta * target + (1 - beta) * sup_s
        want = (beta * target * (target / m).log() + (1 - beta) * sup_s * (sup_s / m).log()).sum()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-9, abs=1e-12)


def test_contrast_with_equal_contexts_leaves_the_student_where_it_is(logits) -> None:
    """Where both contexts agree the contrasted target is the student itself: no loss, no gradient."""
    s_logits, t_logits, _ = logits
    log_t = t_logits.log_softmax(-1)
    indices = log_t.topk(K, -1).indices
    shift, shift_tail = contrast_shift(log_t, log_t, 1.0, indices)
    on = torch.ones(N, dtype=torch.bool)
    targets = TeacherTargets(log_t.gather(-1, indices), indices, log_t[:, 0], None, shift, shift_tail, on)
    student = s_logits.clone().requires_grad_()
    loss, _ = distill_loss(student, targets, _loss_cfg(topk_tail="bucket"))
    loss.backward()
    assert abs(float(loss.detach())) < 1e-12 and float(student.grad.abs().max()) < 1e-12


def test_entropy_gate_weighs_each_token_by_the_teacher_entropy(logits) -> None:
    s_logits, t_logits, _ = logits
    log_t = t_logits.log_softmax(-1)
    h = -(log_t.exp() * log_t).sum(-1)
    assert torch.allclose(entropy(log_t), h)
    w = gate_weight(h, 0.5, 0.2)
    assert torch.allclose(w, 0.2 + 0.8 * torch.exp(-h / 0.5))
    assert float(gate_weight(torch.tensor([0.0]), 1.0, 0.1)) == 1.0  # a sure teacher counts fully
    assert float(gate_weight(torch.tensor([1e9]), 1.0, 0.1)) == pytest.approx(0.1)  # never below the floor
    cfg = _loss_cfg()
    plain = TeacherTargets(log_t, None, log_t[:, 0])
    gated = TeacherTargets(log_t, None, log_t[:, 0], weight=w)
    per_token = torch.stack(
        [
            distill_loss(
                s_logits[i : i + 1], TeacherTargets(log_t[i : i + 1], None, log_t[i : i + 1, 0]), cfg
            )[0]
            for i in range(N)
        ]
    )
    assert float(distill_loss(s_logits, gated, cfg)[0]) == pytest.approx(
        float((per_token * w).sum()), rel=1e-12
    )
    assert float(distill_loss(s_logits, plain, cfg)[0]) == pytest.approx(float(per_token.sum()), rel=1e-12)


def test_guardrail_statistics_by_hand(logits) -> None:
    """entropy, fork rate and the forks' entropy of the student, at the loss temperature."""
    s_logits, t_logits, _ = logits
    s_logits = s_logits * torch.linspace(0.05, 3.0, N, dtype=f64)[:, None]  # sure and unsure rows
    log_t = t_logits.log_softmax(-1)
    cfg = _loss_cfg(temperature=1.3)
    _, stats = distill_loss(s_logits, TeacherTargets(log_t, None, log_t[:, 0]), cfg)
    log_s = (s_logits / 1.3).log_softmax(-1)
    h = -(log_s.exp() * log_s).sum(-1)
    forks = h > FORK_ENTROPY
    assert 0 < int(forks.sum()) < N
    means = stats.means()
    assert means["entropy"] == pytest.approx(float(h.mean()), rel=1e-12)
    assert means["fork_rate"] == pytest.approx(float(forks.double().mean()), rel=1e-12)
    assert means["fork_entropy"] == pytest.approx(float(h[forks].mean()), rel=1e-12)


def test_contrast_shift_on_the_full_vocabulary_and_tail(logits) -> None:
    _, t_logits, n_logits = logits
    log_t, log_n = t_logits.log_softmax(-1), n_logits.log_softmax(-1)
    full, none = contrast_shift(log_t, log_n, 2.0, None)
    assert none is None and torch.allclose(full, 2.0 * (log_t - log_n))
    idx = log_t.topk(K, -1).indices
    top, tail = contrast_shift(log_t, log_n, 2.0, idx)
    mask = torch.ones(N, V, dtype=torch.bool).scatter(-1, idx, False)
    want_tail = 2.0 * (torch.log((log_t.exp() * mask).sum(-1)) - torch.log((log_n.exp() * mask).sum(-1)))
    assert torch.allclose(tail, want_tail) and torch.allclose(top, 2.0 * (log_t - log_n).gather(-1, idx))
    assert not math.isnan(float(tail.sum()))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (
            ["teacher.signal.contrast=reference_only", "teacher.engine=vllm", "teacher.topk=8"],
            "teacher.signal",
        ),
        (["teacher.signal.entropy_gate=true", "teacher.engine=vllm", "teacher.topk=8"], "teacher.signal"),
        (
            ["teacher.signal.contrast=reference_only", "algorithm.loss.kind=sampled_token"],
            "teacher.signal.contrast",
        ),
        (["teacher.context=hindsight"], "rollout.n_samples"),
        (["teacher.signal.contrast=wrong_hint"], "rollout.n_samples"),
        (["algorithm=sft", "teacher.signal.entropy_gate=true"], "teacher.signal"),
        (
            [
                "algorithm=opd",
                "teacher.model=tiny",
                "model=smollm2_135m",
                "teacher.context=hindsight",
                "rollout.n_samples=2",
            ],
            "teacher.context",
        ),
    ],
)
def test_config_refuses_what_a_transform_cannot_serve(overrides, key) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_algorithm(compose(*overrides))


def test_config_accepts_the_variants() -> None:
    for overrides in (
        [
            "algorithm=atesd",
            "teacher.signal.contrast=reference_only",
            "algorithm.loss.topk_tail=bucket",
            "teacher.topk=8",
        ],
        [
            "algorithm=opsd",
            "teacher.signal.contrast=wrong_hint",
            "teacher.context=hindsight",
            "rollout.n_samples=2",
        ],
        ["algorithm=atesd", "teacher.signal.entropy_gate=true"],
    ):
        cfg = check_algorithm(compose(*overrides))
        assert not cfg.teacher.signal.plain or cfg.teacher.context == "hindsight"


def _rollout(tok, cfg, rows: list[tuple[dict, int, float, str]]):
    """A rollout batch of the tiny tokenizer: (record, sample, reward, response text) per row."""
    import numpy as np
    from verl import DataProto

    from atesd_ray.prompts import encode_chat, student_messages
    from atesd_ray.sequences import left_pad, right_pad

    prompts = [encode_chat(tok, student_messages(r["problem"], cfg.prompts), False) for r, *_ in rows]
    responses = [tok(text, add_special_tokens=False)["input_ids"][:8] for *_, text in rows]
    p_ids, p_mask = left_pad(prompts, tok.pad_token_id)
    r_ids, r_mask = right_pad(responses, tok.pad_token_id)

    def column(values):
        return np.array(list(values), dtype=object)

    return DataProto.from_dict(
        tensors={
            "prompt_ids": p_ids,
            "prompt_mask": p_mask,
            "response_ids": r_ids,
            "response_mask": r_mask,
            "reward": torch.tensor([reward for _, _, reward, _ in rows]),
        },
        non_tensors={
            "uid": column(r["id"] for r, *_ in rows),
            "sample": column(s for _, s, _, _ in rows),
            "problem": column(r["problem"] for r, *_ in rows),
            "reference": column(r["reference"] for r, *_ in rows),
            "answer": column(r["answer"] for r, *_ in rows),
            "response_text": column(text for *_, text in rows),
            "extracted": column(None if reward else "7" for _, _, reward, _ in rows),
        },
    )


def test_the_teacher_sends_the_transforms_of_its_two_passes() -> None:
    """Hindsight context, wrong-hint contrast and the gate from the teacher actor's class: its prompts
    are the ones the rules name, and what it sends equals two direct forwards of the same model."""
    import dataclasses

    from atesd_ray.data.synthetic import generate
    from atesd_ray.prompts import encode_chat, teacher_messages
    from atesd_ray.sequences import response_logprobs, rows_to_lists
    from tests.conftest import TINY, make_config
    from workers.teacher import TeacherWorker

    cfg = make_config(
        *TINY,
        "algorithm.loss.temperature=1.0",
        "rollout.n_samples=3",
        "teacher.topk=8",
        "teacher.context=hindsight",
        "teacher.signal.contrast=wrong_hint",
        "teacher.signal.contrast_weight=0.5",
        "teacher.signal.entropy_gate=true",
    )
    teacher = TeacherWorker(cfg, 0)
    tok = teacher.tokenizer
    a, b = (dataclasses.asdict(r) for r in generate(2, seed=5))
    rows = [
        (a, 0, 0.0, "first wrong try, the answer is 7"),
        (a, 1, 1.0, "a correct peer reasoning"),
        (a, 2, 0.0, "second wrong try"),
        (b, 0, 1.0, "b alone, correct"),
    ]
    rollout = _rollout(tok, cfg, rows)
    out = teacher.score(rollout, 0.5)
    assert out.batch["hindsight"].tolist() == [1.0, 0.0, 1.0, 0.0]  # row 1 has no other correct sample
    assert out.batch["contrast_row"].tolist() == [1.0, 1.0, 1.0, 0.0]  # b has no wrong sample

    def prompt(problem, text, answer):
        return encode_chat(tok, teacher_messages(problem, text, answer, 0.5, cfg.prompts), False)

    # row 0: reads the correct peer (row 1); its negative is the first other wrong sample (row 2)
    positive = prompt(a["problem"], rows[1][3], a["answer"])
    negative = prompt(a["problem"], rows[2][3], "7")
    responses = rows_to_lists(rollout.batch["response_ids"], rollout.batch["response_mask"])
    width = rollout.batch["response_ids"].shape[1]
    with torch.no_grad():
        logp, _, mask = response_logprobs(
            teacher.model, [positive], responses[:1], tok.pad_token_id, 1.0, width
        )
        logp_n, _, _ = response_logprobs(
            teacher.model, [negative], responses[:1], tok.pad_token_id, 1.0, width
        )
    valid = mask[0].bool()
    top = logp[0].topk(8)
    torch.testing.assert_close(out.batch["teacher_logprobs"][0][valid], top.values[valid], atol=1e-5, rtol=0)
    shift, shift_tail = contrast_shift(logp[0], logp_n[0], 0.5, top.indices)
    torch.testing.assert_close(out.batch["teacher_shift"][0][valid], shift[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        out.batch["teacher_shift_tail"][0][valid], shift_tail[valid], atol=1e-5, rtol=0
    )
    weight = gate_weight(entropy(logp[0]), 1.0, 0.1)
    torch.testing.assert_close(out.batch["teacher_weight"][0][valid], weight[valid], atol=1e-5, rtol=0)
    assert not out.batch["teacher_contrast"][3].any()  # b keeps the plain target


VARIANTS = {
    "purified": (
        [
            "algorithm=atesd",
            "teacher.signal.contrast=reference_only",
            "teacher.topk=8",
            "algorithm.loss.topk_tail=bucket",
        ],
        {"contrast_frac": 1.0},
    ),
    "rlcsd_hindsight": (
        [
            "algorithm=opsd",
            "teacher.signal.contrast=wrong_hint",
            "teacher.context=hindsight",
            "rollout.n_samples=2",
        ],
        {},
    ),
    "egrsd": (["algorithm=atesd", "teacher.signal.entropy_gate=true"], {}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_trains_end_to_end(ray_cluster, tmp_path, variant) -> None:
    """Two steps of each variant on the tiny model: a finite loss, the variant's own metrics and the
    guardrails every step, and a complete checkpoint."""
    import json

    from atesd_ray.modes.train import run
    from tests.conftest import TINY, make_config

    overrides, exact = VARIANTS[variant]
    cfg = make_config(*TINY, *overrides, f"run_dir={tmp_path}")
    run(cfg, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1]
    for m in lines:
        assert math.isfinite(m["loss"]) and m["tokens"] > 0
        assert 0.0 <= m["fork_rate"] <= 1.0 and m["entropy"] > 0 and m["response_len"] > 0
        for key, value in exact.items():
            assert m[key] == value
        if cfg.teacher.context == "hindsight":
            assert 0.0 <= m["hindsight_frac"] <= 1.0 and 0.0 <= m["contrast_frac"] <= 1.0
        if cfg.teacher.signal.entropy_gate:
            assert 0.1 <= m["gate_weight"] <= 1.0
    assert (tmp_path / "checkpoints" / "step_2" / "COMPLETE").exists()
