"""Student trainer rank: one process of an FSDP2 group (gloo on CPU, NCCL on GPU).

Every rank holds a shard of the student (a single rank holds the plain model: FSDP would only add
copies). A training step runs the algorithm's objective
(``atesd_ray/objective.py``, given at construction) in one loop shared by every algorithm: this
rank's contiguous share of the rows in micro-batches, gradients accumulated to the configured
effective batch, clipped, one AdamW step. The rank also measures (probe NLL, per-token mismatch,
log-probs of fixed responses), sends its weights (``WeightSender``) and writes checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable

import ray
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from atesd_ray.config import Config
from atesd_ray.models import CPU, DTYPES, load_model, load_tokenizer
from atesd_ray.objective import Objective, Response
from atesd_ray.prompts import encode_chat, student_messages
from atesd_ray.rollout_gap import CHECK_PROBLEM, CHECK_RESPONSE, SamplerCut, gap_terms
from atesd_ray.runtime.cluster import free_port
from atesd_ray.runtime.devices import backend
from atesd_ray.runtime.once import once_per_step
from atesd_ray.runtime.weight_formats import stream_weights
from atesd_ray.runtime.weight_sync import WeightCheck, WeightSender
from atesd_ray.sequences import join, left_pad, response_slice, right_pad
from workers.common import setup_actor
from workers.student_measures import Measurements
from workers.student_state import CheckpointedRank

log = logging.getLogger(__name__)

Rows = dict[str, torch.Tensor]


class StudentPolicy(nn.Module):
    """The FSDP root: the decoder, then ``fn`` on the response positions (:class:`Response`).

    The loss runs inside the root's forward so the LM head (often tied to the embedding) stays
    unsharded while it is applied chunk by chunk, and is unsharded again for the backward pass.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, rows: Rows, fn: Callable[[Response, Rows], object]):
        ids, mask, pos, start = join(
            rows["prompt_ids"], rows["prompt_mask"], rows["response_ids"], rows["response_mask"]
        )
        hidden = self.model.get_decoder()(
            input_ids=ids, attention_mask=mask, position_ids=pos
        ).last_hidden_state
        valid = rows["response_mask"].bool()
        h = response_slice(hidden, start, valid.shape[1])[valid]
        return fn(Response(h, rows["response_ids"][valid], valid, self.model.get_output_embeddings()), rows)


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


