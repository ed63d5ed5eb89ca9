"""Student trainer rank: one process of an FSDP2 group (gloo on CPU, NCCL on GPU).

Every rank holds a shard of the student; a step resolves the rollout and teacher object refs
inside the actor (never in the driver), trains on its contiguous share of rows, accumulates gradients over
micro-batches to the configured effective batch, clips, and steps AdamW. Losses are sums divided
by the global number of valid response tokens, so N ranks give the gradient of one process that
saw the whole batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import ray
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from verl import DataProto

from atesd_ray.config import Config
from atesd_ray.losses import (
    DistillStats,
    TeacherTargets,
    advantages_by_group,
    distill_loss,
    mismatch_per_token,
    nll_loss,
    policy_gradient_sum,
)
from atesd_ray.models import DTYPES, load_model, load_tokenizer
from atesd_ray.prompts import render_chat, student_messages, teacher_messages
from atesd_ray.runtime.broadcast_group import BroadcastGroup, free_port
from atesd_ray.runtime.checkpoint import check_fingerprint, fingerprint, load_tensors
from atesd_ray.runtime.cuda_ipc import share
from atesd_ray.runtime.hf_export import HF_DIR, save_hf_model
from atesd_ray.runtime.weight_formats import stream_weights
from atesd_ray.runtime.weights import PackedWeights, TensorSpec, bucket_bytes, flatten, layout, pack
from atesd_ray.sequences import join, left_pad, response_slice, right_pad
from workers.common import once_per_step, send_buckets, setup_actor, take_bucket

log = logging.getLogger(__name__)

CHECKPOINT_FILES = ("student.safetensors", "optimizer.pt", "student_state.json")


class StudentPolicy(nn.Module):
    """The FSDP root: decoder forward plus a chunked loss on the response positions.

    Objectives: "distill" (teacher targets), "nll" (SFT, probe), "pg" (GRPO: clipped policy
    gradient on the rollout's tokens, ``loss_cfg`` a GRPOConfig, log-probs at ``temperature``),
    "logprobs" and "mismatch" (per-token statistics against teacher targets, no graph).

    The loss runs inside the root's forward so the LM head (often tied to the embedding) stays
    unsharded while it is applied chunk by chunk, and is unsharded again for the backward pass.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        objective: str,
        loss_cfg=None,
        teacher: TeacherTargets | None = None,
        temperature: float = 1.0,
    ):
        ids, mask, pos, start = join(
            batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], batch["response_mask"]
        )
        hidden = self.model.get_decoder()(
            input_ids=ids, attention_mask=mask, position_ids=pos
        ).last_hidden_state
        valid = batch["response_mask"].bool()
        h = response_slice(hidden, start, valid.shape[1])[valid]
        tokens = batch["response_ids"][valid]
        head = self.model.get_output_embeddings()
        if objective == "distill":
            loss, stats = distill_loss(h, teacher, loss_cfg, tokens=tokens, project=head)
            return loss, stats.as_tensor()
        if objective == "nll":
            return nll_loss(h, tokens, project=head), torch.tensor(float(tokens.numel()))
        if objective == "distill_nll":
            # MOTAB / SKD: the two sums apart, so the caller weighs them; the teacher targets are those
            # of the distill positions; stats: DistillStats of those, then the NLL sum and token count
            on_distill = batch["distill_mask"].bool()[valid]
            on_nll = batch["nll_mask"].bool()[valid]
            distill, stats = distill_loss(
                h[on_distill], teacher, loss_cfg, tokens=tokens[on_distill], project=head
            )
            nll = nll_loss(h[on_nll], tokens[on_nll], project=head)
            extra = torch.stack([nll.detach().double(), on_nll.sum().double()]).to(stats.loss.device)
            return distill, nll, torch.cat([stats.as_tensor(), extra])
        if objective == "pg":
            advantages = batch["advantages"][:, None].expand(valid.shape)[valid]
            ref = batch["ref_logprobs"][valid] if "ref_logprobs" in batch else None
            return policy_gradient_sum(
                h,
                tokens,
                batch["rollout_logprobs"][valid],
                advantages,
                batch["token_weights"][valid],
                clip_eps=loss_cfg.clip_eps,
                kl_coef=loss_cfg.kl_coef,
                temperature=temperature,
                ref_logprobs=ref,
                project=head,
            )
        if objective == "mismatch":
            return mismatch_per_token(
                h, teacher, loss_cfg.temperature, project=head, chunk_size=loss_cfg.chunk_size
            )
        if objective == "logprobs":
            return torch.log_softmax(head(h).float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        raise ValueError(f"unknown objective '{objective}'")


def lr_lambda(cfg: Config):
    t = cfg.trainer

    def factor(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.total_steps - t.warmup_steps))
        shape = 1.0 - progress if t.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * shape

    return factor


