"""RouteIntoSitesPass and adafuse::routed_lora_moe_linear: a site's own top-k router moves into
its op, and the experts it chooses are eager's, near-ties and exact ties included."""

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from adafuse_compile.kernels import routed_lora_moe_linear
from adafuse_compile.kernels.cpu_extension import load_cpu_kernels
from adafuse_compile.kernels.lora_moe_linear import lora_moe_linear_torch
from adafuse_compile.kernels.reference import topk_route
from adafuse_compile.models.layers import LoRAMoELinear
from adafuse_compile.passes.graph_ops import fused_site, routed_site
from adafuse_compile.testing import assert_rewrite, compile_and_capture, count_calls

FORMS = [(True, True), (True, False), (False, False)]  # (softmax_first, renorm)


def _eager(x, W, b, rx, Wr, br, A, B, k, softmax_first, renorm, scale, softmax_dtype=None, gate_dtype=None):
    idx, g = topk_route(rx, Wr, br, k=k, softmax_first=softmax_first, renorm=renorm, softmax_dtype=softmax_dtype,
                        gate_dtype=gate_dtype)
    return lora_moe_linear_torch(x, W, b, A, B, idx, g, scale), idx


def _assert_same_choice(y, x, W, b, A, B, idx_ref, g_like, scale):
    """``y`` was computed with eager's experts: against the output of every other choice, the
    distance to eager's is orders of magnitude smaller (experts here differ at O(1))."""
    ref = lora_moe_linear_torch(x, W, b, A, B, idx_ref, g_like, scale)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 12), n=st.sampled_from([8, 33, 96, 512]), E=st.integers(2, 16), k_frac=st.floats(0, 1),
       form=st.sampled_from(FORMS), ties=st.sampled_from(["none", "exact", "ulp", "zero"]), bias=st.booleans(),
       stacked=st.booleans(), seed=st.integers(0, 2**16))