class StudentRank(CheckpointedRank, Measurements, WeightSender):
    def __init__(self, cfg: Config, rank: int, world_size: int, objective: Objective):
        self.threads, self.device = setup_actor(cfg, cfg.cluster.student, f"student rank {rank}")
        self.cfg = cfg
        self.rank = rank
        self.world = world_size
        self.objective = objective
        self.tokenizer = load_tokenizer(cfg.model)
        self.probe: Rows | None = None

    # -- setup -----------------------------------------------------------------------------------
    def master_address(self) -> tuple[str, int]:
        """This node's address and a free port, for a process group rooted here."""
        return ray.util.get_node_ip_address(), free_port()

    def init_distributed(self, address: str, port: int) -> dict:
        """Join the group and build the model. With several ranks the model is loaded on the CPU and
        sharded layer by layer, each layer moving to this rank's device as it is sharded, so a rank
        never holds a whole copy on its GPU (beside a colocated vLLM engine, say)."""
        name = backend(self.cfg)
        dist.init_process_group(
            name, init_method=f"tcp://{address}:{port}", rank=self.rank, world_size=self.world
        )
        single = self.world == 1  # one rank holds the whole model: sharding it would only copy it
        self.model = load_model(
            self.cfg.model, vocab_size=len(self.tokenizer), device=self.device if single else CPU
        )
        self.trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.policy = StudentPolicy(self.model)
        if not single:
            mesh = init_device_mesh(self.device.type, (self.world,))
            for layer in self.model.get_decoder().layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.policy, mesh=mesh, reshard_after_forward=False)
        t = self.cfg.trainer
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad],
            lr=t.lr,
            betas=tuple(t.betas),
            weight_decay=t.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.cfg))
        self.version = 0
        self.skipped_nonfinite = 0
        return {
            "rank": self.rank,
            "backend": name,
            "device": str(self.device),
            "node": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "threads": self.threads,
        }

    def student_prompts(self, problems: list[str]) -> list[list[int]]:
        thinking = self.cfg.model.student_thinking
        return [
            encode_chat(self.tokenizer, student_messages(p, self.cfg.prompts), thinking) for p in problems
        ]

    def _padded(self, prompts: list[list[int]], responses: list[list[int]]) -> Rows:
        p_ids, p_mask = left_pad(prompts, self.tokenizer.pad_token_id)
        r_ids, r_mask = right_pad(responses, self.tokenizer.pad_token_id)
        return {"prompt_ids": p_ids, "prompt_mask": p_mask, "response_ids": r_ids, "response_mask": r_mask}

    # -- collective helpers ----------------------------------------------------------------------
    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device, torch.float64)
        dist.all_reduce(t)
        return t.cpu()

    def _max(self, value: int) -> int:
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _max_float(self, value: float) -> float:
        t = torch.tensor([value], device=self.device, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def _micro_batches(self, n_rows: int) -> list[list[int]]:
        """This rank's row indices in micro-batches; every rank runs the same number of them
        (FSDP gathers parameters in each forward), so a short rank repeats rows with weight 0."""
        mine = list(_shard(n_rows, self.rank, self.world))
        mb = self.cfg.trainer.micro_batch
        count = self._max(math.ceil(len(mine) / mb))
        return [mine[i * mb : (i + 1) * mb] for i in range(count)]

    def total_over_ranks(self, mask: torch.Tensor) -> float:
        """The sum of ``mask`` over the rows each rank trains on, all ranks together."""
        mine = list(_shard(mask.shape[0], self.rank, self.world))
        return float(self._sum(torch.tensor([float(mask[mine].sum())]))[0])

    def _slice(self, rows: Rows, idx: list[int]) -> Rows:
        """Rows ``idx`` on this rank's device (row 0 stands in for an empty micro-batch)."""
        return {k: v[idx or [0]].to(self.device) for k, v in rows.items()}

    def _accumulate(
        self, rows: Rows, width: int, fn: Callable[[Response, Rows], tuple], train: bool = True
    ) -> torch.Tensor:
        """The one micro-batch loop: ``fn(response, rows)`` -> (loss, [width] statistics) per
        micro-batch of this rank's ``rows``; with ``train``, backward of each loss (gradients synced
        on the last micro-batch only). A rank short of rows repeats row 0 at weight 0, so every rank
        runs the same number of FSDP forwards. Returns the statistics summed over micro-batches and ranks."""
        batches = self._micro_batches(next(iter(rows.values())).shape[0])
        total = torch.zeros(width, dtype=torch.float64)
        for i, idx in enumerate(batches):
            weight = 1.0 if idx else 0.0
            if train and self.world > 1:
                self.policy.set_requires_gradient_sync(i == len(batches) - 1)
            loss, stats = self.policy(self._slice(rows, idx), fn)
            if train:
                (loss * weight).backward()
            total += stats.detach().cpu().to(torch.float64) * weight
        return self._sum(total)

    # -- training --------------------------------------------------------------------------------
    @once_per_step
    def train_step(self, step: int, *inputs) -> dict:
        """One optimizer step of the objective on ``inputs`` (object refs, resolved here). Where the
        rows carry the rollout engine's log-probs, the step also measures the train-inference gap
        (``atesd_ray/rollout_gap.py``) on the logits it computes anyway."""
        t0 = time.perf_counter()
        prepared = self.objective.prepare(self, step, *inputs)
        t_fetch = time.perf_counter() - t0
        self.policy.train()
        measure_gap = "rollout_logprobs" in prepared.rows
        cut = SamplerCut.of(self.cfg.rollout)
        gap_max = torch.zeros((), dtype=torch.float64)

        def loss(out: Response, rows: Rows) -> tuple:
            nonlocal gap_max
            value, stats = self.objective.loss(out, rows, prepared)
            if not measure_gap:
                return value, stats
            gap_sum, largest = gap_terms(
                out.hidden,
                out.tokens,
                rows["rollout_logprobs"][out.valid],
                out.head,
                cut,
                self.cfg.algorithm.loss.chunk_size,
            )
            gap_max = torch.maximum(gap_max, largest.cpu())
            count = gap_sum.new_tensor(float(out.tokens.numel()))
            return value, torch.cat([stats.to(gap_sum), torch.stack([gap_sum, count])])

        width = len(self.objective.stats) + (2 if measure_gap else 0)
        totals = self._accumulate(prepared.rows, width, loss).tolist()
        metrics = self.objective.metrics(dict(zip(self.objective.stats, totals, strict=False)), prepared)
        if measure_gap:
            metrics["rollout_logprob_gap_mean"] = totals[-2] / max(totals[-1], 1.0)
            metrics["rollout_logprob_gap_max"] = self._max_float(float(gap_max))
        return (
            metrics
            | self._apply_update(step, metrics["loss"])
            | {
                "time_fetch_s": t_fetch,
                "time_update_s": time.perf_counter() - t0 - t_fetch,
            }
        )

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
        self.version = step + 1
        return {
            "grad_norm": grad_norm,
            "lr": lr,
            "update_skipped": 0 if finite else 1,
            "skipped_nonfinite_total": self.skipped_nonfinite,
        }

    # -- weights out -----------------------------------------------------------------------------
    def weight_check(self) -> WeightCheck:
        prompt = self.student_prompts([CHECK_PROBLEM])[0]
        response = self.tokenizer(CHECK_RESPONSE, add_special_tokens=False)["input_ids"]
        return WeightCheck(self.version, prompt, response, self.score([prompt], [response])[0])

    def weight_stream(self, fmt: str, device: torch.device, meta: bool = False):
        """The weights a sync in format ``fmt`` carries, gathered one parameter at a time."""
        lora = self.cfg.model.lora
        return stream_weights(
            self.model, fmt, DTYPES[self.cfg.model.dtype], device, lora.alpha / lora.r, meta
        )

    def pid(self) -> int:
        return os.getpid()

    def updates(self) -> int:
        """Optimizer steps applied so far: the version of the weights this rank holds."""
        return self.version
