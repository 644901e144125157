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
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)  # our float32 softmax: g to rounding


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


# ---- Adversarial sites: what the pass must move, what it must leave, and near-ties end to end ----
#
# Each site is a MixtralSite-like module (base + per-expert loop) whose routing is a small
# function of the module and the input; the compiled output must equal eager's, and the router
# moves into the op only when it is exactly one of the two forms.

import functools
import logging
import math

from adafuse_compile.backend import adafuse_backend, capture_rewrites

N_IN = 16


class RoutedSite(nn.Module):
    """One adapted linear whose routing is ``route(self, h) -> (w, i, *extra)``; ``prep`` maps the
    input to the site's ``h`` first (a transpose, a flatten); ``extra`` outputs are returned too."""

    def __init__(self, route, n=N_IN, out=12, experts=4, k=2, r=4, router_bias=False, prep=None, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.base, self.router = nn.Linear(n, out, bias=False), nn.Linear(n, experts, bias=router_bias)
        self.A = nn.ModuleList(nn.Linear(n, r, bias=False) for _ in range(experts))
        self.B = nn.ModuleList(nn.Linear(r, out, bias=False) for _ in range(experts))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
        self.register_buffer("rb", torch.randn(experts, generator=gen))  # a bias added after the linear
        self.register_buffer("mask", torch.where(torch.arange(experts) == 1, -1.0, 0.0))  # < 0: expert masked out
        self.register_buffer("k_t", torch.tensor(k))
        self.k, self._route, self._prep = k, route, prep

    def forward(self, x):
        h = x if self._prep is None else self._prep(x)
        w, i, *extra = self._route(self, h)
        y = self.base(h)
        for e in range(len(self.A)):
            y = y + ((i == e) * w).sum(-1, keepdim=True) * self.B[e](self.A[e](h)) * 2.0
        return (y, *extra) if extra else y


def _tensors(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _check(model, x, *, moved, fused=True, tol=1e-5, leftovers=False):
    """Compile ``model`` (inner eager) on ``x`` under no_grad: output equal to eager's, the site
    fused (or not, ``fused=False``; ``None``: either), and its router moved into the op iff
    ``moved`` (``None``: either); a moved router leaves no top-k or softmax behind unless
    ``leftovers``."""
    model.eval()
    with torch.no_grad():
        ref = model(x.clone())
        out, graphs = compile_and_capture(model, x.clone(), options={"inner": "eager"})
    for a, b in zip(_tensors(out), _tensors(ref), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    sites = sum(count_calls(gm, fused_site, routed_site) for gm in graphs)
    routed = sum(count_calls(gm, routed_site) for gm in graphs)
    if fused is not None:
        assert sites == (1 if fused else 0), f"{sites} fused sites (expected {int(fused)}): the test proves nothing"
    if moved is not None:
        assert routed == int(moved), f"router {'left in the graph' if routed == 0 else 'moved into the op'}"
    if routed and not leftovers:  # nothing of the router left behind
        assert not any(count_calls(gm, torch.topk, "topk") for gm in graphs)
        assert not any(count_calls(gm, torch.softmax, F.softmax, "softmax") for gm in graphs)
    return graphs


def _top(m, p, **kw):
    return torch.topk(p, m.k, dim=-1, **kw)


# -- exact forms, written in every way the matcher accepts: moved, and equal ------------------

def mixtral_f32_cast(m, h):
    w, i = _top(m, F.softmax(m.router(h), dim=-1, dtype=torch.float32))
    return (w / w.sum(dim=-1, keepdim=True)).to(h.dtype), i


def torch_softmax(m, h):
    w, i = _top(m, torch.softmax(m.router(h), dim=-1))
    return w / w.sum(dim=-1, keepdim=True), i


def method_softmax_no_renorm(m, h):
    return m.router(h).softmax(-1).topk(m.k, dim=-1, largest=True, sorted=True)


def positional_softmax_topk_without_dim_itruediv(m, h):
    w, i = torch.topk(F.softmax(m.router(h), -1), m.k)
    w /= w.sum(-1, keepdim=True)
    return w, i


def torch_div(m, h):
    w, i = _top(m, m.router(h).softmax(-1))
    return torch.div(w, w.sum(-1, keepdim=True)), i


def true_divide_positional_keepdim(m, h):
    w, i = _top(m, m.router(h).softmax(-1))
    return torch.true_divide(w, w.sum(-1, True)), i


def method_div(m, h):
    w, i = _top(m, m.router(h).softmax(-1))
    return w.div(w.sum(-1, keepdim=True)), i


def div_inplace_rebound(m, h):
    w, i = _top(m, m.router(h).softmax(-1))
    w = w.div_(w.sum(-1, keepdim=True))
    return w, i


def torch_sum(m, h):
    w, i = _top(m, m.router(h).softmax(-1))
    return w / torch.sum(w, dim=-1, keepdim=True), i


def positive_dims(m, h):  # h is [B, S, n]: dim 2 is the last
    w, i = torch.topk(F.softmax(m.router(h), dim=2), m.k, dim=2)
    return w / w.sum(dim=2, keepdim=True), i


def noop_casts(m, h):
    p = torch.softmax(m.router(h).float(), -1, dtype=torch.float32)
    w, i = torch.topk(p, m.k, -1)
    return (w / w.sum(-1, keepdim=True)).float(), i.to(torch.int64)


def half_gate(m, h):
    w, i = _top(m, m.router(h).softmax(-1))
    return (w / w.sum(-1, keepdim=True)).half(), i


def float64_softmax(m, h):
    w, i = _top(m, torch.softmax(m.router(h), -1, dtype=torch.float64))
    return w / w.sum(-1, keepdim=True), i


def xlora(m, h):
    top, i = torch.topk(m.router(h), m.k, dim=-1)
    return F.softmax(top, dim=-1), i


def xlora_methods(m, h):
    top, i = m.router(h).topk(m.k)
    return top.softmax(-1), i


def unsorted(m, h):
    w, i = torch.topk(F.softmax(m.router(h), dim=-1), m.k, dim=-1, sorted=False)
    return w / w.sum(-1, keepdim=True), i


EXACT = [mixtral_f32_cast, torch_softmax, method_softmax_no_renorm, positional_softmax_topk_without_dim_itruediv,
         torch_div, true_divide_positional_keepdim, method_div, div_inplace_rebound, torch_sum, positive_dims,
         noop_casts, half_gate, float64_softmax, xlora, xlora_methods, unsorted]


IN_PLACE_RENORM = (positional_softmax_topk_without_dim_itruediv, div_inplace_rebound)


@pytest.mark.parametrize("route", EXACT, ids=lambda f: f.__name__)
def test_exact_forms_move_and_keep_eagers_output(route):
    _check(RoutedSite(route), torch.randn(2, 5, N_IN), moved=True, leftovers=route in IN_PLACE_RENORM)




@pytest.mark.parametrize("route", IN_PLACE_RENORM, ids=lambda f: f.__name__)
def test_in_place_renormalization_leaves_no_router_behind(route):
    _check(RoutedSite(route), torch.randn(2, 5, N_IN), moved=True)


@pytest.mark.parametrize("router_bias", [False, True])
@pytest.mark.parametrize("shape", [(7, N_IN), (1, N_IN), (2, 2, 3, N_IN)], ids=["2d", "1token", "4d"])
def test_exact_forms_on_other_token_shapes(shape, router_bias):
    torch.manual_seed(0)
    for route in (torch_softmax, xlora):
        _check(RoutedSite(route, router_bias=router_bias), torch.randn(shape), moved=True)


def test_router_reading_other_rows_of_the_same_count():
    """Tokens routed by another token's representation (same token count, other rows): whatever
    the pass does, the experts are eager's."""
    torch.manual_seed(0)
    flip = lambda m, h: torch_softmax(m, h.flip(1))  # noqa: E731
    _check(RoutedSite(flip), torch.randn(2, 5, N_IN), moved=None)
    transposed = lambda m, h: xlora(m, h.transpose(0, 1))  # noqa: E731  (B == S: broadcasts back)
    _check(RoutedSite(transposed, router_bias=True), torch.randn(3, 3, N_IN), moved=None)


# -- anything else stays in the graph, and the output is still eager's -------------------------

def _renormed(m, h, renorm):
    p = m.router(h).softmax(-1)
    w, i = _top(m, p)
    return renorm(w, p), i


def noise(m, h):  # FuseMoLEPass leaves a site that runs a random op: the router cannot move
    logits = m.router(h)
    w, i = _top(m, F.softmax(logits + 0.5 * torch.randn_like(logits), dim=-1))
    return w / w.sum(-1, keepdim=True), i


def input_dependent_noise(m, h):
    w, i = _top(m, F.softmax(m.router(h) + m.rb * h[..., :1], dim=-1))
    return w / w.sum(-1, keepdim=True), i


def masked(m, h):
    w, i = _top(m, F.softmax(m.router(h).masked_fill(m.mask < 0, float("-inf")), dim=-1))
    return w / w.sum(-1, keepdim=True), i


def bias_after_linear(m, h):
    w, i = _top(m, F.softmax(m.router(h) + m.rb, dim=-1))
    return w / w.sum(-1, keepdim=True), i


def softmax_over_tokens(m, h):  # h [B, S, n]: dim 1 is not the experts'
    w, i = _top(m, F.softmax(m.router(h), dim=1))
    return w / w.sum(-1, keepdim=True), i


def log_softmax(m, h):
    w, i = _top(m, F.log_softmax(m.router(h), dim=-1))
    return w.exp(), i


def smallest(m, h):
    w, i = torch.topk(F.softmax(m.router(h), dim=-1), m.k, dim=-1, largest=False)
    return w / w.sum(-1, keepdim=True), i


def k_from_tensor(m, h):
    w, i = torch.topk(F.softmax(m.router(h), dim=-1), int(m.k_t), dim=-1)
    return w / w.sum(-1, keepdim=True), i


def logits_returned(m, h):
    logits = m.router(h)
    w, i = _top(m, F.softmax(logits, dim=-1))
    return w / w.sum(-1, keepdim=True), i, logits


def probs_in_aux_loss(m, h):
    p = F.softmax(m.router(h), dim=-1)
    w, i = _top(m, p)
    return w / w.sum(-1, keepdim=True), i, (p.mean((0, 1)) ** 2).sum()


def decision_returned(m, h):
    w, i = torch_softmax(m, h)
    return w, i, i


def weights_returned(m, h):
    w, i = torch_softmax(m, h)
    return w, i, w


def per_sequence_router(m, h):  # [B, 1, E]: another token count than the site's x
    w, i = _top(m, F.softmax(m.router(h.mean(1, keepdim=True)), dim=-1))
    return w / w.sum(-1, keepdim=True), i


def div_inplace_statement(m, h):  # the site reads the top-k values the div_ mutated
    w, i = _top(m, F.softmax(m.router(h), dim=-1))
    w.div_(w.sum(-1, keepdim=True))
    return w, i


def floor_div(m, h):  # every weight floors to 0: the site adds nothing
    return _renormed(m, h, lambda w, p: torch.div(w, w.sum(-1, keepdim=True), rounding_mode="floor"))


def trunc_div(m, h):
    return _renormed(m, h, lambda w, p: torch.div(w, w.sum(-1, keepdim=True), rounding_mode="trunc"))


def sum_over_tokens(m, h):
    return _renormed(m, h, lambda w, p: w / w.sum(1, keepdim=True))


def eps_in_renorm(m, h):
    return _renormed(m, h, lambda w, p: w / (w.sum(-1, keepdim=True) + 1e-6))


def renorm_by_all_probs(m, h):
    return _renormed(m, h, lambda w, p: w / p.sum(-1, keepdim=True))


def renorm_by_reciprocal(m, h):
    return _renormed(m, h, lambda w, p: w * (1 / w.sum(-1, keepdim=True)))


def renorm_by_other_sum_dtype(m, h):
    return _renormed(m, h, lambda w, p: w / w.sum(-1, keepdim=True, dtype=torch.float64))


def xlora_over_tokens(m, h):
    top, i = torch.topk(m.router(h), m.k, dim=-1)
    return F.softmax(top, dim=1), i


def xlora_temperature(m, h):
    top, i = torch.topk(m.router(h), m.k, dim=-1)
    return F.softmax(top / 0.5, dim=-1), i


def xlora_of_probs(m, h):  # softmax, top-k, softmax again: neither form
    top, i = _top(m, F.softmax(m.router(h), dim=-1))
    return F.softmax(top, dim=-1), i


def probs_masked_in_place(m, h):
    p = F.softmax(m.router(h), dim=-1)
    p[..., 1] = 0.0
    w, i = _top(m, p)
    return w / w.sum(-1, keepdim=True), i


def logits_scaled_in_place(m, h):
    logits = m.router(h)
    logits.mul_(2.0)
    w, i = _top(m, F.softmax(logits, dim=-1))
    return w / w.sum(-1, keepdim=True), i


LEFT = [noise, input_dependent_noise, masked, bias_after_linear, softmax_over_tokens, log_softmax, smallest, k_from_tensor, logits_returned,
        probs_in_aux_loss, decision_returned, weights_returned, div_inplace_statement, floor_div, trunc_div,
        sum_over_tokens, eps_in_renorm, renorm_by_all_probs, renorm_by_reciprocal, renorm_by_other_sum_dtype,
        xlora_over_tokens, xlora_temperature, xlora_of_probs, probs_masked_in_place, logits_scaled_in_place]


@pytest.mark.parametrize("route", LEFT, ids=lambda f: f.__name__)
def test_other_routing_stays_in_the_graph(route):
    torch.manual_seed(0)
    x = torch.randn(2, 5, N_IN)
    if route is noise:  # the same draws in both runs
        outs, refs, graphs = _compiled_calls(RoutedSite(route), [x, x + 1], seed=1)
        for out, ref in zip(outs, refs):
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert not any(count_calls(gm, routed_site) for gm in graphs)
        return
    # k from a tensor: a graph break between the router and the site (which still fuses)
    _check(RoutedSite(route), x, moved=False, fused=None if route is k_from_tensor else True)


def test_sum_without_keepdim_stays():
    """``w / w.sum(-1)`` broadcasts the sums along the other axis (T == k here): not a renorm."""
    torch.manual_seed(0)
    _check(RoutedSite(lambda m, h: _renormed(m, h, lambda w, p: w / w.sum(-1))), torch.randn(2, N_IN), moved=False)


def test_router_on_another_token_count_stays():
    torch.manual_seed(0)
    _check(RoutedSite(per_sequence_router), torch.randn(2, 5, N_IN), moved=False, fused=None)


class SharedDecisionSites(nn.Module):
    """Two adapted linears reading one router's decision (the decision drives several sites)."""

    def __init__(self, n=N_IN, experts=4, k=2):
        super().__init__()
        self.q, self.v = RoutedSite(torch_softmax, n, 12, experts, k), RoutedSite(torch_softmax, n, 8, experts, k, seed=1)
        self.router, self.k = nn.Linear(n, experts, bias=False), k

    def forward(self, x):
        w, i = torch_softmax(self, x)
        out = []
        for site in (self.q, self.v):
            y = site.base(x)
            for e in range(len(site.A)):
                y = y + ((i == e) * w).sum(-1, keepdim=True) * site.B[e](site.A[e](x)) * 2.0
            out.append(y)
        return tuple(out)


def test_decision_driving_two_sites_stays():
    torch.manual_seed(0)
    m = SharedDecisionSites().eval()
    x = torch.randn(2, 5, N_IN)
    with torch.no_grad():
        ref = m(x)
        out, graphs = compile_and_capture(m, x, options={"inner": "eager"})
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sum(count_calls(gm, fused_site) for gm in graphs) == 2
    assert not any(count_calls(gm, routed_site) for gm in graphs)


def bf16_logits_cast(m, h):
    w, i = _top(m, F.softmax(m.router(h).float(), dim=-1))
    return (w / w.sum(-1, keepdim=True)).to(h.dtype), i


@pytest.mark.parametrize("route,moved", [(mixtral_f32_cast, True), (bf16_logits_cast, False), (xlora, True)],
                         ids=["mixtral", "logits_cast", "xlora"])
def test_bf16_model(route, moved):
    """A bf16 model: the router's softmax in float32 (Mixtral) moves; logits cast before it stay."""
    torch.manual_seed(0)
    m = RoutedSite(route).to(torch.bfloat16)
    _check(m, torch.randn(2, 5, N_IN, dtype=torch.bfloat16), moved=moved, tol=3e-2)


# -- reordering: the op reads the router's input at the site, not where the router was ----------

def router_input_mutated_after_routing(m, h):
    r = h * 1.0
    w, i = torch_softmax(m, r)
    r.mul_(-1.0)  # after the decision: eager's router saw r before this
    return w, i


def site_input_mutated_through_a_view_after_routing(m, h):
    w, i = torch_softmax(m, h)
    h.view(-1)[: N_IN].mul_(-3.0)  # the base and experts read the mutated h, the router read it before
    return w, i


def router_input_row_zeroed_after_routing(m, h):
    r = h + 0.0
    w, i = xlora(m, r)
    r[:, 0] = 0.0
    return w, i




@pytest.mark.parametrize("route", [router_input_mutated_after_routing, site_input_mutated_through_a_view_after_routing,
                                   router_input_row_zeroed_after_routing], ids=lambda f: f.__name__)
def test_router_input_written_in_place_after_routing(route):
    """Any write between the router and the site keeps the router where it is: the op would
    read the router's input after it."""
    torch.manual_seed(0)
    _check(RoutedSite(route), torch.randn(2, 5, N_IN), moved=False)


# -- calls the matcher reads by position, written with keywords: no crash of the pass ----------

def topk_input_keyword(m, h):
    w, i = torch.topk(input=F.softmax(m.router(h), dim=-1), k=m.k, dim=-1)
    return w / w.sum(-1, keepdim=True), i


def sum_input_keyword(m, h):
    return _renormed(m, h, lambda w, p: w / torch.sum(input=w, dim=-1, keepdim=True))




@pytest.mark.parametrize("route", [topk_input_keyword, sum_input_keyword], ids=lambda f: f.__name__)
def test_keyword_arguments_do_not_break_the_pass(route, caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="adafuse_compile"):
        _check(RoutedSite(route), torch.randn(2, 5, N_IN), moved=True)
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert not failed, failed


# -- near-ties end to end: duplicate router rows, rows one ulp apart, gaps near the bound --------

def _compiled_calls(model, xs, seed=None):
    """(compiled outputs, eager outputs, rewritten graphs) for every input, one compilation
    (``seed``: the global RNG seeded before each call of either)."""
    model.eval()
    torch._dynamo.reset()
    try:
        with torch.no_grad(), capture_rewrites() as rewrites:
            fast = torch.compile(model, backend=functools.partial(adafuse_backend, options={"inner": "eager"}))
            fast(xs[0])  # compiles (its probes may draw from the global RNG)
            outs, refs = [], []
            for x in xs:
                for fn, results in ((fast, outs), (model, refs)):
                    if seed is not None:
                        torch.manual_seed(seed)
                    results.append(fn(x))
    finally:
        torch._dynamo.reset()
    return outs, refs, [rw.graph for rw in rewrites]


def _transpose01(x):
    return x.transpose(0, 1)


@pytest.mark.parametrize("tie", ["exact", "ulp", "1e-5"])
@pytest.mark.parametrize("route", [torch_softmax, xlora], ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape,router_bias,prep", [((1, 3, N_IN), False, None), ((2, 2, 3, N_IN), True, None),
                                                     ((24, N_IN), True, None), ((3, 2, N_IN), True, _transpose01)],
                         ids=["3d", "4d-bias", "2d-bias", "noncontiguous-bias"])
def test_near_ties_choose_eagers_experts(route, tie, shape, router_bias, prep):
    """Router rows 0 and 3 tied (or one ulp / ~1e-5 apart): over many random calls the pair often
    straddles the k-th place, where only a decision bitwise eager's gives eager's output (the
    experts differ at O(1)). The router's input in 4-D, or not contiguous, with a bias: eager's
    linear is then a matmul and an add, not one addmm."""
    m = RoutedSite(route, experts=4, k=2, router_bias=router_bias, prep=prep)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        W = m.router.weight
        if tie == "exact":
            W[3] = W[0]
        elif tie == "ulp":
            W[3] = torch.nextafter(W[0], torch.full_like(W[0], math.inf))
        else:
            W[3] = W[0] + 1e-5 * torch.randn(W[0].shape, generator=gen)
        if router_bias:
            m.router.bias[3] = m.router.bias[0]
    xs = [torch.randn(shape, generator=gen) for _ in range(40)]
    outs, refs, graphs = _compiled_calls(m, xs)
    assert sum(count_calls(gm, routed_site) for gm in graphs) == 1
    straddles = 0
    for x, out, ref in zip(xs, outs, refs):
        with torch.no_grad():
            chosen = torch.topk(m.router(x if prep is None else prep(x)), 2, dim=-1).indices
        straddles += int(((chosen == 0).any(-1) ^ (chosen == 3).any(-1)).sum())
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert straddles >= 5, "the tied pair never competed for the k-th place: the test proves nothing"


@pytest.mark.parametrize("route", [torch_softmax, method_softmax_no_renorm, xlora], ids=lambda f: f.__name__)
def test_saturated_softmax_chooses_eagers_output(route):
    """A router so sharp that the softmax underflows to exact zeros: eager's top-k then breaks ties
    among zero probabilities, ours orders by logits (far apart); the experts may differ, but only
    ones of weight 0, so the output must still be eager's."""
    m = RoutedSite(route, experts=4, k=3)
    with torch.no_grad():
        m.router.weight.mul_(400.0)
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(1, 3, N_IN, generator=gen) for _ in range(20)]
    outs, refs, graphs = _compiled_calls(m, xs)
    assert sum(count_calls(gm, routed_site) for gm in graphs) == 1
    zero_ties = 0
    for x, out, ref in zip(xs, outs, refs):
        with torch.no_grad():
            p = F.softmax(m.router(x), dim=-1)
        zero_ties += int(((p == 0).sum(-1) >= 2).sum())
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert zero_ties >= 5, "no token with tied zero probabilities: the test proves nothing"
