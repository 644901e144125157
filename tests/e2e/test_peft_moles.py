"""PEFT's own mixtures of LoRA experts under adafuse: X-LoRA, Arrow and Poly (real ``peft``).

X-LoRA makes its decision in a first pass (a classifier on the hidden states) and hands it to
every LoRA layer as a keyword argument injected by hooks: a dense weight per token and expert,
optionally top-k masked inside the layer. Arrow routes by similarity to prototypes held in a
buffer built lazily in the first forward. Both must be fused, with eager's output. Poly mixes
the A and B matrices separately per task (``(sum w A)(sum w B)`` is not a sum of expert
outputs): it must never be fused.
"""

import pytest
import torch

import adafuse_compile
from adafuse_compile.models import tiny_llama
from adafuse_compile.testing import FUSED_SITES, assert_rewrite

import real_packages as rp

peft = pytest.importorskip("peft")

TARGETS = rp.PEFT_TARGETS
IDS = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(1))
OTHER_IDS = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory):
    """Paths of four saved LoRA adapters (random nonzero weights) of the tiny Llama."""
    return rp.save_lora_adapters(tmp_path_factory.mktemp("adapters"))


@pytest.mark.parametrize("top_k, softmax", [(None, False), (2, True)])
def test_xlora_decision_from_the_scaling_pass_is_fused(saved_adapters, top_k, softmax):
    model = rp.xlora_model(saved_adapters[:3], top_k, softmax)
    with torch.no_grad():
        report = adafuse_compile.explain(model, input_ids=IDS)
    # X-LoRA's hooks split the forward into several graphs (a site may be seen in more than one)
    assert {s.path.split("layers.")[-1] for s in report.sites} == {f"{i}.self_attn.{p}" for i in (0, 1)
                                                                  for p in TARGETS}, str(report)
    assert all(s.status == "fused" and s.gate == "pre-gated dense" and s.experts == 3 for s in report.sites), \
        str(report)
    assert_rewrite(model, input_ids=IDS, after=(FUSED_SITES,))
    fast = adafuse_compile.compile(model, inner="eager")
    with torch.no_grad():  # another input, so another decision: read at run time, not baked in
        for ids in (IDS, OTHER_IDS):
            torch.testing.assert_close(fast(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()


def test_arrow_router_in_a_lazily_built_buffer_is_fused(saved_adapters):
    model = rp.arrow_model(saved_adapters)  # its first forward builds the prototypes
    with torch.no_grad():
        report = adafuse_compile.explain(model, input_ids=IDS)
    assert [s.status for s in report.sites] == ["fused"] * 4, str(report)
    assert all(s.experts == 4 for s in report.sites)
    assert_rewrite(model, input_ids=OTHER_IDS, after=(FUSED_SITES,))


def test_poly_mixes_A_and_B_per_task_and_is_never_fused():
    model = rp.poly_model()
    with torch.no_grad():
        tasks = torch.tensor([0, 2])
        report = adafuse_compile.explain(model, input_ids=IDS, task_ids=tasks)
        expected = model(input_ids=IDS, task_ids=tasks).logits
        got = adafuse_compile.compile(model, inner="eager")(input_ids=IDS, task_ids=tasks).logits
    torch._dynamo.reset()
    assert report.count("fused") == report.count("folded") == 0
    assert report.sites or "no adapter site found" in str(report)
    assert all(s.reason for s in report.sites)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def _mixed_model(second_targets=TARGETS, dora=False):
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_llama("tiny", num_hidden_layers=1),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                                                use_dora=dora), adapter_name="a")
    model.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=16, target_modules=second_targets,
                                           init_lora_weights=False))
    return model.eval()


MIXES = (["a", "b", "__base__"], ["b", "a", "a"], ["__base__", "__base__", "b"], ["a", "a", "a"])


def test_mixed_adapter_batches_are_fused_and_a_new_mix_does_not_recompile():
    """PEFT's ``adapter_names=`` (rows sliced by Python lists: one graph per mix under plain
    torch.compile) is served by a gate tensor: one graph for every mix, sites fused."""
    from torch._dynamo.utils import counters

    model = _mixed_model()
    ids = torch.randint(0, 512, (3, 5), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    counters.clear()
    fast = adafuse_compile.compile(model, inner="eager")
    with torch.no_grad():
        outs = [fast(input_ids=ids, adapter_names=mix).logits for mix in MIXES]
        for mix, got in zip(MIXES, outs):
            torch.testing.assert_close(got, model(input_ids=ids, adapter_names=mix).logits, atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] == 1
        torch.testing.assert_close(fast(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        report = adafuse_compile.explain(model, input_ids=ids, adapter_names=MIXES[0])
        with pytest.raises(ValueError, match="non-existing adapter"):
            fast(input_ids=ids, adapter_names=["a", "c", "b"])
    torch._dynamo.reset()
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)  # the mixes differ: the gate is read
    assert [(s.path.split("layers.")[-1], s.status, s.gate, s.experts) for s in report.sites] == [
        (f"0.self_attn.{p}", "fused", "pre-gated dense", 2) for p in TARGETS]


@pytest.mark.parametrize("case", ["adapter on some layers only", "embedding lora"])
def test_mixed_adapter_batches_the_gate_cannot_serve_stay_correct(case):
    """A layer without every adapter is left (correct, not fused); LoRA on an embedding is not
    gated at all: PEFT's own path serves the batch (one graph per mix)."""
    model = _mixed_model(["q_proj"] if case != "embedding lora" else ["q_proj", "embed_tokens"])
    ids = torch.randint(0, 512, (3, 5), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    fast = adafuse_compile.compile(model, inner="eager")
    with torch.no_grad():
        for mix in MIXES[:2]:
            torch.testing.assert_close(fast(input_ids=ids, adapter_names=mix).logits,
                                       model(input_ids=ids, adapter_names=mix).logits, atol=1e-5, rtol=1e-5)
        report = adafuse_compile.explain(model, input_ids=ids, adapter_names=MIXES[0])
    torch._dynamo.reset()
    if case == "embedding lora":
        assert report.count("fused") == 0
    else:  # v_proj holds one of the two adapters: left (the gate has two columns), q_proj fused
        assert {s.path.split(".")[-1]: s.status for s in report.sites} == {"q_proj": "fused", "v_proj": "left"}


def test_mixed_adapter_batch_errors_are_peft_own():
    model = _mixed_model(dora=True)
    ids = torch.randint(0, 512, (3, 5), generator=torch.Generator().manual_seed(3))
    fast = adafuse_compile.compile(model, inner="eager")
    with torch.no_grad(), pytest.raises(ValueError, match="DoRA"):
        fast(input_ids=ids, adapter_names=MIXES[0])
    torch._dynamo.reset()
