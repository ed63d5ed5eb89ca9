"""FewRowLinear: the decode-time linear layer computes what nn.Linear computes, in the same model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atesd_ray.models import load_model, load_tokenizer
from atesd_ray.runtime.weights import load_into
from atesd_ray.sampling import SamplingParams
from tests.conftest import make_config
from workers.engines import HFEngine
from workers.few_row_linear import MAX_ROWS, FewRowLinear, use_few_row_linear


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 40), (3, 1, 40), (4, 40), (2, 16, 40), (MAX_ROWS + 1, 40), (5, 0, 40)])
def test_matches_linear(shape, bias):
    torch.manual_seed(0)
    layer = FewRowLinear(40, 24, bias=bias)
    x = torch.randn(*shape)
    out = layer(x)
    assert out.shape == (*shape[:-1], 24) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == layer.weight.shape


def test_other_dtypes_take_the_library_path():
    layer = FewRowLinear(8, 4).to(torch.bfloat16)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_swap_keeps_parameters_names_and_outputs():
    cfg = make_config("model=tiny", "model.lora.enabled=true")
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = load_model(cfg.model, vocab_size=len(tokenizer)).eval()  # no LoRA dropout
    reference = copy.deepcopy(model)
    before = dict(model.named_parameters())
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert linears > 0

    use_few_row_linear(model)

    assert not any(type(m) is nn.Linear for m in model.modules())
    assert sum(type(m) is FewRowLinear for m in model.modules()) == linears
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert model.state_dict().keys() == reference.state_dict().keys()

    ids = torch.tensor([tokenizer("2 + 2 =", add_special_tokens=False)["input_ids"]] * 4)
    with torch.no_grad():
        plain_logits = model(input_ids=ids[:, :1]).logits
        for width in (ids.shape[1], 1):  # a prefill of 4 x n rows, a decode step of 4 rows
            torch.testing.assert_close(
                model(input_ids=ids[:, :width]).logits, reference(input_ids=ids[:, :width]).logits
            )
        # a weight load reaches the swapped layers
        named = {n: 0.05 * torch.randn_like(p) for n, p in model.named_parameters() if "lora_B" in n}
        load_into(model, named)
        load_into(reference, named)
        loaded = model(input_ids=ids[:, :1]).logits
        torch.testing.assert_close(loaded, reference(input_ids=ids[:, :1]).logits)
        assert not torch.allclose(loaded, plain_logits)


def test_engine_generates_what_the_plain_model_generates():
    cfg = make_config("model=tiny")
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = load_model(cfg.model, vocab_size=len(tokenizer))
    plain = copy.deepcopy(model).eval()
    engine = HFEngine(model, tokenizer, micro_batch=4)
    prompts = [
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("2 + 2 =", "The answer is", "Once", "x")
    ]
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    ours = [c.token_ids for c in engine.generate(prompts, params, seed=0)]
    engine.model = plain
    assert ours == [c.token_ids for c in engine.generate(prompts, params, seed=0)]