def test_decision_is_eagers(T, n, E, k_frac, form, ties, bias, stacked, seed):
    """Exact ties (duplicate router rows), near-ties (rows one ulp apart) and an all-zero router
    must give eager's experts, through the fallback where our logits cannot prove it."""
    assert load_cpu_kernels()
    k = 1 + int(k_frac * (E - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n, generator=gen)
    W, A, B = torch.randn(24, n, generator=gen), torch.randn(E, 4, n, generator=gen), torch.randn(E, 24, 4, generator=gen)
    Wr = torch.randn(E, n, generator=gen) / n ** 0.5
    br = torch.randn(E, generator=gen) if bias else None
    if ties == "exact":
        Wr[-1] = Wr[0]
    elif ties == "ulp":
        Wr[-1] = torch.nextafter(Wr[0], torch.full_like(Wr[0], 1.0))
    elif ties == "zero":
        Wr.zero_()
    softmax_first, renorm = form
    y = routed_lora_moe_linear(x, W, None, x, Wr, br, [A] if stacked else list(A), [B] if stacked else list(B), k=k,
                               softmax_first=softmax_first, renorm=renorm, scale=1.5)
    idx, g = topk_route(x, Wr, br, k=k, softmax_first=softmax_first, renorm=renorm)
    _assert_same_choice(y, x, W, None, A, B, idx, g, 1.5)


@pytest.mark.parametrize("dtypes", [(torch.float32, None), (None, torch.bfloat16), (torch.float64, torch.float32)])
def test_other_dtypes_route_like_eager(dtypes):
    """Softmax or gate dtypes other than float32 take eager's ATen calls (same decision, same g)."""
    softmax_dtype, gate_dtype = dtypes
    torch.manual_seed(0)
    x, W, A, B, Wr = torch.randn(5, 32), torch.randn(16, 32), torch.randn(6, 4, 32), torch.randn(6, 16, 4), torch.randn(6, 32)
    for softmax_first, renorm in FORMS:
        y = routed_lora_moe_linear(x, W, None, x, Wr, None, [A], [B], k=2, softmax_first=softmax_first, renorm=renorm,
                                   softmax_dtype=softmax_dtype, gate_dtype=gate_dtype, scale=2.0)
        ref, _ = _eager(x, W, None, x, Wr, None, A, B, 2, softmax_first, renorm, 2.0, softmax_dtype, gate_dtype)
        torch.testing.assert_close(y, ref)


def test_reduced_precision_matmuls_route_like_eager():
    """With float32 matmuls allowed to run in reduced precision, our logits' error bound does
    not hold for eager's: the op must take eager's calls."""
    torch.manual_seed(1)
    x, W, A, B, Wr = torch.randn(7, 64), torch.randn(16, 64), torch.randn(8, 4, 64), torch.randn(8, 16, 4), torch.randn(8, 64)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        y = routed_lora_moe_linear(x, W, None, x, Wr, None, [A], [B], k=2, softmax_first=True, renorm=True, scale=1.0)
        ref, _ = _eager(x, W, None, x, Wr, None, A, B, 2, True, True, 1.0)
    finally:
        torch.set_float32_matmul_precision(before)
    torch.testing.assert_close(y, ref)


def test_opcheck():
    x, W, A, B, Wr = torch.randn(3, 16), torch.randn(8, 16), torch.randn(4, 2, 16), torch.randn(4, 8, 2), torch.randn(4, 16)
    for As, Bs in (([A], [B]), (list(A), list(B))):
        torch.library.opcheck(torch.ops.adafuse.routed_lora_moe_linear.default,
                              (x, W, None, x, Wr, None, As, Bs, 2, True, True, None, None, True, 2.0))


class MixtralSite(nn.Module):
    """One adapted linear routed the MixLoRA/Mixtral way (softmax in float32, top-k, renormalize),
    per-expert ``nn.Linear``s, with the router's logits optionally returned (an auxiliary loss)."""

    def __init__(self, n=48, out=40, experts=6, k=2, r=4, return_logits=False, temperature=None):
        super().__init__()
        self.base, self.router = nn.Linear(n, out, bias=False), nn.Linear(n, experts, bias=False)
        self.A = nn.ModuleList(nn.Linear(n, r, bias=False) for _ in range(experts))
        self.B = nn.ModuleList(nn.Linear(r, out, bias=False) for _ in range(experts))
        for m in self.B:
            nn.init.normal_(m.weight, std=0.5)
        self.k, self.return_logits, self.temperature = k, return_logits, temperature

    def forward(self, x):
        logits = self.router(x)
        if self.temperature is not None:
            logits = logits / self.temperature
        w = F.softmax(logits, dim=-1, dtype=torch.float32)
        w, i = torch.topk(w, self.k, dim=-1)
        w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
        y = self.base(x)
        for e in range(len(self.A)):
            y = y + ((i == e) * w).sum(-1, keepdim=True) * self.B[e](self.A[e](x)) * 2.0
        return (y, logits) if self.return_logits else y


@pytest.mark.parametrize("make", [lambda: MixtralSite(), lambda: LoRAMoELinear(nn.Linear(48, 40), experts=6, rank=4,
                                                                                  top_k=2, gate="topk_softmax")])
def test_router_moves_into_the_op(make):
    torch.manual_seed(0)
    rewrites = assert_rewrite(make().eval(), torch.randn(2, 5, 48), before=[torch.topk], after=[routed_site],
                              options={"inner": "eager"})
    for rw in rewrites:
        assert not count_calls(rw.graph, fused_site)
        assert not count_calls(rw.graph, torch.topk) and not count_calls(rw.graph, "topk")
        assert not count_calls(rw.graph, F.softmax) and not count_calls(rw.graph, "softmax")


@pytest.mark.parametrize("model", ["logits returned", "temperature"])
def test_router_stays_when_read_elsewhere_or_not_a_known_form(model):
    """Logits that also leave the graph, or a router with a temperature: the site is fused but
    its routing stays in the graph, as the model wrote it."""
    torch.manual_seed(0)
    m = (MixtralSite(return_logits=True) if model == "logits returned" else MixtralSite(temperature=0.7)).eval()
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        out, graphs = compile_and_capture(m, x, options={"inner": "eager"})
        ref = m(x)
    assert sum(count_calls(gm, fused_site) for gm in graphs) == 1
    assert not any(count_calls(gm, routed_site) for gm in graphs)
    torch.testing.assert_close(out, ref)
