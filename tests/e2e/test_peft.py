"""Real ``peft`` LoRA models under adafuse: switching, disabling, merging and reloading adapters.

A static LoRA is fused (by default) or, with ``freeze=True``, folded into a derived weight
(``W + s B A``), so the danger is a stale fold: after ``set_adapter``, ``disable_adapter()`` or
new weights, the next call must compute what eager computes. Each state is checked against eager and against the others (so a stale result
could not pass by accident).
"""

import pytest
import torch
from torch._dynamo.utils import counters

import adafuse_compile
from adafuse_compile.models import tiny_llama
from adafuse_compile.testing import assert_close_to_reference

peft = pytest.importorskip("peft")  # a test dependency (pyproject [test]); skipped only outside it

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _config(r):
    return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)


def _two_adapter_model():
    torch.manual_seed(0)  # init_lora_weights=False draws from the global RNG
    model = peft.get_peft_model(tiny_llama("tiny", num_hidden_layers=1), _config(4), adapter_name="first")
    model.add_adapter("second", _config(2))
    return model.eval()


IDS = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("freeze", [False, True])
def test_switching_and_disabling_adapters_never_uses_stale_weights(freeze):
    model = _two_adapter_model()
    torch._dynamo.reset()
    counters.clear()
    fast = torch.compile(model, backend="adafuse", options={"inner": "eager", "strict": True, "freeze": freeze})
    seen = {}

    def check(state):
        expected, got = _logits(model), _logits(fast)
        assert_close_to_reference(got, expected.double(), reduction=256, msg=state)
        seen[state] = got

    check("first")
    model.set_adapter("second")
    check("second")
    model.set_adapter("first")
    check("first again")
    with model.disable_adapter():
        check("disabled")
    check("first after disabled")
    model.base_model.set_adapter(["first", "second"])
    check("both")
    torch._dynamo.reset()
    for a, b in [("first", "second"), ("first", "disabled"), ("second", "disabled"), ("both", "first")]:
        assert not torch.allclose(seen[a], seen[b], atol=1e-3), f"{a} and {b} should differ"
    torch.testing.assert_close(seen["first again"], seen["first"], rtol=0, atol=0)
    torch.testing.assert_close(seen["first after disabled"], seen["first"], rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] >= 3  # switching recompiled (guards), not reused a fold


@pytest.mark.parametrize("state", ["one", "one frozen", "disabled", "both"])
def test_explain_per_adapter_state(state):
    """One active adapter is fused (folded with freeze=True); disabled leaves nothing to rewrite;
    two active adapters on one linear are left with the reason (not a single static LoRA, no router)."""
    model = _two_adapter_model()
    with torch.no_grad():
        if state.startswith("one"):
            report = adafuse_compile.explain(model, IDS, options={"freeze": state == "one frozen"})
        elif state == "disabled":
            with model.disable_adapter():
                report = adafuse_compile.explain(model, IDS)
        else:
            model.base_model.set_adapter(["first", "second"])
            report = adafuse_compile.explain(model, IDS)
    paths = [f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    if state.startswith("one"):
        status = "folded" if state == "one frozen" else "fused"
        assert [(s.status, s.rank, s.gate) for s in report.sites] == [(status, 4, "static")] * 3
    elif state == "disabled":
        assert report.sites == [] and report.graph_breaks == 0
    else:
        assert [s.status for s in report.sites] == ["left"] * 3
        assert all("not a static LoRA" in s.reason for s in report.sites)
    assert all(s.path.endswith(p) for s, p in zip(report.sites, paths))


def test_merge_and_unload_compiles_and_matches_the_unmerged_adapter():
    model = _two_adapter_model()
    unmerged = _logits(model)
    merged = model.merge_and_unload()
    with torch.no_grad():
        report = adafuse_compile.explain(merged, IDS)
    assert report.sites == []  # plain linears: nothing left to find
    torch._dynamo.reset()
    got = _logits(torch.compile(merged, backend="adafuse", options={"inner": "eager", "strict": True}))
    torch._dynamo.reset()
    assert_close_to_reference(got, unmerged.double(), reduction=256)


def test_adapter_weights_loaded_from_safetensors_after_compile_are_used(tmp_path):
    """PEFT saves safetensors; loading them copies into the live parameters (version bump), and
    the next compiled call reads them (with freeze=True: refolds)."""
    from safetensors.torch import load_file

    source = _two_adapter_model()
    with torch.no_grad():
        for name, p in source.named_parameters():
            if "lora_" in name:
                p.mul_(-1.5)
    source.save_pretrained(tmp_path, selected_adapters=["first"])
    path = tmp_path / "first" / "adapter_model.safetensors"
    assert path.exists()
    target = _two_adapter_model()
    torch._dynamo.reset()
    counters.clear()
    fast = torch.compile(target, backend="adafuse", options={"inner": "eager", "strict": True, "freeze": True})
    before = _logits(fast)
    result = peft.set_peft_model_state_dict(target, load_file(path),
                                            adapter_name="first")
    assert not result.unexpected_keys
    after = _logits(fast)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert not torch.allclose(before, after, atol=1e-3)
    assert_close_to_reference(after, _logits(source).double(), reduction=256)
    assert graphs == 1  # no recompile was needed: the fold reads the live weights
