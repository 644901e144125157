"""HoistRoutersPass: one batched matmul for the routers that read one tensor, and not one
routing decision changed (bitwise-equal logits, 0 flipped experts over 100k tokens)."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

import adafuse_compile
from adafuse_compile.models import add_lora_moe, tiny_llama
from adafuse_compile.models.layers import GATES, LoRAMoELinear
from adafuse_compile.passes.graph_ops import hoisted_logits, router_logits
from adafuse_compile.testing import assert_equivalent, compile_and_capture, compile_and_capture_rewrites, count_calls


class SharedInputSites(nn.Module):
    """S adapted linears on one input (q/k/v-like): their decisions and their summed outputs."""

    def __init__(self, sites: int, hidden: int, experts: int, top_k: int, gate: str, seed: int = 0) -> None:
        super().__init__()
        self.sites = nn.ModuleList(
            LoRAMoELinear(nn.Linear(hidden, hidden), experts=experts, rank=4, top_k=top_k, gate=gate, seed=seed + i)
            for i in range(sites))

    def forward(self, x, adapters: bool = True):
        decisions = [s.route(x) for s in self.sites]
        out = sum(s(x) for s in self.sites) if adapters else x
        return out, [d[0] for d in decisions], [d[1] for d in decisions]


# Routers stay in the graph for hoisting to batch them: with the op lowering on CPU, a site's
# own router moves into its op instead (RouteIntoSitesPass), leaving nothing to hoist.
ROUTERS_IN_GRAPH = {"inner": "eager", "lowering": "decomposed"}


def _hoisted(model, x, **kwargs):
    with torch.no_grad():
        out, (gm,) = compile_and_capture(model, x, options=ROUTERS_IN_GRAPH, **kwargs)
    return out, gm


@settings(max_examples=10, deadline=None)
@given(sites=st.integers(2, 4), hidden=st.sampled_from([16, 33, 64]), experts=st.integers(2, 8),
       gate=st.sampled_from(GATES), tokens=st.integers(0, 40), data=st.data())
def test_hoisted_routing_is_bitwise_eager(sites, hidden, experts, gate, tokens, data):
    top_k = data.draw(st.integers(1, experts))
    torch._dynamo.reset()
    model = SharedInputSites(sites, hidden, experts, top_k, gate).eval()
    x = torch.randn(tokens, hidden)
    (out, idx, g), gm = _hoisted(model, x)
    with torch.no_grad():
        ref_out, ref_idx, ref_g = model(x)
    # One matmul for every router, where the batched matmul rounds like the separate ones (for
    # small in*T*E it may not, and the routers are left); never a changed decision.
    assert count_calls(gm, hoisted_logits) <= 1
    for a, b in zip(idx, ref_idx):
        assert torch.equal(a, b)
    for a, b in zip(g, ref_g):
        assert torch.equal(a, b)  # bitwise: the same logits give the same weights
    torch.testing.assert_close(out, ref_out)


def test_no_flipped_expert_over_100k_tokens():
    """The issue's measure: routing of 100k random tokens through hoisted routers, against eager."""
    torch._dynamo.reset()
    model = SharedInputSites(3, 64, 8, 2, "softmax_topk").eval()
    x = torch.randn(100_000, 64)
    (_, idx, g), gm = _hoisted(model, x, adapters=False)  # routing only: probing 100k-token sites is slow
    assert count_calls(gm, hoisted_logits) == 1
    with torch.no_grad():
        _, ref_idx, ref_g = model(x, adapters=False)
    flips = sum(int((a != b).any(-1).sum()) for a, b in zip(idx, ref_idx))
    assert flips == 0
    assert all(torch.equal(a, b) for a, b in zip(g, ref_g))


