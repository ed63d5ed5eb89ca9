"""``algorithm``: which algorithm runs, what several share (the fixed exposure, the distillation
loss), and one section for each algorithm with settings of its own. Only settings live here: an
algorithm's rules about the rest of the config are its module's ``check`` (``atesd_ray/algorithms``),
run with the config's own checks before any actor starts (``algorithms.check``)."""

from __future__ import annotations

from dataclasses import dataclass

from atesd_ray.config.training import LossConfig
from atesd_ray.schema import (
    Section,
    at_least,
    between,
    non_negative,
    one_of,
    positive,
    setting,
)


@dataclass
class GRPOConfig(Section):
    n_samples: int = setting(8, at_least(2, "GRPO needs groups of >= 2"))
    clip_eps: float = setting(0.2, positive)
    # k3 KL to the frozen step-0 model (the teacher actor); 0 skips the reference pass
    kl_coef: float = setting(0.0, non_negative)
    scale_rewards: bool = True  # divide by the group's std (TRL scale_rewards="group")
    # token_mean: sum over all tokens / tokens (DAPO, TRL "dapo"); seq_mean_token_mean: token mean per
    # response, then the mean over responses (TRL loss_type="grpo", the OPSD repository's baseline)
    loss_agg: str = setting("token_mean", one_of("token_mean", "seq_mean_token_mean"))


@dataclass
class SFTConfig(Section):
    # reference tokens trained on per example; longer references are cut (counted as truncated_frac)
    max_response_tokens: int = setting(4096, positive)
    # the fraction of examples trained after the privileged teacher prompt (at an exposure drawn
    # uniformly from [0, 1]) instead of the student's: teaches a small model to read a reference, so
    # that it can be its own privileged teacher afterwards (the embedded demo's warm-up)
    teacher_prompt_frac: float = setting(0.0, between(0.0, 1.0))


@dataclass
class MotabConfig(Section):
    eps0: float = setting(0.2, positive)
    theta: float = setting(1.0, non_negative)
    entropy_topk: int = setting(20, positive)
    step_delimiter: str = setting(".\n\n", lambda v: None if v else "must not be empty")
    max_steps: int = setting(16, positive)
    max_step_tokens: int = setting(
        512, positive
    )  # a step not ended by the delimiter within this many tokens is cut there
    teacher_temperature: float = setting(0.6, positive)
    n_trajectories: int = setting(
        5, positive
    )  # per problem, in synthesis and on-policy (rollout.n_samples is not used)
    prefix_weight: float = setting(1.0, non_negative)  # distillation loss on the accepted student prefix
    suffix_weight: float = setting(1.0, non_negative)  # teacher-forced NLL on the teacher's suffix
    skd_gamma: float = setting(0.9, between(0.0, 10.0))


@dataclass
class AlgorithmConfig(Section):
    # one of the algorithms of atesd_ray/algorithms (checked there, with the rest of their rules)
    name: str = "opsd"
    # the fixed reveal ratio of opsd (1.0), fixed_exposure and a self-taught MOTAB
    alpha: float = setting(1.0, between(0.0, 1.0))
    # OPSD's per-size point-wise clip (the model presets set it: 0.05 for 1.7B, 1e-6 for 4B, 1e-7 for
    # 8B); the self-distillation algorithms take it as loss.clip (conf/config.yaml), OPD does not
    opsd_clip: float | None = setting(0.05, positive)
    loss: LossConfig = setting(LossConfig)
    grpo: GRPOConfig = setting(GRPOConfig)
    sft: SFTConfig = setting(SFTConfig)
    motab: MotabConfig = setting(MotabConfig)
