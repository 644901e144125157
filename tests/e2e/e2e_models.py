"""Tiny adapter modules written the way users write them, for the end-to-end soundness tests.

:class:`MoLESite` is one Mixture-of-LoRA-Experts site (a frozen base linear plus E LoRA
experts picked by the site's own router) with switches for the variations a compiler must not
mistake for the canonical form: a nonlinearity between A and B, a learnable scale, a permuted
or duplicated expert table, an extra nonlinear term, dropout, an adapter dtype other than the
base's, stacked or per-expert layout, and three gates. :class:`StaticLoRA` is PEFT's
``base(x) + lora_B(lora_A(dropout(x))) * scaling``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

GATES = ("softmax_topk", "topk_softmax", "dense")
BETWEEN = ("none", "relu", "clamp", "silu")
SCALES = ("float", "param", "vector")
LAYOUTS = ("stacked", "list")


@dataclasses.dataclass(frozen=True)
class SiteSpec:
    d_in: int = 32
    d_out: int = 24
    experts: int = 4
    rank: int = 4
    top_k: int = 2
    layout: str = "stacked"  # "stacked": A [E, r, in], B [E, out, r]; "list": nn.Linear per expert
    gate: str = "softmax_topk"  # softmax->topk->renormalize, topk->softmax, or dense softmax
    between: str = "none"  # activation applied to x A^T before B
    clamp: float = 5.0  # bound of the "clamp" activation (never reached by N(0, 1) inputs)
    scale: str = "float"  # a Python float, a learnable scalar Parameter, or a per-expert Parameter
    scale_value: float = 2.0
    perm: tuple[int, ...] | None = None  # expert e uses B of expert perm[e] (a permuted/duplicated table)
    extra: bool = False  # adds 0.1 * tanh(C x): a term no LoRA form reproduces
    dropout: float = 0.0
    adapter_dtype: torch.dtype | None = None  # None: the base's dtype
    bias: bool = True


def _act(h: torch.Tensor, spec: SiteSpec) -> torch.Tensor:
    if spec.between == "relu":
        return torch.relu(h)
    if spec.between == "clamp":
        return torch.clamp(h, -spec.clamp, spec.clamp)
    if spec.between == "silu":
        return F.silu(h)
    return h


class MoLESite(nn.Module):
    """``base(x) + s * sum_k g_k act(x A_{e_k}^T) B_{perm[e_k]}^T`` (+ the switches of ``spec``)."""

    def __init__(self, spec: SiteSpec = SiteSpec(), seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.spec = spec
        E, r, d_in, d_out = spec.experts, spec.rank, spec.d_in, spec.d_out
        ad = spec.adapter_dtype or dtype
        self.base = nn.Linear(d_in, d_out, bias=spec.bias, dtype=dtype).requires_grad_(False)
        self.router = nn.Linear(d_in, E, bias=False)  # float32, fed x.float() (MixLoRA's router_dtype)
        if spec.layout == "stacked":
            self.lora_A = nn.Parameter(torch.empty(E, r, d_in, dtype=ad))
            self.lora_B = nn.Parameter(torch.empty(E, d_out, r, dtype=ad))
        else:
            self.lora_A = nn.ModuleList(nn.Linear(d_in, r, bias=False, dtype=ad) for _ in range(E))
            self.lora_B = nn.ModuleList(nn.Linear(r, d_out, bias=False, dtype=ad) for _ in range(E))
        if spec.scale == "param":
            self.s = nn.Parameter(torch.tensor(spec.scale_value, dtype=ad))
        elif spec.scale == "vector":
            self.s = nn.Parameter(torch.ones(E, dtype=ad))
        if spec.extra:
            self.extra = nn.Linear(d_in, d_out, bias=False, dtype=dtype)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()  # as PEFT does
        randomize_(self, seed)
        if spec.scale != "float":  # the scales start where users initialise them: scale_value, or ones
            with torch.no_grad():
                self.s.fill_(spec.scale_value if spec.scale == "param" else 1.0)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx, g)`` each ``[T, k]`` (``k = E`` for the dense gate); g is float32."""
        logits = self.router(x.float()).reshape(-1, self.spec.experts)
        return route(logits, self.spec.gate, self.spec.top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        idx, g = self.route(x)
        y = self.base(x)
        ad = spec.adapter_dtype or x.dtype
        xt = self.dropout(x).to(ad).reshape(-1, spec.d_in)
        if spec.layout == "stacked":
            h = _act(torch.einsum("ti,tkri->tkr", xt, self.lora_A[idx]), spec)
            w = g.to(ad)
            if spec.scale == "vector":
                w = w * self.s[idx]
            b_idx = torch.tensor(spec.perm, device=idx.device)[idx] if spec.perm else idx
            delta = torch.einsum("tkr,tkor->to", h * w.unsqueeze(-1), self.lora_B[b_idx])
        else:
            delta = 0
            perm = spec.perm or range(spec.experts)
            for e in range(spec.experts):
                w = ((idx == e) * g).sum(dim=-1, keepdim=True).to(ad)
                if spec.scale == "vector":
                    w = w * self.s[e]
                delta = delta + w * self.lora_B[perm[e]](_act(self.lora_A[e](xt), spec))
        if spec.scale != "vector":
            delta = delta * (spec.scale_value if spec.scale == "float" else self.s)
        out = y + delta.to(y.dtype).reshape(y.shape)
        if spec.extra:
            out = out + 0.1 * torch.tanh(self.extra(x))
        return out


def route(logits: torch.Tensor, gate: str, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if gate == "softmax_topk":
        g, idx = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
        return idx, g / g.sum(dim=-1, keepdim=True)
    if gate == "topk_softmax":
        top, idx = torch.topk(logits, top_k, dim=-1)
        return idx, torch.softmax(top, dim=-1)
    g = torch.softmax(logits, dim=-1)
    return torch.arange(logits.shape[-1], device=logits.device).expand(g.shape), g


class StaticLoRA(nn.Module):
    """PEFT's LoRA: ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` (one adapter, no router)."""

    def __init__(self, d_in: int = 32, d_out: int = 24, rank: int = 4, scaling: float = 2.0,
                 dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, d_out, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = scaling
        randomize_(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, *, via_data: bool = False, scale: float = 1.0) -> None:
    """Give every parameter fresh N(0, 1/fan_in) values (B at LoRA scale), seeded.

    Scalar and per-expert scales get values in [0.5, 3). ``via_data=True`` writes through
    ``p.data.copy_`` (no version bump, the way many training loops and optimizers write),
    else through ``p.copy_`` under no_grad.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() == 0 or name == "s":
            new = 0.5 + 2.5 * torch.rand(p.shape, generator=gen)
        else:
            fan_in = p.shape[-1]
            new = torch.randn(p.shape, generator=gen) * (scale / math.sqrt(fan_in))
        (p.data if via_data else p).copy_(new.to(p.dtype))


@torch.no_grad()
def degenerate_(model: MoLESite, init: str) -> None:
    """Experts as early training or upcycling leaves them, where a permuted expert table is invisible:
    ``"zeros"`` (B = 0), ``"tiny"`` (B ~ 1e-6), ``"identical"`` (every expert a copy of expert 0)."""
    stacked = model.spec.layout == "stacked"
    A = [model.lora_A] if stacked else [m.weight for m in model.lora_A]
    B = [model.lora_B] if stacked else [m.weight for m in model.lora_B]
    if init == "zeros":
        for b in B:
            b.zero_()
    elif init == "tiny":
        for b in B:
            b.mul_(1e-6)
    elif init == "identical":
        for t in (A, B):
            if stacked:
                t[0].copy_(t[0][:1].expand_as(t[0]))
            else:
                for m in t[1:]:
                    m.copy_(t[0])
    else:
        raise ValueError(f"unknown init {init!r}")


def inputs(spec_or_dim, tokens: int, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    d_in = spec_or_dim.d_in if isinstance(spec_or_dim, SiteSpec) else spec_or_dim
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, d_in, generator=gen) * scale).to(dtype)


def compile_eager_inner(model: nn.Module, **kwargs) -> nn.Module:
    """The adafuse backend with the eager inner compiler: the passes are under test, not Inductor."""
    import adafuse_compile

    return adafuse_compile.compile(model, inner="eager", **kwargs)


def assert_matches_eager(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4, msg: str = "") -> None:
    """Compiled equals eager up to ``rel`` of the output's scale (fp32: 1e-4; bf16: 2e-2)."""
    mag = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), atol=rel * mag, rtol=rel,
                               msg=(lambda m: f"{msg}\n{m}") if msg else None)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles afresh and leaves no compiled frames behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