def test_llama_routers_hoisted_per_shared_input():
    """q/k/v read one normed state, gate/up another: 2 batched matmuls per layer, o/down alone.
    The hoisted routers' selection (softmax, top-k, renormalization) runs once per group too:
    4 top-k calls per layer instead of 7, and each router reads its rows of the results."""
    torch._dynamo.reset()
    model = add_lora_moe(tiny_llama("tiny"), seed=0).eval()
    ids = torch.randint(0, 512, (2, 5))
    (gm,) = assert_equivalent(model, ids, options=ROUTERS_IN_GRAPH)
    layers = model.config.num_hidden_layers
    assert count_calls(gm, hoisted_logits) == 2 * layers
    assert count_calls(gm, torch.topk) == 4 * layers and count_calls(gm, torch.softmax) == 4 * layers
    assert count_calls(gm, router_logits) == 2 * 5 * layers  # each hoisted router's idx and g rows
    with torch.no_grad():
        report = adafuse_compile.explain(model, ids, options=ROUTERS_IN_GRAPH)
    assert len(report.hoisted_routers) == 2 * layers and "routers hoisted: 10 router(s)" in str(report)
    assert all(h.selection == 7 for h in report.hoisted_routers)  # float, softmax, topk, 2 getitem, sum, div
    assert "selection batched" in str(report)


def test_hoist_option_off_leaves_routers():
    torch._dynamo.reset()
    model = SharedInputSites(3, 16, 4, 2, "softmax_topk").eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        _, (gm,) = compile_and_capture(model, x, options={**ROUTERS_IN_GRAPH, "hoist": False})
    assert count_calls(gm, hoisted_logits) == 0


@pytest.mark.parametrize("bias", [True])
def test_routers_with_bias_are_left(bias):
    """A fused addmm rounds differently from matmul + add: not bitwise, so not hoisted."""

    class BiasRouters(nn.Module):
        def __init__(self):
            super().__init__()
            self.routers = nn.ModuleList(nn.Linear(16, 4, bias=bias) for _ in range(3))

        def forward(self, x):
            return [torch.topk(torch.softmax(r(x), -1), 2) for r in self.routers]

    torch._dynamo.reset()
    with torch.no_grad():
        _, (gm,) = compile_and_capture(BiasRouters(), torch.randn(3, 16), options={"inner": "eager"})
    assert count_calls(gm, hoisted_logits) == 0


class RoutedOnce(SharedInputSites):
    """Each site's decision computed once, returned and used by its site."""

    def forward(self, x, adapters: bool = True):
        decisions = [s.route(x) for s in self.sites]
        out = sum(s(x, d) for s, d in zip(self.sites, decisions))
        return out, [d[0] for d in decisions], [d[1] for d in decisions]


@pytest.mark.parametrize("gate", GATES)
def test_selection_batched_where_the_routers_select_alike(gate):
    """Same gate, same k: each router's selection ops run once on the stacked logits (the gates
    made of row-wise ops), and every decision is bitwise eager's, ties included (tokens whose
    top experts have equal logits)."""
    torch._dynamo.reset()
    model = RoutedOnce(3, 32, 6, 2, gate).eval()
    x = torch.randn(9, 32)
    with torch.no_grad():
        for site in model.sites:  # experts 0 and 1 tie on every token
            site.router.weight[1] = site.router.weight[0]
        rewrites = compile_and_capture_rewrites(model, x, options=ROUTERS_IN_GRAPH)[1]
        (out, idx, g) = compile_and_capture(model, x, options=ROUTERS_IN_GRAPH)[0]
        ref_out, ref_idx, ref_g = model(x)
    (group,) = [h for rw in rewrites for h in rw.hoisted]
    if gate in ("softmax_topk", "topk_softmax", "dense"):
        assert group.selection > 0
    assert all(torch.equal(a, b) for a, b in zip(idx, ref_idx))
    assert all(torch.equal(a, b) for a, b in zip(g, ref_g))
    torch.testing.assert_close(out, ref_out)


def test_selection_left_per_router_when_the_routers_differ():
    """Routers that select differently (here: softmax then top-k, and top-k then softmax) share
    the matmul, not the selection."""
    torch._dynamo.reset()
    model = RoutedOnce(2, 32, 6, 2, "softmax_topk").eval()
    model.sites[1].gate = "topk_softmax"
    x = torch.randn(4, 32)
    with torch.no_grad():
        rewrites = compile_and_capture_rewrites(model, x, options=ROUTERS_IN_GRAPH)[1]
        (_, idx, g), (gm,) = compile_and_capture(model, x, options=ROUTERS_IN_GRAPH)
        _, ref_idx, ref_g = model(x)
    (group,) = [h for rw in rewrites for h in rw.hoisted]
    assert group.selection == 0 and count_calls(gm, torch.topk) == 2
    assert all(torch.equal(a, b) for a, b in zip(idx, ref_idx)) and all(torch.equal(a, b) for a, b in zip(g, ref_g))
