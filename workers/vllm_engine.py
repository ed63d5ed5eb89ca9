"""vLLM behind the engine interface of ``workers/engines.py`` (GPU only; never exercised on CPU).

``VLLMEngine`` generates rollouts and scores fixed responses; ``VLLMTeacherScorer`` gives the
teacher's top-k targets from prompt logprobs, as verl's on-policy distillation does. vLLM is
imported when an engine is built, so CPU installs never need it.

- The engine runs in the actor's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, tensor
  parallel size 1), so weights a sync delivers to the actor (a broadcast bucket, a CUDA IPC
  buffer, an object-store buffer) reach the model through ``collective_rpc`` without another copy.
- Weights arrive in the ``merged`` format (``atesd_ray/runtime/weight_formats.py``): full weights
  under Hugging Face names with LoRA merged in, which vLLM's ``load_weights`` maps onto its fused
  layers.
- Sampled-token log-probs are vLLM's ``processed_logprobs``: of the distribution actually sampled
  from (temperature, then top-k/top-p), as verl uses them. The HF engine's are of
  softmax(logits / temperature) without the top-k/top-p cut.
- Prompt logprobs come at temperature 1, top-k per position. The teacher's targets at the loss
  temperature T are those top-k values renormalized after dividing by T; for T = 1 they are vLLM's
  values exactly (normalized over the whole vocabulary). Pair ``teacher.engine=vllm`` with
  ``algorithm.loss.topk_tail=renormalize`` when T != 1: the tail mass at T is not known.
"""

from __future__ import annotations

import os

import torch

from atesd_ray.config import Config
from atesd_ray.models import pretrained_path
from workers.engines import Completion, SamplingParams


class WeightLoaderExtension:
    """Mixed into vLLM's GPU worker (``worker_extension_cls``); ``self`` is the worker."""

    def load_named_weights(self, named: list[tuple[str, torch.Tensor]]) -> int:
        self.model_runner.model.load_weights(weights=named)
        return len(named)

    def named_model_parameters(self) -> dict[str, torch.Tensor]:
        return dict(self.model_runner.model.named_parameters())


def _build_llm(cfg: Config, gpu_memory_utilization: float, max_logprobs: int):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this actor's process
    from vllm import LLM

    return LLM(
        model=pretrained_path(cfg.model),
        dtype=cfg.model.dtype,
        seed=cfg.seed,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=1,
        enable_prefix_caching=True,
        max_logprobs=max_logprobs,
        logprobs_mode="processed_logprobs",
        worker_extension_cls=f"{__name__}.WeightLoaderExtension",
    )


def _token_prompts(prompts: list[list[int]]) -> list:
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]


class VLLMEngine:
    weight_format = "merged"

    def __init__(self, cfg: Config, tokenizer, max_logprobs: int = 20):
        self.tokenizer = tokenizer
        self.llm = _build_llm(cfg, cfg.rollout.gpu_memory_utilization, max_logprobs)

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[Completion]:
        """``params.n`` samples per prompt, prompt-major, with token ids, finish reasons and log-probs."""
        from vllm import SamplingParams as VLLMSamplingParams

        requests = [
            VLLMSamplingParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,  # 0: off
                max_tokens=params.max_new_tokens,
                stop=list(params.stop) or None,
                include_stop_str_in_output=True,  # the response keeps its stop string, as in the HF engine
                logprobs=0 if params.logprobs else None,  # 0: only the sampled token's
                seed=seed + i,
                detokenize=bool(params.stop),
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(_token_prompts(prompts), requests, use_tqdm=False)
        completions = []
        for out in outputs:
            for sample in out.outputs:
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

    def prompt_logprobs(self, sequences: list[list[int]], topk: int) -> list[list[dict]]:
        """Per sequence, per position after the first: {token id: (logprob, rank)} for the top-k and
        the token that is there (temperature 1)."""
        from vllm import SamplingParams as VLLMSamplingParams

        request = VLLMSamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=topk, detokenize=False)
        outputs = self.llm.generate(_token_prompts(sequences), request, use_tqdm=False)
        return [
            [{t: (lp.logprob, lp.rank) for t, lp in step.items()} for step in out.prompt_logprobs[1:]]
            for out in outputs
        ]

    def score(
        self, prompts: list[list[int]], responses: list[list[int]], temperature: float
    ) -> list[list[float]]:
        """Log-probs of fixed response tokens after each prompt (temperature 1 only: vLLM's prompt
        logprobs are of the untempered distribution)."""
        if temperature != 1.0:
            raise ValueError("the vLLM engine scores at temperature 1")
        rows = self.prompt_logprobs([p + r for p, r in zip(prompts, responses, strict=True)], topk=0)
        return [
            [row[len(p) - 1 + t][tok][0] for t, tok in enumerate(r)]
            for row, p, r in zip(rows, prompts, responses, strict=True)
        ]

    def load_weights(self, named: dict[str, torch.Tensor]) -> None:
        self.llm.collective_rpc("load_named_weights", args=(list(named.items()),))

    def synced_parameters(self) -> dict[str, torch.Tensor]:
        """vLLM's own (fused) parameters; syncs arrive by Hugging Face name in the merged format."""
        return self.llm.collective_rpc("named_model_parameters")[0]


class VLLMTeacherScorer:
    """The teacher's targets from a vLLM engine: top-k per response position, at the loss temperature."""

    def __init__(self, cfg: Config, tokenizer):
        self.topk = cfg.teacher.topk
        self.temperature = cfg.algorithm.loss.temperature
        self.engine = VLLMEngine(cfg, tokenizer, max_logprobs=max(20, self.topk))

    def targets(
        self, prompts: list[list[int]], responses: list[list[int]], width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """values [B, width, k] and ids [B, width, k] of the teacher's top-k, and the log-prob of the
        response token itself [B, width]; positions past a response's end stay zero."""
        k, rows = self.topk, len(prompts)
        values = torch.zeros(rows, width, k)
        ids = torch.zeros(rows, width, k, dtype=torch.int32)
        sampled = torch.zeros(rows, width)
        logprobs = self.engine.prompt_logprobs([p + r for p, r in zip(prompts, responses, strict=True)], k)
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
        rows = self.engine.score(prompts, answers, 1.0)
        return torch.tensor([sum(r) / max(1, len(r)) for r in rows])

    def load_weights(self, named: dict[str, torch.Tensor]) -> None:
        self.engine.load_weights(named)


def temper(
    top: torch.Tensor, chosen: float, chosen_in_top: bool, temperature: float
) -> tuple[torch.Tensor, float]:
    """Temperature-1 log-probs of the top-k and of one chosen token -> at ``temperature``, normalized
    over those tokens; unchanged (normalized over the whole vocabulary) at temperature 1."""
    if temperature == 1.0:
        return top, chosen
    support = top if chosen_in_top else torch.cat([top, torch.tensor([chosen])])
    norm = torch.logsumexp(support / temperature, dim=0)
    return top / temperature - norm, float(chosen / temperature - norm)
