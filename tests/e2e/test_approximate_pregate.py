"""Approximate pre-gating: one fitted token-level gate replaces per-layer routers (opt-in, measured)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import adafuse_compile
from adafuse_compile import ApproximationReport, approximate_pregate
from adafuse_compile.models import (
    LoRAMoELinear,
    PreGate,
    PreGatedLoRAMoELinear,
    adapter_sites,
    add_lora_moe,
    add_pregated_lora_moe,
    find_pregate,
    route,
    tiny_llama,
)
from adafuse_compile.pregate import fit_gate


def _model(**kwargs):
    return add_lora_moe(tiny_llama("tiny"), experts=8, top_k=2, rank=4, **kwargs).eval()


def _ids(rows, length=32, seed=1):
    return torch.randint(0, 512, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def approximated():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    approx, report = approximate_pregate(model, tokens=256, held_out=128)
    return model, before, approx, report


def test_report_has_plausible_numbers(approximated):
    model, _, _, report = approximated
    assert isinstance(report, ApproximationReport)
    assert report.sites == adapter_sites(model)
    assert len(report.agreement) == len(report.sites) == 14
    assert all(0.0 <= a <= 1.0 for a in report.agreement)
    assert 0.0 <= report.mean_agreement <= 1.0 and 0.0 <= report.greedy_agreement <= 1.0
    assert report.kl >= 0.0
    assert (report.calibration_tokens, report.held_out_tokens) == (256, 128)
    text = str(report)
    assert "same expert set" in text and "KL(original || approximated)" in text
    assert all(s in text for s in report.sites)


def test_approximated_model_is_pregated_and_shares_the_experts(approximated):
    model, _, approx, _ = approximated
    pregate = find_pregate(approx)
    assert pregate is not None and (pregate.experts, pregate.top_k, pregate.gate) == (8, 2, "softmax_topk")
    assert adapter_sites(approx) == adapter_sites(model)
    for name in adapter_sites(approx):
        ours, theirs = approx.get_submodule(name), model.get_submodule(name)
        assert type(ours) is PreGatedLoRAMoELinear and ours.pregate is pregate
        assert ours.lora_A is theirs.lora_A and ours.lora_B is theirs.lora_B
        assert ours.base_layer.weight is theirs.base_layer.weight
        assert ours.scaling == theirs.scaling and not ours.training
    ids = _ids(2)
    with torch.no_grad():  # the backbone pre-hook decides from inputs_embeds too
        by_ids = approx(input_ids=ids).logits
        by_embeds = approx(inputs_embeds=approx.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(by_embeds, by_ids)


def test_original_model_is_unchanged(approximated):
    model, before, _, _ = approximated
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert find_pregate(model) is None
    assert all(type(model.get_submodule(n)) is LoRAMoELinear for n in adapter_sites(model))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not model.training
    assert [p.requires_grad for p in model.parameters()] == [n.startswith(("lora_", "router")) or ".lora_" in n
                                                             or ".router." in n for n, _ in model.named_parameters()]


def test_approximated_model_keeps_the_original_training_modes():
    model = _model().train()
    model.model.layers[0].eval()
    approx, _ = approximate_pregate(model, tokens=64, held_out=32)
    assert model.training and not model.model.layers[0].training  # restored after the eval-mode runs
    modes = {n: m.training for n, m in model.named_modules()}
    assert all(m.training == modes.get(n, True) for n, m in approx.named_modules())
    assert find_pregate(approx).training


def test_fit_recovers_a_linear_gate_exactly():
    """Logits that ARE a linear function of the normalized embeddings: the fit finds it."""
    gen = torch.Generator().manual_seed(0)
    h0 = torch.randn(400, 32, generator=gen) * 0.02
    w = torch.randn(6, 32, generator=gen)
    target = F.rms_norm(h0, (32,), eps=1e-6) @ w.T
    noise = torch.randn(3, 400, 6, generator=gen)
    site_logits = target + (noise - noise.mean(dim=0))  # sites disagree, their mean is the target
    fitted, r2 = fit_gate(h0, site_logits)
    torch.testing.assert_close(fitted, w, atol=1e-4, rtol=1e-4)
    assert r2 > 0.999999
    gate = PreGate(32, experts=6, top_k=2)
    gate.router.weight.data.copy_(fitted)
    idx, _ = gate.decide(h0)
    ref, _ = route(target, "softmax_topk", 2)
    assert torch.equal(idx.sort(-1).values, ref.sort(-1).values)


def test_approximation_is_exact_when_every_router_reads_the_normalized_embedding():
    """One layer, adapters on q/k/v (they read input_layernorm(h0) = rms_norm(h0) at init) and
    every router the same: one pre-gate reproduces each site's decision, so nothing changes."""
    model = add_lora_moe(tiny_llama("tiny", num_hidden_layers=1), targets=("q_proj", "k_proj", "v_proj"),
                         experts=4, top_k=2, rank=4).eval()
    shared = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    for name in adapter_sites(model):
        model.get_submodule(name).router.weight.data.copy_(shared)
    approx, report = approximate_pregate(model, tokens=256, held_out=128)
    assert report.agreement == [1.0, 1.0, 1.0]
    assert report.greedy_agreement == 1.0 and report.kl < 1e-6 and report.fit_r2 > 0.999999
    ids = _ids(2)
    with torch.no_grad():
        torch.testing.assert_close(approx(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_calibration_tokens_are_split_into_fit_and_held_out_rows(caplog):
    model = _model()
    with caplog.at_level(logging.INFO, logger="adafuse_compile"):
        _, report = approximate_pregate(model, _ids(10), held_out=64)
    assert (report.calibration_tokens, report.held_out_tokens) == (8 * 32, 2 * 32)
    assert any("approximate pre-gate" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="pass more rows or a smaller held_out"):
        approximate_pregate(model, _ids(2), held_out=64)
    with pytest.raises(ValueError, match=r"calibration ids must be in \[0, 512\)"):
        approximate_pregate(model, _ids(4) + 512, held_out=32)


def test_models_it_cannot_approximate_raise_saying_why():
    with pytest.raises(ValueError, match="already pre-gated"):
        approximate_pregate(add_pregated_lora_moe(tiny_llama("tiny")).eval())
    with pytest.raises(ValueError, match="no LoRA-MoE adapters"):
        approximate_pregate(tiny_llama("tiny"))
    mixed = _model()
    mixed.model.layers[1].mlp.down_proj.top_k = 3
    with pytest.raises(ValueError, match="must share experts, top_k and gate"):
        approximate_pregate(mixed)


def test_compile_with_approximate_pregate_runs_the_approximated_model():
    model = add_lora_moe(tiny_llama("tiny", num_hidden_layers=1), targets=("q_proj", "down_proj"), rank=4).eval()
    ids, calibration = _ids(2), _ids(8, seed=2)
    torch._dynamo.reset()
    compiled = adafuse_compile.compile(model, pregate="approximate", inner="eager", calibration=calibration)
    approx, report = approximate_pregate(model, calibration)
    assert compiled.adafuse_pregate_report.agreement == report.agreement
    assert find_pregate(model) is None  # the original is not the one compiled
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, approx(ids).logits, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_compile_rejects_calibration_without_approximate_pregate():
    with pytest.raises(ValueError, match="only used with pregate='approximate'"):
        adafuse_compile.compile(_model(), calibration=_ids(4))


def test_backend_and_explain_refuse_approximate_with_what_to_call_instead():
    model, ids = _model(), _ids(1)
    torch._dynamo.reset()
    f = torch.compile(model, backend="adafuse", options={"pregate": "approximate", "inner": "eager"})
    with pytest.raises(Exception, match=r"adafuse_compile.compile\(model, pregate='approximate'\)"):
        with torch.no_grad():
            f(ids)
    with pytest.raises(ValueError, match="approximate_pregate"):
        adafuse_compile.explain(model, ids, options={"pregate": "approximate"})
    torch._dynamo.reset()
