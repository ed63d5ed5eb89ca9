"""MOTAB / SKD logic (DESIGN §5): the adaptive boundary, the teacher's step values and entropies on
SmolLM2, root-cause selection, stitching, the one-intervention rule, SKD's accept rule, and the
student objective that mixes distillation and NLL by token masks (tiny Qwen3)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from atesd_ray.config import ConfigError
from atesd_ray.data.synthetic import generate
from atesd_ray.losses import DistillStats, TeacherTargets, distill_loss
from atesd_ray.models import load_model, load_tokenizer
from atesd_ray.prompts import render_chat, student_messages, teacher_messages
from atesd_ray.sampling import SamplingParams
from atesd_ray.sequences import join, response_slice
from atesd_ray.trajectories import (
    STUDENT,
    TEACHER,
    Step,
    Trajectory,
    TrajectoryError,
    observe_motab_step,
    root_cause,
    safety_boundary,
    skd_accept,
    stitch,
)
from tests.conftest import make_config

REVISE = "\n\nHowever,\n\n"


def _step(
    value: float,
    boundary: float = 0.1,
    text: str = "x.\n\n",
    ids: list[int] | None = None,
    author: str = STUDENT,
) -> Step:
    return Step(ids or [1, 2], text, value, 1.0, boundary, 0.5, author=author)


def test_boundary_is_eps0_times_exp_of_minus_theta_entropy():
    assert safety_boundary(0.0, 0.2, 1.0) == pytest.approx(0.2)
    assert safety_boundary(1.5, 0.2, 1.0) == pytest.approx(0.2 * math.exp(-1.5))
    assert safety_boundary(2.0, 0.2, 0.5) == pytest.approx(0.2 * math.exp(-1.0))
    assert safety_boundary(3.0, 0.2, 0.0) == pytest.approx(0.2)  # theta = 0: a fixed gate
    # an uncertain teacher loosens the gate
    assert safety_boundary(2.5, 0.2, 1.0) < safety_boundary(0.5, 0.2, 1.0)


TEACHERS = {
    # the privileged self-teacher at exposure 0.5
    "self": ("algorithm=motab",),
    # a separate model as the teacher of the tiny student: it sees the student's prompt
    "separate": ("algorithm=motab", "model=tiny", "teacher.model=smollm2_135m"),
}


@pytest.mark.parametrize("kind", TEACHERS)
def test_teacher_step_values_are_the_geometric_mean_probability_and_topk_entropy(kind):
    """Batched, padded step_values against a direct SmolLM2 forward of each state alone."""
    from workers.teacher import TeacherWorker

    cfg = make_config(*TEACHERS[kind], "cluster.torch_threads=1")
    teacher = TeacherWorker(cfg)
    assert (
        teacher.model.config.model_type == "llama"
        and teacher.privileged == (kind == "self")
        and teacher.shared_vocab
    )
    tok = teacher.tokenizer
    records = [dataclasses.asdict(r) for r in generate(2, seed=7, levels=[1])]
    pieces = [
        ("To solve this, ", "we add the numbers.\n\n"),
        ("", "First, multiply the price by the count to get the cost of the apples.\n\n"),
    ]
    items = []
    for r, (prefix, step) in zip(records, pieces, strict=True):
        p_ids, s_ids = (
            tok(prefix, add_special_tokens=False)["input_ids"],
            tok(step, add_special_tokens=False)["input_ids"],
        )
        items.append(
            {
                "uid": r["id"],
                "problem": r["problem"],
                "reference": r["reference"],
                "answer": r["answer"],
                "prefix_ids": p_ids,
                "prefix_text": prefix,
                "step_ids": s_ids,
                "step_text": step,
            }
        )
    got = teacher.step_values(items, 0.5)
    for it, out in zip(items, got, strict=True):
        if kind == "self":
            messages = teacher_messages(it["problem"], it["reference"], it["answer"], 0.5, cfg.prompts)
        else:
            messages = student_messages(it["problem"], cfg.prompts)
        ids = (
            tok(render_chat(tok, messages, False), add_special_tokens=False)["input_ids"]
            + it["prefix_ids"]
            + it["step_ids"]
        )
        with torch.no_grad():
            logp = torch.log_softmax(teacher.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        start = len(ids) - len(it["step_ids"])  # first step token
        token_lp = [logp[start - 1 + j, t] for j, t in enumerate(it["step_ids"])]
        value = math.exp(sum(token_lp) / len(token_lp))
        top = logp[start - 1].exp().topk(20).values
        p = top / top.sum()
        entropy = float(-(p * p.log()).sum())
        assert out["value"] == pytest.approx(value, rel=1e-3)
        assert out["entropy"] == pytest.approx(entropy, rel=1e-3, abs=1e-4)
        assert 0.0 < out["value"] < 1.0 and 0.0 < out["entropy"] <= math.log(20) + 1e-6
    if kind == "separate":  # the teacher writes on from a state, in the student's tokens
        written = teacher.continue_from(
            items[:1], 0.5, SamplingParams(temperature=0.6, max_new_tokens=4, logprobs=False), 0
        )[0]
        assert written["ended"] in ("eos", "length", "step") and tok.decode(written["ids"]) == written["text"]


def test_root_cause_is_the_steepest_drop_after_a_safe_step():
    # drops after safe steps: k=1: -0.1, k=2: -0.5, k=3: -0.25 -> t* = 2
    assert root_cause([0.9, 0.8, 0.3, 0.05], [0.1] * 4) == 2
    # the steepest drop (k=2, -0.85) follows an unsafe step (0.85 < 0.9) and does not count
    assert root_cause([0.95, 0.85, 0.0], [0.1, 0.9, 0.1]) == 1
    # a rise after an unsafe step is skipped as well: k=1 (-0.85) beats k=3 (-0.58)
    assert root_cause([0.9, 0.05, 0.6, 0.02], [0.1] * 4) == 1
    # ties go to the earliest step
    assert root_cause([0.75, 0.5, 0.25, 0.0], [0.5, 0.5, 0.9, 0.1]) == 1
    # fallbacks: one step; no safe step before any other -> argmin V
    assert root_cause([0.01], [0.1]) == 0
    assert root_cause([0.05, 0.3, 0.01], [0.1, 0.5, 0.1]) == 2
    with pytest.raises(ValueError, match="one boundary per value"):
        root_cause([0.1, 0.2], [0.1])


def test_stitching_keeps_every_student_step_then_the_revise_phrase_then_the_suffix():
    assert (
        stitch(["A = 2.\n\n", "B is wrong.\n\n"], REVISE, "C = 4.")
        == "A = 2.\n\nB is wrong.\n\nHowever,\n\nC = 4."
    )
    # a step cut at its token cap has no blank line after it: the whole phrase follows
    assert stitch(["A = 2.\n\n", "B is wro"], REVISE, "C = 4.") == "A = 2.\n\nB is wro\n\nHowever,\n\nC = 4."

    tok = load_tokenizer(make_config().model)

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    texts = [
        "Lily saves 8 x 9 = 72 dollars.\n\n",
        "So she has 72 + 1 = 70 dollars.\n\n",
        "She spends 40.\n\n",
    ]
    t = Trajectory({"id": "p"}, 0)
    for text, value in zip(texts, [0.6, 0.5, 0.01], strict=True):
        observe_motab_step(
            t, Step(enc(text), text, value, 1.0, 0.1, 0.5), "step", max_steps=8, max_tokens=512
        )
    assert t.breach == 2 and t.t_star == 2  # the drop at step 2 (-0.49) beats step 1's (-0.1)
    suffix = "She spends 29, so 100 - 29 = 71.\n\nThe final answer is \\boxed{71}."
    t.take_over(enc(suffix), suffix, "eos")
    target = t.text(REVISE)
    assert target == "".join(texts) + "However,\n\n" + suffix
    pieces = t.segments(enc(t.revise(REVISE)), tok.eos_token_id)
    assert [role for _, role in pieces] == ["distill", "distill", "context", "nll", "nll"]
    ids = [i for p, _ in pieces for i in p]
    assert ids[-1] == tok.eos_token_id  # the teacher finished: the target ends with EOS
    assert tok.decode(ids[:-1]) == target


def test_one_intervention_per_trajectory():
    t = Trajectory({"id": "p"}, 0)
    assert observe_motab_step(t, _step(0.5), "step", max_steps=8, max_tokens=512) is False
    assert t.live and t.breach is None
    assert observe_motab_step(t, _step(0.02), "step", max_steps=8, max_tokens=512) is True
    assert (t.end, t.breach, t.t_star) == ("takeover", 1, 1)
    assert t.resume_steps == t.steps[:1]  # the state before t*: the first step
    with pytest.raises(TrajectoryError, match="already had its intervention"):
        t.intervene(0)
    with pytest.raises(TrajectoryError, match="has ended"):
        observe_motab_step(t, _step(0.01), "step", max_steps=8, max_tokens=512)
    t.take_over([3], "z", "length")
    with pytest.raises(TrajectoryError, match="exactly one intervention"):
        t.take_over([4], "w", "eos")
    untouched = Trajectory({"id": "q"}, 0)
    with pytest.raises(TrajectoryError, match="exactly one intervention"):
        untouched.take_over([3], "z", "eos")
    # without a breach a trajectory ends at EOS or its limits, with its steps as they are
    done = Trajectory({"id": "r"}, 0)
    observe_motab_step(done, _step(0.9, ids=[5, 6, 7]), "step", max_steps=8, max_tokens=5)
    observe_motab_step(done, _step(0.9, ids=[8, 9, 10]), "step", max_steps=8, max_tokens=5)
    assert done.end == "max_tokens" and done.breach is None and done.text(REVISE) == "x.\n\nx.\n\n"
    eos = Trajectory({"id": "s"}, 0)
    observe_motab_step(eos, _step(0.9), "eos", max_steps=8, max_tokens=512)
    assert (
        eos.end == "eos"
        and [r for _, r in eos.segments([], 0)] == ["distill"]
        and eos.segments([], 0)[0][0] == [1, 2, 0]
    )


def test_skd_accepts_a_step_when_the_teacher_likes_it_more_than_gamma_times_the_student():
    assert skd_accept(0.5, 0.5, 0.9)
    assert skd_accept(0.46, 0.5, 0.9)
    assert not skd_accept(0.45, 0.5, 0.9)  # strictly more than gamma x
    assert not skd_accept(0.2, 0.5, 0.9)
    assert skd_accept(0.2, 0.5, 0.3)
    # a rewritten step trains as teacher tokens
    t = Trajectory({"id": "p"}, 0)
    t.add_step(_step(0.9), "step", 8, 512)
    t.add_step(_step(0.1, author=TEACHER), "step", 8, 512)
    assert [r for _, r in t.segments([], 0)] == ["distill", "nll"]


def test_config_checks_the_teacher_model_and_the_synthesis_algorithm():
    assert (
        make_config("algorithm=motab", "teacher.model=smollm2_135m", "model=tiny").teacher.model
        == "smollm2_135m"
    )
    with pytest.raises(ConfigError, match="teacher.model.*allowed values"):
        make_config("algorithm=motab", "teacher.model=gpt5")
    with pytest.raises(ConfigError, match="is the student"):
        make_config("algorithm=motab", "teacher.model=smollm2_135m")
    with pytest.raises(ConfigError, match="teacher.weights"):
        make_config(
            "algorithm=skd",
            "model=tiny",
            "teacher.model=smollm2_135m",
            "teacher.weights=live",
        )
    with pytest.raises(ConfigError, match="'algorithm'.*motab, skd"):
        make_config("mode=motab_synthesize", "algorithm=opsd")
    with pytest.raises(ConfigError, match="controller.granularity"):
        make_config("algorithm=motab", "controller.kind=atesd", "controller.granularity=example")


def test_student_objective_mixes_distillation_and_nll_by_token_masks():
    """MOTAB's objective through the student's FSDP root (``StudentPolicy``) against a direct
    computation on the tiny Qwen3's logits."""
    from atesd_ray.algorithms.motab import distill_and_nll
    from workers.student import StudentPolicy

    cfg = make_config("model=tiny", "algorithm=motab")
    torch.manual_seed(0)
    student = load_model(cfg.model, vocab_size=len(load_tokenizer(cfg.model)))
    teacher_cfg = dataclasses.replace(cfg.model, tiny=dataclasses.replace(cfg.model.tiny, init_seed=1))
    teacher = load_model(teacher_cfg, vocab_size=student.config.vocab_size)
    vocab = student.config.vocab_size
    prompt_ids = torch.randint(0, vocab, (2, 5))
    prompt_mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    response_ids = torch.randint(0, vocab, (2, 6))
    response_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    distill_mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    nll_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]])  # row 1, token 1-2: context only
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "response_ids": response_ids,
        "response_mask": response_mask,
        "distill_mask": distill_mask,
        "nll_mask": nll_mask,
    }
    ids, mask, pos, start = join(prompt_ids, prompt_mask, response_ids, response_mask)
    with torch.no_grad():
        t_logits = response_slice(
            teacher(input_ids=ids, attention_mask=mask, position_ids=pos).logits, start, 6
        )
    loss_cfg = cfg.algorithm.loss
    t_logp = torch.log_softmax(t_logits.float() / loss_cfg.temperature, -1)
    on = distill_mask.bool()
    targets = TeacherTargets(t_logp[on], None, t_logp[on].gather(-1, response_ids[on][:, None]).squeeze(-1))

    # the teacher's targets travel per row, as the student's rows hold them
    batch |= {
        "teacher_logprobs": t_logp,
        "teacher_sampled_logprob": t_logp.gather(-1, response_ids[..., None]).squeeze(-1),
    }
    distill, nll, stats = StudentPolicy(student)(
        batch, lambda out, rows: distill_and_nll(out, rows, loss_cfg)
    )
    (distill + nll).backward()
    assert student.get_input_embeddings().weight.grad.abs().sum() > 0
    distill, nll = float(distill.detach()), float(nll.detach())

    with torch.no_grad():
        s_logits = response_slice(
            student(input_ids=ids, attention_mask=mask, position_ids=pos).logits, start, 6
        )
    want_distill, _ = distill_loss(s_logits[on], targets, loss_cfg)
    want_nll = F.cross_entropy(
        s_logits[nll_mask.bool()].float(), response_ids[nll_mask.bool()], reduction="sum"
    )
    assert distill == pytest.approx(float(want_distill), rel=1e-4) and distill > 0
    assert nll == pytest.approx(float(want_nll), rel=1e-4) and nll > 0
    # the distillation token count, then the NLL sum and its token count: 3 distill, 6 NLL
    assert stats.tolist()[len(DistillStats.FIELDS) - 1 :] == [3.0, pytest.approx(nll, rel=1e-4), 6.0]
