"""Training graphs: no silent wrong gradients.

The fused op has no autograd formula, and a folded weight is a derived input autograd cannot
see through, so sites whose parameters need gradients are left as they were (and explain says
so). These tests compare every gradient with eager's, for whole models and for each code shape.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import adafuse_compile
from adafuse_compile.models import add_lora_moe, tiny_llama
from adafuse_compile.models.layers import LoRAMoELinear
from adafuse_compile.models.styles import StyledMLP
from adafuse_compile.testing import tolerance

IDS = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(3))


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient reached {missing}"
    return {n: g.clone() for n, g in grads.items()}


def _assert_same_grads(got, expected, dtype=torch.float32, reduction=256):
    assert got.keys() == expected.keys() and got
    tol = tolerance(dtype, reduction)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("hoist", [False, True])
def test_llama_adapter_gradients_equal_eager(hoist):
    """Through AOTAutograd (as Inductor would be); the code-shape tests below use inner="eager"."""
    model = add_lora_moe(tiny_llama("tiny", num_hidden_layers=1))  # adapters trainable, backbone frozen
    loss = lambda m: lambda: m(IDS).logits.square().mean()  # noqa: E731
    expected = _grads(model, loss(model))
    torch._dynamo.reset()
    fast = torch.compile(model, backend="adafuse", options={"inner": "aot_eager", "strict": True, "hoist": hoist})
    got = _grads(model, loss(fast))
    torch._dynamo.reset()
    assert len(expected) == 7 * 3  # lora_A, lora_B, router of 7 sites
    _assert_same_grads(got, expected, reduction=1024)


def test_explain_says_why_training_sites_are_left():
    model = add_lora_moe(tiny_llama("tiny", num_hidden_layers=1))
    report = adafuse_compile.explain(model, IDS)  # grad mode on: how the model trains
    assert len(report.sites) == 7 and report.count("left") == 7
    assert all("gradients are required" in s.reason and "torch.no_grad()" in s.reason for s in report.sites)


def test_compiled_for_inference_then_trained_recompiles_and_gives_eager_gradients():
    """Dynamo guards on grad mode: the fused no_grad graph is never reused for a backward."""
    layer = LoRAMoELinear(torch.nn.Linear(16, 12), experts=4, rank=3, top_k=2)
    x = torch.randn(5, 16)
    torch._dynamo.reset()
    counters.clear()
    fast = torch.compile(layer, backend="adafuse", options={"inner": "eager", "strict": True})
    with torch.no_grad():
        torch.testing.assert_close(fast(x), layer(x))
    got = _grads(layer, lambda: fast(x).pow(2).sum())
    expected = _grads(layer, lambda: layer(x).pow(2).sum())
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()
    _assert_same_grads(got, expected)


@pytest.mark.parametrize("style", ["mola", "stacked", "peft"])  # a per-expert loop, a gather, a static LoRA
def test_every_code_shape_trains_with_eager_gradients(style):
    """PEFT's static LoRA too: a fold would hide A and B from autograd (their grads would be None)."""
    torch.manual_seed(0)
    model = StyledMLP(style).train()  # dropout is 0 in the zoo: train() changes nothing else
    x = torch.randn(2, 3, 48)
    expected = _grads(model, lambda: model(x).square().mean())
    torch._dynamo.reset()
    fast = torch.compile(model, backend="adafuse", options={"inner": "eager", "strict": True})
    got = _grads(model, lambda: fast(x).square().mean())
    torch._dynamo.reset()
    _assert_same_grads(got, expected, reduction=64)


@pytest.mark.parametrize("lowering", ["decomposed", "op"])
def test_gradients_with_respect_to_the_input_of_a_frozen_model(lowering):
    """Attribution and adversarial inputs: parameters frozen, the input requires grad."""
    layer = LoRAMoELinear(torch.nn.Linear(16, 12), experts=4, rank=3, top_k=2).requires_grad_(False)
    x = torch.randn(5, 16, requires_grad=True)
    (expected,) = torch.autograd.grad(layer(x).pow(2).sum(), x)
    torch._dynamo.reset()
    fast = torch.compile(layer, backend="adafuse", options={"inner": "eager", "lowering": lowering})
    (got,) = torch.autograd.grad(fast(x).pow(2).sum(), x)
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
