"""HFEngine: the sampled-token log-probs read off during generation equal a teacher-forced rescoring."""

from __future__ import annotations

import pytest
import torch

from atesd_ray.models import load_model, load_tokenizer
from atesd_ray.sampling import SamplingParams
from tests.conftest import make_config
from workers.engines import HFEngine


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (1.3, 20, 0.9)])
def test_generation_logprobs_match_rescoring(temperature, top_k, top_p):
    cfg = make_config("model=tiny")
    tokenizer = load_tokenizer(cfg.model)
    engine = HFEngine(load_model(cfg.model, vocab_size=len(tokenizer)), tokenizer, micro_batch=3)
    prompts = [
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("2 + 2 =", "The answer is", "Once")
    ]
    prompts.append(prompts[0])  # a second micro-batch of one row
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=12, n=2)
    completions = engine.generate(prompts, params, seed=7)
    assert len(completions) == 8 and all(len(c.logprobs) == len(c.token_ids) > 0 for c in completions)
    expanded = [p for p in prompts for _ in range(params.n)]
    rescored = engine.score(expanded, [c.token_ids for c in completions], temperature)
    for c, lp in zip(completions, rescored, strict=True):
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(lp), atol=1e-4, rtol=1e-4)
    assert max(v for c in completions for v in c.logprobs) <= 0.0