def _shard(n: int, rank: int, world: int) -> range:
    """Contiguous rows of rank ``rank`` out of ``n``."""
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


def _rows(data: DataProto, keys: tuple[str, ...], idx: list[int]) -> dict[str, torch.Tensor]:
    return {k: data.batch[k][idx] for k in keys}


ROLLOUT_KEYS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")


def concat(parts: list[DataProto]) -> tuple[DataProto, list[dict]]:
    """One batch from per-chunk batches, and their per-chunk meta (which differs, e.g. timings).

    Each chunk is padded to its own widths (another replica, other prompts), so per-position
    tensors are first padded to the widest chunk: prompts on the left, responses and per-token
    targets on the right, with masks 0 over the padding.
    """
    metas = [p.meta_info for p in parts]
    for p in parts:
        p.meta_info = {}
    for key in parts[0].batch.keys():
        if parts[0].batch[key].dim() < 2:
            continue
        width = max(p.batch[key].shape[1] for p in parts)
        for p in parts:
            gap = width - p.batch[key].shape[1]
            if gap:
                side = [gap, 0] if key.startswith("prompt_") else [0, gap]
                p.batch[key] = torch.nn.functional.pad(p.batch[key], [0, 0] * (p.batch[key].dim() - 2) + side)
    return DataProto.concat(parts), metas


def rollout_metrics(step: int, rollout: DataProto, rollout_meta: list[dict]) -> dict:
    """What the step's rollouts say about generation (same on every rank)."""
    lengths = rollout.batch["response_mask"].sum(-1).float()
    finish = rollout.non_tensor_batch["finish_reason"]
    version = min(m["weight_version"] for m in rollout_meta)
    return {
        "accuracy": float(rollout.batch["reward"].mean()),
        "response_len": float(lengths.mean()),
        "truncated_frac": float((finish == "length").mean()),
        "rollout_version": version,
        "staleness": step - version,
        "time_rollout_s": max(m["time_s"] for m in rollout_meta),
    }


def batch_metrics(
    step: int, rollout: DataProto, rollout_meta: list[dict], teacher: DataProto, teacher_meta: list[dict]
) -> dict:
    """What the step's batches say about generation and scoring (same on every rank)."""
    metrics = rollout_metrics(step, rollout, rollout_meta) | {
        "time_teacher_s": max(m["time_s"] for m in teacher_meta),
    }
    if "grounding" in teacher.batch.keys():  # measured only when the controller scores decisions
        metrics["grounding"] = float(teacher.batch["grounding"].mean())
    return metrics


def example_stats(rollout: DataProto, teacher: DataProto) -> dict[str, dict[str, float]]:
    """Per problem (record id), for a per-example exposure controller: the pass rate, the grounding
    g, and the sampled-token mismatch: the token mean of log p_S(y) - log p_T(y) over the student's
    own samples, an estimate of KL(p_S || p_T) that needs no extra forward pass (exact in
    expectation when the rollout and loss temperatures agree)."""
    mask = rollout.batch["response_mask"].float()
    gap = ((rollout.batch["rollout_logprobs"] - teacher.batch["teacher_sampled_logprob"]) * mask).sum(-1)
    uids = rollout.non_tensor_batch["uid"]
    out = {}
    for uid in dict.fromkeys(uids):
        rows = torch.from_numpy(uids == uid)
        out[str(uid)] = {
            "reward": float(rollout.batch["reward"][rows].mean()),
            "mismatch": float(gap[rows].sum() / mask[rows].sum().clamp(min=1.0)),
            "grounding": float(teacher.batch["grounding"][rows].mean()),
        }
    return out


