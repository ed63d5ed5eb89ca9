"""GRPO (baseline): n graded samples per prompt, group-normalized rewards, a PPO-clipped policy
gradient, an optional k3 KL to the frozen step-0 model.

rollout (``rollout.n_samples`` = ``algorithm.grpo.n_samples`` responses per prompt, graded by the
rollout actor: batch key ``reward``) -> [frozen teacher: reference log-probs, only when
``algorithm.grpo.kl_coef`` > 0] -> student update. The rollout's sampled-token log-probs are the
old policy's; with ``max_staleness: 1`` the next batch's rollouts are generated before the sync,
one version behind, and the clipped ratio corrects for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import ray
import torch
from torch import Tensor

from atesd_ray.algorithms.base import Algorithm, Launched, launch_rollouts
from atesd_ray.chunked import Project, over_chunks, student_logprobs
from atesd_ray.objective import ON_POLICY_KEYS, Objective, Prepared, Response, fetch, rollout_metrics, take
from atesd_ray.schema import require

if TYPE_CHECKING:
    from atesd_ray.assembly import Actors
    from atesd_ray.config import Config, GRPOConfig
    from atesd_ray.objective import Trainer


def group_advantages(rewards: Tensor, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """[G, n] rewards -> r - mean over the group, divided by (std + eps) when ``scale`` (unbiased std, as TRL)."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    return centered / (rewards.std(dim=1, keepdim=True) + eps) if scale else centered


