"""What a generation request asks for and what it gives back, whichever engine serves it, and the
seed of each chunk of a step's rollouts."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    n: int = 1  # samples per prompt, returned prompt-major: [p0s0, p0s1, ..., p1s0, ...]
    logprobs: bool = True  # return each sampled token's log-prob under softmax(logits / temperature)


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    logprobs: list[float] | None = None


def rollout_seed(seed: int, step: int, chunk: int) -> int:
    """Sampling seed of one chunk of one step: independent of which replica runs it."""
    return (seed * 1_000_003 + step * 7_919 + chunk) % (2**31 - 1)
