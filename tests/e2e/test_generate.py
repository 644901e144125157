"""transformers ``generate()`` on compiled MoLE Llamas: greedy tokens identical to eager.

Greedy decoding amplifies any numeric slip into a different token, and a KV-cached decode runs
other graphs than the prompt (one-token steps, then symbolic cache lengths, then an attention
mask for padded batches), so this checks every graph Dynamo makes for real decoding. The
models have one layer: each of the ~5 graphs costs a Dynamo trace of the whole model.
"""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

import adafuse_compile
from adafuse_compile.models import add_lora_moe, add_pregated_lora_moe, tiny_llama

NEW_TOKENS = 64
PAD = 2


def _prompts():
    """One prompt of 7 tokens; four left-padded prompts of 9 with 0, 3, 1 and 5 pads."""
    gen = torch.Generator().manual_seed(0)
    one = torch.randint(3, 512, (1, 7), generator=gen)
    four = torch.randint(3, 512, (4, 9), generator=gen)
    mask = torch.ones_like(four)
    for row, pads in enumerate([0, 3, 1, 5]):
        four[row, :pads], mask[row, :pads] = PAD, 0
    return one, four, mask


def _generate(model, ids, mask=None):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=PAD)


@pytest.mark.parametrize("add", [add_lora_moe, add_pregated_lora_moe], ids=["per-layer-routers", "pre-gated"])
def test_generate_is_token_identical_to_eager(add, caplog):
    """Batch 1, then batch 4 with left padding, through one compiled forward (in place)."""
    model = add(tiny_llama("tiny", num_hidden_layers=1))
    one, four, mask = _prompts()
    with torch.no_grad():
        expected_one, expected_four = _generate(model, one), _generate(model, four, mask)
    torch._dynamo.reset()
    counters.clear()
    assert adafuse_compile.compile(model, in_place=True, inner="eager") is model
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="adafuse_compile"):
        got_one = _generate(model, one)
        got_four = _generate(model, four, mask)
    graphs = counters["stats"]["unique_graphs"]
    fused = sum(r.getMessage().startswith("adafuse: fused") for r in caplog.records)
    del model.forward  # back to eager
    torch._dynamo.reset()
    assert got_one.shape == (1, 7 + NEW_TOKENS) and got_four.shape == (4, 9 + NEW_TOKENS)
    assert torch.equal(got_one, expected_one)
    assert torch.equal(got_four, expected_four)
    # prompt, first decode step, symbolic cache length; then the masked prompt and decode.
    assert 3 <= graphs <= 6 and not counters["graph_break"]
    if add is add_lora_moe:  # every graph had its 7 sites fused: the tokens above came from fused ops
        assert fused == 7 * graphs


def test_compile_in_place_serves_generate_and_can_be_undone():
    """The default wrapper's generate() runs the uncompiled forward; in_place=True compiles it."""
    model = add_lora_moe(tiny_llama("tiny", num_hidden_layers=1), targets=("q_proj",))
    one, _, _ = _prompts()
    torch._dynamo.reset()
    counters.clear()
    wrapper = adafuse_compile.compile(model, inner="eager")
    with torch.no_grad():
        model.generate(one, max_new_tokens=2, do_sample=False)
        wrapper.generate(one, max_new_tokens=2, do_sample=False)
    assert counters["stats"]["unique_graphs"] == 0  # nothing compiled: generate bypasses the wrapper
    adafuse_compile.compile(model, in_place=True, inner="eager")
    with torch.no_grad():
        model.generate(one, max_new_tokens=2, do_sample=False)
    assert counters["stats"]["unique_graphs"] >= 1
    del model.forward
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        model.generate(one, max_new_tokens=2, do_sample=False)
    assert counters["stats"]["unique_graphs"] == 0


def test_compile_checks_options_before_the_first_call():
    with pytest.raises(ValueError, match=r"unknown adafuse option.*inenr.*valid options: inner"):
        adafuse_compile.compile(torch.nn.Linear(3, 3), inenr="eager")
    with pytest.raises(ValueError, match="strict.*must be bool"):
        adafuse_compile.compile(torch.nn.Linear(3, 3), in_place=True, strict=1)
