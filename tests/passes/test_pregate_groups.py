"""Pre-gate groups and the merge-switch rewrite: one group per decision, both strategies equal to
eager at every step of a long decode, merged copies that never drift, a guard that fires where
the cost model says, and weights changed after compilation never served stale."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

import adafuse_compile
from adafuse_compile.runtime import switched_ops
from adafuse_compile.models import add_pregated_lora_moe, tiny_llama
from adafuse_compile.models.layers import PreGate, PreGatedLoRAMoELinear
from adafuse_compile.passes.graph_ops import group_decision, group_site
from adafuse_compile.testing import assert_equivalent, compile_and_capture, count_calls, count_fused


def _pregated(seed=0, **kw):
    return add_pregated_lora_moe(tiny_llama("tiny", **kw), seed=seed).eval()


@pytest.mark.parametrize("strategy, fused, sites", [("fused", 14, 0), ("merge", 0, 14), ("auto", 0, 14)])
def test_pregated_sites_form_one_group(strategy, fused, sites):
    torch._dynamo.reset()
    model = _pregated()
    ids = torch.randint(0, 512, (2, 5))
    (gm,) = assert_equivalent(model, ids, options={"strategy": strategy, "freeze": True})
    assert count_fused(gm) == fused
    assert count_calls(gm, group_site) == sites
    assert count_calls(gm, group_decision) == (1 if sites else 0)  # one decision for the whole group
    with torch.no_grad():
        report = adafuse_compile.explain(model, ids, options={"inner": "eager", "strategy": strategy, "freeze": True})
    assert [s.status for s in report.sites] == ["fused"] * 14 and {s.gate for s in report.sites} == {"pre-gated"}
    (group,) = report.groups
    assert len(group.sites) == 14 and group.strategy == strategy and "merge when" in group.estimate
    assert "group on decision" in str(report)


class PreGatedStack(nn.Module):
    """Sites of different shapes driven by one PreGate, as a random graph for hypothesis."""

    def __init__(self, hidden, outs, experts, top_k, gate, shared_A):
        super().__init__()
        self.pregate = PreGate(hidden, experts, top_k, gate, seed=1)
        self.sites = nn.ModuleList(
            PreGatedLoRAMoELinear(nn.Linear(hidden, o), self.pregate, rank=3, shared_A=shared_A, seed=i)
            for i, o in enumerate(outs))
        self.back = nn.ModuleList(nn.Linear(o, hidden, bias=False) for o in outs)

    def forward(self, h):
        self.pregate(h)
        h = torch.tanh(h)  # the sites read other activations than the gate (as Llama's normed states)
        for site, back in zip(self.sites, self.back):
            h = h + back(torch.tanh(site(h)))
        return h


@settings(max_examples=8, deadline=None)
@given(hidden=st.sampled_from([8, 24]), outs=st.lists(st.integers(1, 20), min_size=1, max_size=4),
       experts=st.integers(1, 6), gate=st.sampled_from(["softmax_topk", "topk_softmax", "top_p"]),
       shared_A=st.booleans(), strategy=st.sampled_from(["fused", "merge"]),
       shape=st.sampled_from([(1, 1), (1, 4), (3, 2), (0, 3)]), data=st.data())
def test_groups_on_random_pregated_graphs_equal_eager(hidden, outs, experts, gate, shared_A, strategy, shape, data):
    top_k = data.draw(st.integers(1, experts))
    torch._dynamo.reset()
    model = PreGatedStack(hidden, outs, experts, top_k, gate, shared_A).eval()
    x = torch.randn(*shape, hidden)
    if shape[0] and strategy == "merge":
        x = x[:, :1].expand(shape[0], shape[1], hidden)  # every token alike: one decision, merged
    (gm,) = assert_equivalent(model, x, options={"strategy": strategy, "freeze": True})
    if shape[0] == 0:
        return  # no token to probe with: sites are left as they are (correct, not rewritten)
    grouped = count_calls(gm, group_site)
    assert grouped + count_fused(gm) == len(outs)
    assert grouped == (len(outs) if strategy == "merge" else 0)


def _decode(model, compiled, steps, prompt=4, seed=0):
    """Teacher-forced greedy decoding with a KV cache: eager and compiled fed the same tokens;
    the largest logit difference of each step."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=gen)
    caches = DynamicCache(config=model.config), DynamicCache(config=model.config)
    diffs = []
    with torch.no_grad():
        for step in range(steps):
            ref = model(ids, past_key_values=caches[0], use_cache=True).logits[:, -1]
            out = compiled(ids, past_key_values=caches[1], use_cache=True).logits[:, -1]
            diffs.append((out - ref).abs().max().item())
            ids = ref.argmax(-1, keepdim=True)
    return diffs


def test_merge_switch_decode_1000_steps_equals_eager_and_never_drifts():
    torch._dynamo.reset()
    model = _pregated(num_hidden_layers=1, max_position_embeddings=1024)
    pristine = {n: p.detach().clone() for n, p in model.named_parameters()}
    compiled = torch.compile(model, backend="adafuse", options={"inner": "eager", "strategy": "merge", "freeze": True})
    diffs = _decode(model, compiled, 1000)
    assert max(diffs) <= 1e-4, f"step {diffs.index(max(diffs))}: {max(diffs)}"
    # Dynamo compiles the prompt, then the one-token steps (static, then dynamic cache length).
    states = [s for s in switched_ops._GROUPS.values() if s.merged is not None]
    assert sum(s.merged_steps for s in states) >= 999  # every one-token step
    state = max(states, key=lambda s: s.merged_steps)
    # The model's weights are never touched; switching the copies back gives the backbone.
    assert all(torch.equal(p, pristine[n]) for n, p in model.named_parameters())
    state.merged.unmerge()
    for merged, original in zip(state.merged.weights, state.merged.pristine):
        assert torch.equal(merged, original)


def test_weights_changed_after_compilation_are_used_by_the_merged_path():
    torch._dynamo.reset()
    model = _pregated()
    ids = torch.full((1, 1), 7)
    compiled = torch.compile(model, backend="adafuse", options={"inner": "eager", "strategy": "merge", "freeze": True})
    with torch.no_grad():
        compiled(ids)
        site = model.model.layers[0].self_attn.q_proj
        site.base_layer.weight.mul_(1.5)  # in place: version bump
        site.lora_B.add_(0.1)
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits)
        site.base_layer.weight = nn.Parameter(site.base_layer.weight * 0.5)  # a new tensor
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits)


def test_dense_pregate_is_fused_not_switched():
    torch._dynamo.reset()
    model = add_pregated_lora_moe(tiny_llama("tiny"), gate="dense", seed=0).eval()
    ids = torch.randint(0, 512, (1, 3))
    with torch.no_grad():
        out, (gm,) = compile_and_capture(model, ids, options={"strategy": "merge", "freeze": True})
        torch.testing.assert_close(out.logits, model(ids).logits)
    assert count_fused(gm) == 14 and count_calls(gm, group_site) == 0
