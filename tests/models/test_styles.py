"""Adapters in the styles of real projects (models/styles.py): numerics vs. the kernel reference,
canonical shapes, and how Dynamo captures each style (the facts the passes are built on)."""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adafuse_compile.kernels.reference import lora_moe_linear_ref
from adafuse_compile.models.layers import GATES, route
from adafuse_compile.models.styles import (
    STYLES,
    MixLoRAStyleLinear,
    PEFTStyleLoraLinear,
    StyledMLP,
    reference_output,
)

NAMES = sorted(STYLES)
FAST = settings(max_examples=15, deadline=None)
DENSE = {"hydralora", "loramoe"}
SHARED_A = {"hydralora"}
STATIC = {"peft"}


def _base(in_f: int, out_f: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f))
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=gen) * 0.1)
    return lin


def _make(style, in_f, out_f, experts=4, rank=4, top_k=2, bias=True, seed=0, dtype=torch.float32, **kw):
    m = STYLES[style](_base(in_f, out_f, bias, seed), experts=experts, rank=rank, alpha=2.0 * rank,
                      top_k=top_k, seed=seed, **kw)
    return m.to(dtype).eval()


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def _ref64(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reference in float64 from the module's own (possibly low-precision) weights and decision."""
    c = m.canonical()
    idx, g = m.decision(x)

    def d(t):
        return None if t is None else t.double()

    return lora_moe_linear_ref(x.double(), d(c["weight"]), d(c["bias"]), d(c["A"]), d(c["B"]), idx, g.double(),
                               c["scale"])


_shapes = {
    "in_f": st.integers(1, 24),
    "out_f": st.integers(1, 24),
    "experts": st.integers(1, 6),
    "rank": st.integers(1, 6),
    "T": st.sampled_from([1, 2, 3, 5, 7, 12, 17]),  # 1 token (decode) and non-powers of 2
    "bias": st.booleans(),
    "seed": st.integers(0, 2**16),
    "data": st.data(),
}


def _draw(data, experts):
    return data.draw(st.integers(1, experts), label="top_k")


# ---------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", NAMES)
@FAST
@given(**_shapes)
def test_matches_reference_float64(style, in_f, out_f, experts, rank, T, bias, seed, data):
    top_k = _draw(data, experts)
    m = _make(style, in_f, out_f, experts, rank, top_k, bias, seed, dtype=torch.float64)
    x = torch.randn(T, in_f, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y = _out(m(x))
    c = m.canonical()
    idx, g = m.decision(x)
    ref = lora_moe_linear_ref(x, c["weight"], c["bias"], c["A"], c["B"], idx, g, c["scale"])
    assert y.shape == (T, out_f) and y.dtype == torch.float64
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    # the adapters are visible: the output is not the base layer's
    assert (y - m.base_layer(x)).abs().max() > 1e-6


@pytest.mark.parametrize("style", NAMES)
@FAST
@given(**_shapes)
def test_matches_reference_float32(style, in_f, out_f, experts, rank, T, bias, seed, data):
    top_k = _draw(data, experts)
    m = _make(style, in_f, out_f, experts, rank, top_k, bias, seed)
    x = torch.randn(T, in_f, generator=torch.Generator().manual_seed(seed))
    y = _out(m(x))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _ref64(m, x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, reference_output(m, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("style", NAMES)
@FAST
@given(**_shapes)
def test_canonical_and_decision_shapes(style, in_f, out_f, experts, rank, T, bias, seed, data):
    top_k = _draw(data, experts)
    m = _make(style, in_f, out_f, experts, rank, top_k, bias, seed)
    c = m.canonical()
    assert set(c) == {"weight", "bias", "A", "B", "scale", "router_weight", "gate", "top_k"}
    E = 1 if style in STATIC else experts
    e_a = 1 if style in SHARED_A | STATIC else E
    k = 1 if style in STATIC else (E if style in DENSE else top_k)
    assert c["weight"].shape == (out_f, in_f)
    assert (c["bias"] is not None) == bias
    assert c["A"].shape == (e_a, rank, in_f)
    assert c["B"].shape == (E, out_f, rank)
    assert c["scale"] == pytest.approx(2.0)
    assert c["top_k"] == k
    if style in STATIC:
        assert c["router_weight"] is None and c["gate"] is None
    else:
        assert c["router_weight"].shape == (E, in_f)
        assert c["gate"] in GATES
        assert (c["gate"] == "dense") == (style in DENSE)
    # seeded non-zero init: every expert's A and B is non-zero (PEFT would zero B)
    assert (c["A"].flatten(1).abs().amax(1) > 0).all()
    assert (c["B"].flatten(1).abs().amax(1) > 0).all()
    x = torch.randn(T, in_f, generator=torch.Generator().manual_seed(seed))
    idx, g = m.decision(x)
    assert idx.shape == g.shape == (T, k) and idx.dtype == torch.int64
    assert ((idx >= 0) & (idx < E)).all()
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # distinct experts per token
    torch.testing.assert_close(g.double().sum(-1), torch.ones(T, dtype=torch.float64), rtol=0, atol=1e-5)
    assert (g >= 0).all()


@pytest.mark.parametrize("style", NAMES)
def test_leading_dims_and_gate_matches_route(style):
    """``[B, S, in]`` inputs work; the decision is :func:`route` on the canonical router."""
    m = _make(style, 12, 10, experts=5, rank=3, top_k=2, dtype=torch.float64)
    x = torch.randn(2, 3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = _out(m(x))
    assert y.shape == (2, 3, 10)
    torch.testing.assert_close(y, reference_output(m, x), rtol=1e-10, atol=1e-12)
    c = m.canonical()
    idx, g = m.decision(x)
    assert idx.shape[:-1] == (2, 3)
    if c["gate"] is not None:
        ridx, rg = route(F.linear(x, c["router_weight"]), c["gate"], c["top_k"])
        assert torch.equal(idx, ridx)
        torch.testing.assert_close(g.double(), rg.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", NAMES)
def test_bfloat16_runs(style):
    m = _make(style, 16, 12, dtype=torch.bfloat16)
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(2)).bfloat16()
    y = _out(m(x))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), _ref64(m, x), rtol=0.05, atol=0.05)


def test_mixlora_routes_in_float32_for_bf16_model():
    m = _make("mixlora", 16, 12, experts=6, top_k=2, dtype=torch.bfloat16)
    assert isinstance(m, MixLoRAStyleLinear)
    x = torch.randn(33, 16, generator=torch.Generator().manual_seed(3)).bfloat16()
    idx, g = m.decision(x)
    ridx, rg = route(F.linear(x.float(), m.gate_.weight.float()), "softmax_topk", 2)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(g.float(), rg, rtol=1e-2, atol=1e-2)


def test_peft_dropout_is_identity_in_eval():
    m = _make("peft", 16, 12, lora_dropout=0.25)
    assert isinstance(m, PEFTStyleLoraLinear) and isinstance(m.lora_dropout["default"], nn.Dropout)
    x = torch.randn(5, 16)
    torch.testing.assert_close(m(x), reference_output(m, x), rtol=1e-5, atol=1e-6)


def test_loramoe_returns_tuple_with_router_logits():
    m = _make("loramoe", 16, 12)
    x = torch.randn(5, 16)
    out, logits = m(x)
    assert out.shape == (5, 12)
    torch.testing.assert_close(logits, F.linear(x, m.canonical()["router_weight"]))


@pytest.mark.parametrize("style", NAMES)
def test_styled_mlp_matches_reference(style):
    mlp = StyledMLP(style).double().eval()
    x = torch.randn(5, 48, dtype=torch.float64)
    y = mlp(x)
    assert y.shape == (5, 24)
    torch.testing.assert_close(y, mlp.reference(x), rtol=1e-10, atol=1e-12)
    assert set(mlp.sites()) == {"fc1", "fc2"}


def test_constructor_rejects_bad_args():
    with pytest.raises(TypeError):
        STYLES["mola"](nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError):
        STYLES["stacked"](nn.Linear(4, 4), experts=2, top_k=3)
    with pytest.raises(ValueError):
        StyledMLP("nope")


# ---------------------------------------------------------------------------------------------
# Dynamo: what each style looks like to the passes (eval mode, T=5 tokens)
# ---------------------------------------------------------------------------------------------

# style -> (graph count, graph break count) for one styled linear, x [5, 48]
DYNAMO_FACTS = {
    "mola": (1, 0),
    "stacked": (1, 0),
    "hydralora": (1, 0),
    "xlora": (1, 0),
    "loramoe": (1, 0),
    "peft": (1, 0),
}


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _op_names(explain_out) -> list[set[str]]:
    """Per captured graph, the names of its call_function targets and call_method names
    (``ops_per_graph`` leaves the methods out: ``x.topk``, ``index_add_``)."""
    return [
        {n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
         for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")}
        for gm in explain_out.graphs
    ]


@pytest.mark.parametrize("style", sorted(DYNAMO_FACTS))
def test_dynamo_one_graph(style, fresh_dynamo):
    m = _make(style, 48, 40)
    x = torch.randn(5, 48)
    out = torch._dynamo.explain(m)(x)
    assert (out.graph_count, out.graph_break_count) == DYNAMO_FACTS[style]
    ops = _op_names(out)[0]
    # nn.Linear modules are inlined: F.linear calls on parameter placeholders, no call_module
    assert "linear" in ops and not any(n.op == "call_module" for n in out.graphs[0].graph.nodes)
    if style not in STATIC:
        assert "softmax" in ops
    if style in ("mola", "stacked", "xlora"):
        assert "topk" in ops
    if style == "stacked":
        assert "einsum" in ops


def test_dynamo_mixlora_breaks_by_default(fresh_dynamo):
    """``torch.where(mask)`` is nonzero: a break inside the expert loop makes Dynamo skip the
    whole forward frame; only the expert submodules' forwards are captured (recompiled for new
    token counts), so the routing and dispatch run eagerly, invisible to the passes."""
    m = _make("mixlora", 48, 40)
    x = torch.randn(5, 48)
    out = torch._dynamo.explain(m)(x)
    assert out.graph_break_count >= 1
    for ops in _op_names(out):
        assert not ops & {"topk", "softmax", "where", "index_add_"}
    torch.testing.assert_close(m(x), reference_output(m, x), rtol=1e-5, atol=1e-6)


def test_dynamo_mixlora_one_graph_with_dynamic_output_shapes(fresh_dynamo):
    m = _make("mixlora", 48, 40)
    x = torch.randn(5, 48)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        out = torch._dynamo.explain(m)(x)
    assert (out.graph_count, out.graph_break_count) == (1, 0)
    ops = _op_names(out)[0]
    assert {"where", "index_add_", "topk", "one_hot"} <= ops


@pytest.mark.parametrize("style", NAMES)
def test_dynamo_styled_mlp_two_sites(style, fresh_dynamo):
    mlp = StyledMLP(style).eval()
    x = torch.randn(5, 48)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        out = torch._dynamo.explain(mlp)(x)
        assert (out.graph_count, out.graph_break_count) == (1, 0)
        torch._dynamo.reset()
        y = torch.compile(mlp, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(y, mlp(x), rtol=1e-5, atol=1e-6)