class StudentRank:
    def __init__(self, cfg: Config, rank: int, world_size: int):
        self.threads = setup_actor(cfg, f"student{rank}")
        self.cfg = cfg
        self.rank = rank
        self.world = world_size
        self.tokenizer = load_tokenizer(cfg.model)
        self.probe: dict[str, torch.Tensor] | None = None

    # -- setup -----------------------------------------------------------------------------------
    def master_address(self) -> tuple[str, int]:
        """This node's address and a free port, for a process group rooted here."""
        return ray.util.get_node_ip_address(), free_port()

    def init_distributed(self, address: str, port: int) -> dict:
        backend = self.cfg.trainer.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )
        dist.init_process_group(
            backend, init_method=f"tcp://{address}:{port}", rank=self.rank, world_size=self.world
        )
        self.model = load_model(self.cfg.model, vocab_size=len(self.tokenizer)).to(self.device)
        self.trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.policy = StudentPolicy(self.model)
        for layer in self.model.get_decoder().layers:
            fully_shard(layer)
        fully_shard(self.policy, reshard_after_forward=False)
        t = self.cfg.trainer
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad],
            lr=t.lr,
            betas=tuple(t.betas),
            weight_decay=t.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.cfg))
        self.step = 0
        self.skipped_nonfinite = 0
        return {
            "rank": self.rank,
            "backend": backend,
            "node": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "threads": self.threads,
        }

    def set_probe(self, records: list[dict]) -> int:
        """The fixed probe set: student prompt + reference solution, for the probe NLL."""
        prompts = self._prompts([r["problem"] for r in records])
        refs = [self.tokenizer(r["reference"], add_special_tokens=False)["input_ids"] for r in records]
        p_ids, p_mask = left_pad(prompts, self.tokenizer.pad_token_id)
        r_ids, r_mask = right_pad(refs, self.tokenizer.pad_token_id)
        self.probe = {
            "prompt_ids": p_ids,
            "prompt_mask": p_mask,
            "response_ids": r_ids,
            "response_mask": r_mask,
        }
        return len(records)

    def _prompts(self, problems: list[str]) -> list[list[int]]:
        texts = [
            render_chat(
                self.tokenizer, student_messages(p, self.cfg.prompts), self.cfg.model.student_thinking
            )
            for p in problems
        ]
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    # -- collective helpers ----------------------------------------------------------------------
    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device, torch.float64)
        dist.all_reduce(t)
        return t.cpu()

    def _max(self, value: int) -> int:
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _micro_batches(self, n_rows: int) -> list[list[int]]:
        """This rank's row indices in micro-batches; every rank runs the same number of them
        (FSDP gathers parameters in each forward), so a short rank repeats rows with weight 0."""
        mine = list(_shard(n_rows, self.rank, self.world))
        mb = self.cfg.trainer.micro_batch
        count = self._max(math.ceil(len(mine) / mb))
        return [mine[i * mb : (i + 1) * mb] for i in range(count)]

    def _total_over_ranks(self, mask: torch.Tensor) -> float:
        """The sum of ``mask`` over the rows each rank trains on, all ranks together."""
        mine = list(_shard(mask.shape[0], self.rank, self.world))
        return float(self._sum(torch.tensor([float(mask[mine].sum())]))[0])

    def _to_device(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in rows.items()}

    def _accumulate(
        self, n_rows: int, width: int, forward: Callable[[list[int]], tuple], train: bool = True
    ) -> torch.Tensor:
        """The one micro-batch loop: ``forward(rows)`` -> (loss, [width] statistics) per micro-batch
        of this rank's rows; with ``train``, backward of each loss (gradients synced on the last
        micro-batch only). A rank short of rows repeats row 0 at weight 0, so every rank runs the
        same number of FSDP forwards. Returns the statistics summed over micro-batches and ranks."""
        batches = self._micro_batches(n_rows)
        total = torch.zeros(width, dtype=torch.float64)
        for i, idx in enumerate(batches):
            weight = 1.0 if idx else 0.0
            if train:
                self.policy.set_requires_gradient_sync(i == len(batches) - 1)
            loss, stats = forward(idx or [0])
            if train:
                (loss * weight).backward()
            total += stats.detach().cpu().to(torch.float64) * weight
        return self._sum(total)

    # -- training --------------------------------------------------------------------------------
    @once_per_step
    def train_step(self, step: int, rollout_refs: list, teacher_refs: list) -> dict:
        """One optimizer step of distillation on the step's rollouts and teacher targets."""
        t0 = time.perf_counter()
        rollout, rollout_meta = concat(ray.get(rollout_refs))
        teacher, teacher_meta = concat(ray.get(teacher_refs))
        t_fetch = time.perf_counter() - t0
        self.policy.train()
        global_tokens = self._total_over_ranks(rollout.batch["response_mask"])
        scale = self.world / max(global_tokens, 1.0)

        def forward(idx: list[int]) -> tuple:
            rows = self._to_device(_rows(rollout, ROLLOUT_KEYS, idx))
            targets = self._teacher_targets(teacher, idx, rows["response_mask"])
            loss, stats = self.policy(rows, "distill", self.cfg.algorithm.loss, targets)
            return loss * scale, stats

        stats = self._accumulate(len(rollout), len(DistillStats.FIELDS), forward)
        metrics = self._finish_step(step, DistillStats.from_tensor(stats), t0, t_fetch)
        if self.cfg.controller.granularity == "example":
            metrics["per_example"] = example_stats(rollout, teacher)
        return metrics | batch_metrics(step, rollout, rollout_meta, teacher, teacher_meta)

    @once_per_step
    def distill_nll_step(
        self, step: int, rollout_refs: list, teacher_refs: list, prefix_weight: float, suffix_weight: float
    ) -> dict:
        """One optimizer step of MOTAB / SKD on monitored trajectories: ``prefix_weight`` x the
        distillation loss at the rows' ``distill_mask`` positions (the student's accepted steps) plus
        ``suffix_weight`` x the teacher-forced NLL at their ``nll_mask`` positions (teacher-written
        tokens), both summed and divided by the number of those tokens over the whole batch."""
        t0 = time.perf_counter()
        rollout, rollout_meta = concat(ray.get(rollout_refs))
        teacher, teacher_meta = concat(ray.get(teacher_refs))
        t_fetch = time.perf_counter() - t0
        self.policy.train()
        global_tokens = self._total_over_ranks(rollout.batch["distill_mask"] + rollout.batch["nll_mask"])
        scale = self.world / max(global_tokens, 1.0)

        def forward(idx: list[int]) -> tuple:
            rows = self._to_device(_rows(rollout, ROLLOUT_KEYS + ("distill_mask", "nll_mask"), idx))
            targets = self._teacher_targets(teacher, idx, rows["distill_mask"])
            distill, nll, stats = self.policy(rows, "distill_nll", self.cfg.algorithm.loss, targets)
            return (prefix_weight * distill + suffix_weight * nll) * scale, stats

        stats = self._accumulate(len(rollout), len(DistillStats.FIELDS) + 2, forward)
        prefix = DistillStats.from_tensor(stats[:5])
        nll_sum, nll_tokens = float(stats[5]), float(stats[6])
        metrics = self._finish_step(step, prefix, t0, t_fetch)
        metrics.update(
            loss=(prefix_weight * float(prefix.loss) + suffix_weight * nll_sum) / max(global_tokens, 1.0),
            distill_loss=metrics["loss"],
            teacher_nll=nll_sum / max(nll_tokens, 1.0),
            distill_tokens=int(prefix.tokens),
            nll_tokens=int(nll_tokens),
            tokens=int(global_tokens),
        )
        return batch_metrics(step, rollout, rollout_meta, teacher, teacher_meta) | metrics

    def _teacher_targets(
        self, teacher: DataProto, idx: list[int], response_mask: torch.Tensor
    ) -> TeacherTargets:
        valid = response_mask.bool().cpu()
        values = teacher.batch["teacher_logprobs"][idx][valid]
        ids = (
            teacher.batch["teacher_ids"][idx][valid].long() if "teacher_ids" in teacher.batch.keys() else None
        )
        sampled = teacher.batch["teacher_sampled_logprob"][idx][valid]
        return TeacherTargets(values, ids, sampled).to(self.device)

    def _finish_step(self, step: int, stats: DistillStats, t0: float, t_fetch: float) -> dict:
        update = self._apply_update(step, float(stats.loss))
        means = stats.means()
        return {
            "loss": means["loss"],
            "mismatch_kl": means["mismatch_kl"],
            "top1_disagree": means["top1_disagree"],
            "confidence": means["confidence"],
            "tokens": int(stats.tokens),
            **update,
            "time_fetch_s": t_fetch,
            "time_update_s": time.perf_counter() - t0 - t_fetch,
        }

    def _apply_update(self, step: int, loss: float) -> dict:
        """Clip, step (unless the loss or gradient is non-finite on any rank), schedule the LR."""
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.policy.parameters() if p.requires_grad], self.cfg.trainer.grad_clip
        )
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        finite = math.isfinite(grad_norm) and math.isfinite(loss)
        finite = bool(self._sum(torch.tensor([0.0 if finite else 1.0]))[0] == 0)
        if finite:
            self.optimizer.step()
        else:
            self.skipped_nonfinite += 1
            log.warning("step %d: non-finite loss or gradient; update skipped", step)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step = step + 1
        return {
            "grad_norm": grad_norm,
            "lr": lr,
            "update_skipped": 0 if finite else 1,
            "skipped_nonfinite_total": self.skipped_nonfinite,
        }

    @once_per_step
    def sft_step(self, step: int, records: list[dict]) -> dict:
        """One optimizer step of SFT: the NLL of each reference solution, ended by EOS, after the
        problem-only student prompt (references over ``algorithm.sft.max_response_tokens`` are cut)."""
        t0 = time.perf_counter()
        limit = self.cfg.algorithm.sft.max_response_tokens
        eos = self.tokenizer.eos_token_id
        refs = [
            self.tokenizer(r["reference"], add_special_tokens=False)["input_ids"] + [eos] for r in records
        ]
        truncated = sum(len(r) > limit for r in refs)
        p_ids, p_mask = left_pad(self._sft_prompts(step, records), self.tokenizer.pad_token_id)
        r_ids, r_mask = right_pad([r[:limit] for r in refs], self.tokenizer.pad_token_id)
        data = {"prompt_ids": p_ids, "prompt_mask": p_mask, "response_ids": r_ids, "response_mask": r_mask}
        self.policy.train()
        global_tokens = float(r_mask.sum())
        scale = self.world / max(global_tokens, 1.0)

        def forward(idx: list[int]) -> tuple:
            loss, _ = self.policy(self._to_device({k: v[idx] for k, v in data.items()}), "nll")
            return loss * scale, loss.detach()[None]

        loss_sum = float(self._accumulate(len(records), 1, forward)[0])
        return {
            "loss": loss_sum / max(global_tokens, 1.0),
            "tokens": int(global_tokens),
            "response_len": global_tokens / len(records),
            "truncated_frac": truncated / len(records),
            **self._apply_update(step, loss_sum),
            "time_update_s": time.perf_counter() - t0,
        }

    def _sft_prompts(self, step: int, records: list[dict]) -> list[list[int]]:
        """The student prompt, or for ``algorithm.sft.teacher_prompt_frac`` of the examples the
        teacher's privileged prompt at a uniform random exposure (seeded by run seed and step)."""
        rng = random.Random(f"sft-prompts/{self.cfg.seed}/{step}")
        frac, m = self.cfg.algorithm.sft.teacher_prompt_frac, self.cfg.model
        prompts = []
        for r in records:
            if frac and rng.random() < frac:
                messages = teacher_messages(
                    r["problem"], r["reference"], r["answer"], rng.random(), self.cfg.prompts
                )
                text = render_chat(self.tokenizer, messages, m.teacher_thinking)
                prompts.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            else:
                prompts += self._prompts([r["problem"]])
        return prompts

    @once_per_step
    def grpo_step(self, step: int, rollout_refs: list, reference_refs: list | None) -> dict:
        """One optimizer step of GRPO on graded rollouts (n per prompt): group-normalized rewards,
        clipped policy gradient against the rollout log-probs, optional k3 KL to the reference
        log-probs (``reference_refs``, from the frozen teacher actor)."""
        t0 = time.perf_counter()
        rollout, rollout_meta = concat(ray.get(rollout_refs))
        reference = concat(ray.get(reference_refs))[0] if reference_refs else None
        t_fetch = time.perf_counter() - t0
        g = self.cfg.algorithm.grpo
        uids = [str(u) for u in rollout.non_tensor_batch["uid"]]
        advantages = advantages_by_group(uids, rollout.batch["reward"], g.scale_rewards)
        mask = rollout.batch["response_mask"].float()
        lengths = mask.sum(-1)
        if g.loss_agg == "token_mean":
            weights = mask * self.world / lengths.sum().clamp(min=1.0)
        else:
            weights = mask / lengths.clamp(min=1.0)[:, None] * self.world / len(rollout)
        self.policy.train()

        def forward(idx: list[int]) -> tuple:
            rows = _rows(rollout, ROLLOUT_KEYS + ("rollout_logprobs",), idx)
            rows.update(advantages=advantages[idx], token_weights=weights[idx])
            if reference is not None:
                rows["ref_logprobs"] = reference.batch["ref_logprobs"][idx]
            loss, stats = self.policy(
                self._to_device(rows), "pg", g, temperature=self.cfg.rollout.temperature
            )
            return loss, torch.cat([stats, loss.detach().double()[None] / self.world])

        *stats, objective = self._accumulate(len(rollout), 5, forward).tolist()
        tokens = max(float(stats[3]), 1.0)
        rewards = rollout.batch["reward"].float()
        groups: dict[str, list[int]] = {}
        for i, uid in enumerate(uids):
            groups.setdefault(uid, []).append(i)
        return {
            "loss": objective,
            "pg_loss": float(stats[0]) / tokens,
            "kl_ref": float(stats[1]) / tokens,
            "clip_frac": float(stats[2]) / tokens,
            "tokens": int(stats[3]),
            "reward_std": float(torch.stack([rewards[idx].std() for idx in groups.values()]).mean()),
            "zero_adv_frac": sum(bool((rewards[idx] == rewards[idx[0]]).all()) for idx in groups.values())
            / len(groups),
            **self._apply_update(step, objective),
            "time_fetch_s": t_fetch,
            "time_update_s": time.perf_counter() - t0 - t_fetch,
        } | rollout_metrics(step, rollout, rollout_meta)

    @torch.no_grad()
    def mismatch(self, rollout_refs: list, teacher_refs: list) -> list[dict]:
        """Per-token KL(p_T||p_S), top-1 disagreement and student confidence of every rollout row
        under the current student, no update: the fixed-exposure sweep's measurement. The numbers
        come from the same code as the training step's statistics (``losses._mismatch_terms``)."""
        rollout, _ = concat(ray.get(rollout_refs))
        teacher, _ = concat(ray.get(teacher_refs))
        self.policy.eval()
        mine = []
        for idx in self._micro_batches(len(rollout)):
            rows = self._to_device(_rows(rollout, ROLLOUT_KEYS, idx or [0]))
            targets = self._teacher_targets(teacher, idx or [0], rows["response_mask"])
            per_token = self.policy(rows, "mismatch", self.cfg.algorithm.loss, targets).cpu()
            lengths = rows["response_mask"].sum(-1).tolist()
            for row, part in zip(idx, per_token.split(lengths), strict=False):
                mine.append(
                    {
                        "row": row,
                        "kl": part[:, 0].tolist(),
                        "disagree": part[:, 1].tolist(),
                        "confidence": part[:, 2].tolist(),
                    }
                )
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, mine)
        nt = rollout.non_tensor_batch
        out = sorted((r for part in gathered for r in part), key=lambda r: r["row"])
        for r in out:
            i = r.pop("row")
            r.update(
                uid=str(nt["uid"][i]),
                difficulty=nt["difficulty"][i],
                grounding=float(teacher.batch["grounding"][i]),
            )
        return out

    @torch.no_grad()
    def probe_nll(self) -> float:
        """Mean per-token NLL of the reference solutions of the probe set (exposure-independent)."""
        if self.probe is None:
            return float("nan")
        self.policy.eval()

        def forward(idx: list[int]) -> tuple:
            loss, count = self.policy(self._to_device({k: v[idx] for k, v in self.probe.items()}), "nll")
            return loss, torch.stack([loss.double(), count.double()])

        total = self._accumulate(self.probe["prompt_ids"].shape[0], 2, forward, train=False)
        return float(total[0] / total[1].clamp(min=1))

    @torch.no_grad()
    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        """Per-token log-probs (temperature 1) of fixed responses under the current student (every
        rank returns all)."""
        p_ids, p_mask = left_pad(prompts, self.tokenizer.pad_token_id)
        r_ids, r_mask = right_pad(responses, self.tokenizer.pad_token_id)
        rows = self._to_device(
            {"prompt_ids": p_ids, "prompt_mask": p_mask, "response_ids": r_ids, "response_mask": r_mask}
        )
        flat = self.policy(rows, "logprobs").cpu()
        out, offset = [], 0
        for r in responses:
            out.append(flat[offset : offset + len(r)].tolist())
            offset += len(r)
        return out

    # -- weights out -----------------------------------------------------------------------------
    def _stream(self, fmt: str, device: torch.device, meta: bool = False):
        """The weights a sync in format ``fmt`` carries, gathered one parameter at a time."""
        lora = self.cfg.model.lora
        return stream_weights(
            self.model, fmt, DTYPES[self.cfg.model.dtype], device, lora.alpha / lora.r, meta
        )

    def weight_layout(self, fmt: str) -> list[TensorSpec]:
        """Names, shapes and dtypes of a sync in format ``fmt`` (from metadata; no gathering)."""
        return layout(dict(self._stream(fmt, torch.device("meta"), meta=True)))

    def holds_version(self, version: int) -> bool:
        """Whether a sync tagged ``version`` may go out: it must carry the weights after ``version``
        updates. A sync launched behind an update that failed moves nothing (the step fails on the
        update's own error), so no receiver ever holds old weights under a new version."""
        if version != self.step:
            log.warning(
                "sync of version %d refused: the weights are those after %d updates", version, self.step
            )
        return version == self.step

    def export_weights(self, version: int, fmt: str = "trainable") -> PackedWeights | None:
        """Rank 0's packed weights (None on other ranks, and on all when ``holds_version`` refuses)."""
        if not self.holds_version(version):
            return None
        named = dict(self._stream(fmt, torch.device("cpu")))
        return pack(named, version) if self.rank == 0 else None

    def broadcast_weights(self, version: int, fmt: str, buckets: list[list[TensorSpec]]) -> int:
        """Bucketed broadcast from rank 0 to the weight group; every rank gathers."""
        if not self.holds_version(version):
            return 0
        group = self._weight_group if self.rank == 0 else None
        device = group.device if group is not None else self.device
        return send_buckets(self._stream(fmt, device), buckets, group)

    def ipc_begin(self, fmt: str, buckets: list[list[TensorSpec]]) -> bool:
        """Start a CUDA IPC sync: one reusable GPU buffer as large as the largest bucket."""
        self._ipc_stream = self._stream(fmt, self.device)
        self._ipc_buffer = torch.empty(max(map(bucket_bytes, buckets)), dtype=torch.uint8, device=self.device)
        return True

    def ipc_share_bucket(self, bucket: list[TensorSpec]) -> tuple:
        """Fill the buffer with the next bucket; a handle for the rollout on this rank's GPU."""
        flatten(take_bucket(self._ipc_stream, bucket), self._ipc_buffer)
        return share(self._ipc_buffer)

    def ipc_end(self) -> bool:
        self._ipc_stream = self._ipc_buffer = None
        torch.cuda.empty_cache()
        return True

    def join_weight_group(self, address: str, port: int, world_size: int, rank: int, backend: str) -> bool:
        self._weight_group = BroadcastGroup(address, port, rank, world_size, backend)
        return True

    def leave_weight_group(self) -> bool:
        self._weight_group = None
        return True

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, directory: str) -> bool:
        """Write this group's state into ``directory`` (rank 0 writes; all ranks gather)."""
        from safetensors.torch import save_file

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=options)
        optim_sd = get_optimizer_state_dict(self.policy, self.optimizer, options=options)
        rng = [None] * self.world
        dist.all_gather_object(rng, torch.get_rng_state())
        merged = dict(self._stream("merged", torch.device("cpu"))) if self.cfg.trainer.save_hf else None
        if self.rank == 0:
            out = Path(directory)
            out.mkdir(parents=True, exist_ok=True)
            weights = {n: model_sd[n].contiguous() for n in self.trainable}
            save_file(weights, str(out / "student.safetensors"), metadata={"model": self.cfg.model.name})
            torch.save({"optimizer": optim_sd, "rng": rng}, out / "optimizer.pt")
            state = {
                "step": self.step,
                "scheduler": self.scheduler.state_dict(),
                "skipped_nonfinite": self.skipped_nonfinite,
                "world_size": self.world,
                "fingerprint": self._fingerprint(),
            }
            (out / "student_state.json").write_text(json.dumps(state))
            if merged is not None:  # beside student/: checkpoints/step_<N>/huggingface
                base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
                save_hf_model(out.parent / HF_DIR, merged, base, self.tokenizer)
        dist.barrier()
        return True

    def load(self, directory: str) -> int:
        """Restore from a checkpoint written by :meth:`save`; code in it is never executed."""
        from safetensors.torch import load_file

        d = Path(directory)
        state = json.loads((d / "student_state.json").read_text())
        self._check_fingerprint(state["fingerprint"], d)
        weights = load_file(str(d / "student.safetensors"))
        blob = load_tensors(d / "optimizer.pt")
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, strict=False)
        set_model_state_dict(self.model, weights, options=options)
        set_optimizer_state_dict(self.policy, self.optimizer, blob["optimizer"], options=options)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.skipped_nonfinite = state["skipped_nonfinite"]
        rng = blob["rng"]
        torch.set_rng_state(rng[self.rank] if self.rank < len(rng) else rng[0])
        return self.step

    def _fingerprint(self) -> dict:
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        return fingerprint(self.cfg.model.name, self.cfg.model.lora.enabled, trainable)

    def _check_fingerprint(self, saved: dict, where: Path) -> None:
        check_fingerprint(saved, self._fingerprint(), where)

    def pid(self) -> int:
        return os.getpid()

    def updates(self) -> int:
        """Optimizer steps applied so far: the version of the weights this rank holds."""
        return self.step
