"""Generation engines behind one interface: HF transformers and vLLM (``vllm_engine.py``), each on CPU or GPU."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from atesd_ray.models import eos_token_ids
from atesd_ray.runtime.weight_delta import Parts
from atesd_ray.runtime.weights import load_into, patch_into
from atesd_ray.sampling import Completion, SamplingParams
from atesd_ray.sequences import left_pad, response_logprobs, slices, token_logprobs
from workers.few_row_linear import use_few_row_linear


class GenerationEngine(Protocol):
    # what a weight sync must carry: "trainable" or "merged" (atesd_ray/runtime/weight_formats.py)
    weight_format: str

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[Completion]: ...

    def score(
        self, prompts: list[list[int]], responses: list[list[int]], temperature: float
    ) -> list[list[float]]:
        """Log-probs of fixed response tokens after each prompt."""
        ...

    def begin_load(self) -> None:
        """Before the first chunk of a sync (``WeightReceiver.open_weights``)."""
        ...

    def load_weights(self, named: dict[str, torch.Tensor], shared: bool = False) -> None:
        """Tensors of ``weight_format`` by name: a whole sync, or one bucket of it. ``shared``: they
        view read-only memory the engine may keep as its weights (an object-store read)."""
        ...

    def load_delta(self, parts: Parts) -> None:
        """A delta sync's tensors of ``weight_format`` by name: (flat positions, new values)."""
        ...

    def finish_load(self) -> None:
        """After the last chunk of a sync."""
        ...


class SampledLogprobs(LogitsProcessor):
    """Each sampled token's log-prob under softmax(logits / temperature) over the full vocabulary,
    recorded during ``generate``.

    transformers applies user logits processors before its sampling warpers (temperature, top-k,
    top-p), so this one sees the raw logits of step t. It keeps that step's log-softmax ([B, V])
    until step t + 1, whose ``input_ids`` end with the token sampled at t; ``finish`` reads the last.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None
        self.taken: list[torch.Tensor] = []

    def _take(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.taken.append(self.previous.gather(-1, tokens[:, None]).squeeze(-1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[B, generated] log-probs of the generated columns of ``sequences``."""
        self._take(sequences[:, -1])
        self.previous = None
        return torch.stack(self.taken, dim=1) if self.taken else torch.zeros(sequences.shape[0], 0)


class HFEngine:
    """Batched sampling with transformers' ``generate`` (KV cache, top-k/top-p, stop strings).

    Sampled-token log-probs are read off while decoding (:class:`SampledLogprobs`), one step's
    [B, V] at a time: no B x R x V logits are kept, and no second forward pass over the finished
    sequences is needed (``score`` is that pass, for responses not sampled here). The model's
    linear layers decode with :class:`~workers.few_row_linear.FewRowLinear` (CPU float32).
    """

    weight_format = "trainable"

    def __init__(self, model: nn.Module, tokenizer, micro_batch: int = 16, score_micro_batch: int = 4):
        self.model = use_few_row_linear(model).eval()
        self.device = model.get_input_embeddings().weight.device
        self.tokenizer = tokenizer
        self.micro_batch = micro_batch
        self.score_micro_batch = score_micro_batch
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[Completion]:
        from transformers import GenerationConfig

        expanded = [p for p in prompts for _ in range(params.n)]
        greedy = params.temperature <= 0
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy else params.top_k,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            stop_strings=list(params.stop) or None,
        )
        completions: list[Completion] = []
        for start in range(0, len(expanded), self.micro_batch):
            ids, mask = (
                t.to(self.device) for t in left_pad(expanded[start : start + self.micro_batch], self.pad_id)
            )
            recorder = SampledLogprobs(params.temperature if not greedy else 1.0)
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seed * 1_000_003 + start)
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=config,
                    tokenizer=self.tokenizer if params.stop else None,
                    logits_processor=LogitsProcessorList([recorder]) if params.logprobs else None,
                )
            logprobs = recorder.finish(out) if params.logprobs else None
            for i, row in enumerate(out[:, ids.shape[1] :].tolist()):
                c = self._finish(row, params)
                if logprobs is not None:
                    c.logprobs = logprobs[i, : len(c.token_ids)].tolist()
                completions.append(c)
        return completions

    def _finish(self, row: list[int], params: SamplingParams) -> Completion:
        """Cut a generated row at its end and say why it ended.

        Finished rows are padded with ``pad_id``, which is often the EOS id too; a row that ends
        with a stop string therefore counts as stopped there, and the EOS-looking pad after it is
        not part of the response.
        """
        end = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
        text_end = len(row) if end is None else end
        if params.stop and self._has_stop(row[:text_end], params.stop):
            # the shortest prefix holding a stop string (decoded text grows with the prefix)
            lo, hi = 1, text_end
            while lo < hi:
                mid = (lo + hi) // 2
                if self._has_stop(row[:mid], params.stop):
                    hi = mid
                else:
                    lo = mid + 1
            return Completion(row[:lo], "stop")
        if end is not None:
            return Completion(row[: end + 1], "stop")
        return Completion(row, "length")

    def _has_stop(self, ids: list[int], stop: list[str]) -> bool:
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        return any(s in text for s in stop)

    @torch.no_grad()
    def score(
        self, prompts: list[list[int]], responses: list[list[int]], temperature: float
    ) -> list[list[float]]:
        result: list[list[float]] = []
        for part in slices(len(prompts), self.score_micro_batch):
            rows = responses[part]
            logp, r_ids, _ = response_logprobs(self.model, prompts[part], rows, self.pad_id, temperature)
            token_lp = token_logprobs(logp, r_ids)
            result.extend(token_lp[i, : len(r)].tolist() for i, r in enumerate(rows))
        return result

    def begin_load(self) -> None:
        """Weights load tensor by tensor (``load_into``): nothing to open."""

    def load_weights(self, named: dict[str, torch.Tensor], shared: bool = False) -> None:
        load_into(self.model, named, share=shared)

    def load_delta(self, parts: Parts) -> None:
        patch_into(self.model, parts)

    def finish_load(self) -> None:
        """Nothing to close."""