def groups_of(group_ids: Sequence[str]) -> dict[str, list[int]]:
    """The rows of each group, by group id, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, gid in enumerate(group_ids):
        groups.setdefault(gid, []).append(i)
    return groups


def advantages_by_group(group_ids: Sequence[str], rewards: Tensor, scale: bool = True) -> Tensor:
    """[B] group-normalized advantages of responses listed in any order; ``group_ids[i]`` names the
    prompt of response ``i`` (its uid), and every group is normalized on its own."""
    out = torch.zeros_like(rewards, dtype=torch.float32)
    for idx in groups_of(group_ids).values():
        if len(idx) < 2:
            raise ValueError(f"group '{group_ids[idx[0]]}' has one response; group advantages need >= 2")
        out[idx] = group_advantages(rewards[idx].float()[None], scale)[0]
    return out


def policy_gradient_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_eps: float,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Tensor:
    """Per-token PPO-clipped policy-gradient loss, plus kl_coef · k3 KL estimate to a reference.

    All inputs are [N] (advantages already broadcast to tokens). k3 = exp(r) - r - 1 with
    r = log p_ref - log p (Schulman's unbiased, non-negative estimator of KL(p || p_ref)).
    """
    ratio = (logprobs - old_logprobs.detach()).exp()
    advantages = advantages.detach()
    loss = -torch.minimum(ratio * advantages, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages)
    if kl_coef:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        log_ratio = ref_logprobs.detach() - logprobs
        loss = loss + kl_coef * (log_ratio.exp() - log_ratio - 1.0)
    return loss


def _pg_chunk(
    logits: Tensor,
    tokens: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    weights: Tensor,
    ref_logprobs: Tensor | None,
    *,
    clip_eps: float,
    kl_coef: float,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(weighted loss, loss, k3 KL to the reference, clipped tokens), summed over the chunk."""
    logprobs = student_logprobs(logits, temperature).gather(-1, tokens[:, None]).squeeze(-1)
    per_token = policy_gradient_loss(logprobs, old_logprobs, advantages, clip_eps, ref_logprobs, kl_coef)
    with torch.no_grad():
        lp = logprobs.detach()
        ratio = (lp - old_logprobs).exp()
        clipped = ((advantages > 0) & (ratio > 1 + clip_eps)) | ((advantages < 0) & (ratio < 1 - clip_eps))
        if ref_logprobs is None:
            kl = lp.new_zeros(())
        else:
            log_ratio = ref_logprobs - lp
            kl = (log_ratio.exp() - log_ratio - 1.0).sum()
    return (per_token * weights).sum(), per_token.detach().sum(), kl, clipped.sum().to(lp.dtype)


def policy_gradient_sum(
    student: Tensor,
    tokens: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    weights: Tensor,
    *,
    clip_eps: float,
    temperature: float,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    project: Project | None = None,
    chunk_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Σ weights · :func:`policy_gradient_loss` over tokens, and [4] statistics sums (that loss
    unweighted, k3 KL to the reference, clipped tokens, tokens).

    All token inputs are [N] over valid response positions. ``weights`` sets the aggregation
    (1 / global tokens: token mean; 1 / (length · sequences): mean over sequences of the token
    mean). The student's log-probs are taken at ``temperature``, the rollout's sampling temperature,
    so the ratio compares like with like (the rollout log-probs are at that temperature too).
    ``student``/``project`` as in :func:`distill_loss`: chunked under activation checkpointing.
    """
    fn = partial(_pg_chunk, clip_eps=clip_eps, kl_coef=kl_coef, temperature=temperature)
    rows = (
        tokens,
        old_logprobs.detach(),
        advantages.detach(),
        weights.detach(),
        None if ref_logprobs is None else ref_logprobs.detach(),
    )
    loss, plain, kl, clipped = over_chunks(fn, student, rows, project, chunk_size)
    count = torch.tensor(float(student.shape[0]), device=loss.device, dtype=torch.float64)
    return loss, torch.stack([plain.detach().double(), kl.double(), clipped.double(), count])


class GRPOObjective(Objective):
    stats = ("pg_loss", "kl_ref", "clip_frac", "tokens", "objective")

    def __init__(self, settings: GRPOConfig, temperature: float):
        self.settings = settings
        self.temperature = temperature  # the rollout's: its log-probs are the old policy's at it

    def prepare(
        self, trainer: Trainer, step: int, rollout_refs: list, reference_refs: list | None
    ) -> Prepared:
        rollout, rollout_meta = fetch(rollout_refs)
        g = self.settings
        uids = [str(u) for u in rollout.non_tensor_batch["uid"]]
        advantages = advantages_by_group(uids, rollout.batch["reward"], g.scale_rewards)
        mask = rollout.batch["response_mask"].float()
        lengths = mask.sum(-1)
        if g.loss_agg == "token_mean":
            weights = mask * trainer.world / lengths.sum().clamp(min=1.0)
        else:
            weights = mask / lengths.clamp(min=1.0)[:, None] * trainer.world / len(rollout)
        rows = take(rollout, ON_POLICY_KEYS) | {
            "advantages": advantages,
            "token_weights": weights,
        }
        if reference_refs:
            rows["ref_logprobs"] = fetch(reference_refs)[0].batch["ref_logprobs"]
        rewards = rollout.batch["reward"].float()
        groups = groups_of(uids)
        info = {
            "reward_std": float(torch.stack([rewards[idx].std() for idx in groups.values()]).mean()),
            "zero_adv_frac": sum(bool((rewards[idx] == rewards[idx[0]]).all()) for idx in groups.values())
            / len(groups),
            "world": trainer.world,
        } | rollout_metrics(step, rollout, rollout_meta)
        return Prepared(rows, info=info)

    def loss(self, out: Response, rows: dict, prepared: Prepared) -> tuple:
        valid = out.valid
        loss, stats = policy_gradient_sum(
            out.hidden,
            out.tokens,
            rows["rollout_logprobs"][valid],
            rows["advantages"][:, None].expand(valid.shape)[valid],
            rows["token_weights"][valid],
            clip_eps=self.settings.clip_eps,
            kl_coef=self.settings.kl_coef,
            temperature=self.temperature,
            ref_logprobs=rows["ref_logprobs"][valid] if "ref_logprobs" in rows else None,
            project=out.head,
        )
        return loss, torch.cat([stats, loss.detach().double()[None] / prepared.info["world"]])

    def metrics(self, totals: dict[str, float], prepared: Prepared) -> dict:
        tokens = max(totals["tokens"], 1.0)
        info = {k: v for k, v in prepared.info.items() if k != "world"}
        return {
            "loss": totals["objective"],
            "pg_loss": totals["pg_loss"] / tokens,
            "kl_ref": totals["kl_ref"] / tokens,
            "clip_frac": totals["clip_frac"] / tokens,
            "tokens": int(totals["tokens"]),
        } | info


class GRPO(Algorithm):
    prefetches = True

    def check(self, cfg: Config) -> None:
        g = cfg.algorithm.grpo
        require(
            cfg.rollout.n_samples == g.n_samples,
            "rollout.n_samples",
            f"GRPO draws algorithm.grpo.n_samples={g.n_samples} responses per prompt; "
            f"rollout.n_samples is {cfg.rollout.n_samples}",
        )
        require(
            g.kl_coef == 0 or (cfg.teacher.weights == "frozen" and cfg.teacher.model is None),
            "teacher.weights",
            f"GRPO's KL reference is the frozen step-0 model; algorithm.grpo.kl_coef={g.kl_coef} needs "
            f"teacher.weights=frozen and no teacher.model, got {cfg.teacher.weights} and {cfg.teacher.model}",
        )
        require(
            cfg.teacher_engine != "vllm",
            "teacher.engine",
            "GRPO's KL reference log-probs are computed by forward passes; use teacher.engine=hf",
        )

    def objective(self, cfg: Config, signals: frozenset[str]) -> GRPOObjective:
        return GRPOObjective(cfg.algorithm.grpo, cfg.rollout.temperature)

    def launch(
        self, cfg: Config, actors: Actors, step: int, batch: list[dict], rollouts: list[ray.ObjectRef] | None
    ) -> Launched:
        rollouts = rollouts or launch_rollouts(actors, batch, step, min_version=step)
        reference = None
        if cfg.algorithm.grpo.kl_coef:
            reference = actors.teachers.reference_logprobs(rollouts, cfg.rollout.temperature)
        return Launched(actors.students.train_step(step, rollouts, reference))


ALGORITHMS = (GRPO("grpo"),)
