"""MoLE adapters written the way real projects write them: the code shapes the passes must match.

:mod:`adafuse_compile.models.layers` writes the math once, cleanly (stacked tensors, gather,
``einsum``). Real projects do not. Each class here imitates one project's idiom around a frozen
``nn.Linear`` (always the attribute ``base_layer``): per-expert ``nn.Linear`` pairs in a
``ModuleList``, ``ModuleDict`` or flat ``lora_A{i}`` attributes; Python loops over experts with
masks, or ``torch.where`` + ``index_add_`` token dispatch; routers as ``nn.Linear`` or a raw
weight used with ``F.linear``; the routing weight applied to the expert's output or input;
forwards that return tuples. All of them compute the same function as
:func:`adafuse_compile.kernels.reference.lora_moe_linear_ref`, given the decision the layer
makes, so a pass that rewrites any of them can be checked against the reference.

Every style shares the constructor ``(base, experts=4, rank=4, alpha=8.0, top_k=2, seed=0)``
(arguments that do not apply are ignored), is initialised with seeded NON-zero weights (PEFT
zeroes B, which would make adapters invisible to tests), and exposes:

- ``canonical()``: ``weight``, ``bias``, ``A [E_A, r, in]``, ``B [E, out, r]``, ``scale``,
  ``router_weight [E, in]`` (``None`` for static LoRA), ``gate`` (a name in
  :data:`~adafuse_compile.models.layers.GATES`, ``None`` for static LoRA) and ``top_k`` (the
  decision width: ``E`` for a dense gate);
- ``decision(x)``: the ``(idx [..., k] int64, g [..., k])`` the layer uses for ``x [..., in]``,
  computed by the same ops as its forward (so ties break identically).

:func:`reference_output` combines both into the reference output; :class:`StyledMLP` puts two
styled sites with a nonlinearity between them into one graph.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.reference import lora_moe_linear_ref
from .layers import Decision

__all__ = [
    "STYLES",
    "HydraLoRAStyleLinear",
    "LoRAMoEStyleLinear",
    "MixLoRAStyleLinear",
    "MoLAStyleLinear",
    "PEFTStyleLoraLinear",
    "StackedEinsumStyleLinear",
    "StyledMLP",
    "XLoRAStyleLinear",
    "reference_output",
]

_INIT_RATIO = 0.2
_ROUTER_SEED_OFFSET = 0x5EED


# --------------------------------------------------------------------------------------------
# Shared plumbing (construction and checks only: no forward below uses it)
# --------------------------------------------------------------------------------------------


def _check_args(base: nn.Module, experts: int, rank: int, top_k: int) -> None:
    if not isinstance(base, nn.Linear):
        raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
    if experts < 1:
        raise ValueError(f"experts must be >= 1, got {experts}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be in [1, experts={experts}], got {top_k}")


def _freeze(base: nn.Linear) -> nn.Linear:
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def _linear(in_f: int, out_f: int, like: nn.Linear, dtype: torch.dtype | None = None) -> nn.Linear:
    w = like.weight
    return nn.Linear(in_f, out_f, bias=False, device=w.device, dtype=dtype or w.dtype)


@torch.no_grad()
def _seed_weights(
    base: nn.Linear,
    rank: int,
    scaling: float,
    seed: int,
    As: list[torch.Tensor],
    Bs: list[torch.Tensor],
    routers: list[torch.Tensor] = (),
) -> None:
    """Seeded non-zero init, the same recipe as :class:`~.layers.MoLELinearBase`.

    ``A ~ N(0, 1/in)``; B sized so the weight change is about ``init_ratio`` times the base
    weight's std; routers ``N(0, 1/in)`` (logits of unit-scale tokens ~ N(0, 1): decisive but
    not degenerate). Routers draw from their own stream so they do not shift the experts.
    """
    in_f = base.in_features
    std_a = 1.0 / math.sqrt(in_f)
    w = base.weight.detach().float()
    w_std = float(w.std()) if w.numel() > 1 else 0.0
    if not math.isfinite(w_std) or w_std == 0.0:
        w_std = std_a
    std_b = _INIT_RATIO * w_std / (scaling * math.sqrt(rank) * std_a)
    gen = torch.Generator().manual_seed(seed)
    for t in As:
        t.copy_(torch.randn(t.shape, generator=gen) * std_a)
    for t in Bs:
        t.copy_(torch.randn(t.shape, generator=gen) * std_b)
    gen = torch.Generator().manual_seed(seed + _ROUTER_SEED_OFFSET)
    for t in routers:
        t.copy_(torch.randn(t.shape, generator=gen) / math.sqrt(in_f))


def _dense_idx(g: torch.Tensor) -> torch.Tensor:
    """Every expert, in order, for a dense gate's weights ``g [..., E]``."""
    return torch.arange(g.shape[-1], device=g.device).expand(g.shape)


def _stack(ws: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([w.detach() for w in ws])


# --------------------------------------------------------------------------------------------
# 1. MoLA
# --------------------------------------------------------------------------------------------


class MoLAStyleLinear(nn.Module):
    """MoLA (Gao et al., layer-wise expert allocation) on PEFT-era code.

    Per-expert ``nn.Linear`` pairs in ``nn.ModuleList``s, an ``nn.Linear`` router, softmax ->
    top-k -> renormalize, and a Python loop over ALL experts where expert ``e``'s per-token
    weight is recovered from the top-k by a mask, ``((topk_idx == e) * topk_weight).sum(-1)``.
    For the passes: the loop unrolls into E dense branches (every expert runs on every token,
    most with weight 0); the decision is hidden in E eq/mul/sum chains, not in an index.
    """

    def __init__(
        self, base: nn.Linear, experts: int = 4, rank: int = 4, alpha: float = 8.0, top_k: int = 2, seed: int = 0
    ) -> None:
        super().__init__()
        _check_args(base, experts, rank, top_k)
        self.base_layer = _freeze(base)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.expert_num = experts
        self.r = rank
        self.lora_alpha = float(alpha)
        self.scaling = float(alpha) / rank
        self.top_k = top_k
        self.lora_router = _linear(self.in_features, experts, base)
        self.lora_A = nn.ModuleList(_linear(self.in_features, rank, base) for _ in range(experts))
        self.lora_B = nn.ModuleList(_linear(rank, self.out_features, base) for _ in range(experts))
        _seed_weights(
            base, rank, self.scaling, seed,
            [m.weight for m in self.lora_A], [m.weight for m in self.lora_B], [self.lora_router.weight],
        )

    def _topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        route_weight = F.softmax(self.lora_router(x), dim=-1, dtype=torch.float32)
        topk_weight, topk_idx = torch.topk(route_weight, self.top_k, dim=-1)
        topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
        return topk_weight.to(x.dtype), topk_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        topk_weight, topk_idx = self._topk(x)
        for e in range(self.expert_num):
            expert_weight = ((topk_idx == e) * topk_weight).sum(dim=-1, keepdim=True)
            result = result + expert_weight * self.lora_B[e](self.lora_A[e](x)) * self.scaling
        return result

    def decision(self, x: torch.Tensor) -> Decision:
        topk_weight, topk_idx = self._topk(x)
        return topk_idx, topk_weight

    def canonical(self) -> dict[str, Any]:
        return {
            "weight": self.base_layer.weight.detach(),
            "bias": None if self.base_layer.bias is None else self.base_layer.bias.detach(),
            "A": _stack([m.weight for m in self.lora_A]),
            "B": _stack([m.weight for m in self.lora_B]),
            "scale": self.scaling,
            "router_weight": self.lora_router.weight.detach(),
            "gate": "softmax_topk",
            "top_k": self.top_k,
        }


# --------------------------------------------------------------------------------------------
# 2. MixLoRA
# --------------------------------------------------------------------------------------------


class _MixLoRAExpert(nn.Module):
    """One MixLoRA expert: a LoRA pair that is called on the tokens dispatched to it."""

    def __init__(self, in_f: int, out_f: int, rank: int, scaling: float, like: nn.Linear) -> None:
        super().__init__()
        self.lora_A = _linear(in_f, rank, like)
        self.lora_B = _linear(rank, out_f, like)
        self.scaling = scaling

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(hidden_states)) * self.scaling


class MixLoRAStyleLinear(nn.Module):
    """MixLoRA (TUDB-Labs) / HF Mixtral sparse dispatch, applied to one linear.

    Flatten tokens, route in float32 (``router_dtype``, even for a bf16 model: the gate weight
    and tokens are cast up), softmax -> top-k -> renormalize, then per expert
    ``idx, top_x = torch.where(expert_mask[e])`` on a one-hot ``[E, k, T]`` mask, gather the
    tokens, run the expert, scale by the routing weight and ``index_add_`` into the output.
    For the passes: ``torch.where(mask)`` is ``nonzero`` (data-dependent shape), so by default
    Dynamo breaks the graph there; with ``capture_dynamic_output_shape_ops=True`` it traces
    unbacked sizes instead. Experts are submodules (``experts_[e].lora_A``), not a flat list.
    """

    def __init__(
        self, base: nn.Linear, experts: int = 4, rank: int = 4, alpha: float = 8.0, top_k: int = 2, seed: int = 0
    ) -> None:
        super().__init__()
        _check_args(base, experts, rank, top_k)
        self.base_layer = _freeze(base)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_experts_ = experts
        self.topk_ = top_k
        self.scaling = float(alpha) / rank
        self.router_dtype_ = torch.float32
        self.gate_ = _linear(self.in_features, experts, base, dtype=self.router_dtype_)
        self.experts_ = nn.ModuleList(
            _MixLoRAExpert(self.in_features, self.out_features, rank, self.scaling, base) for _ in range(experts)
        )
        _seed_weights(
            base, rank, self.scaling, seed,
            [m.lora_A.weight for m in self.experts_], [m.lora_B.weight for m in self.experts_], [self.gate_.weight],
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(hidden_states)
        *lead, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_dim)
        router_logits = F.linear(hidden_states.to(self.router_dtype_), self.gate_.weight.to(self.router_dtype_))
        routing_weights = F.softmax(router_logits, dim=1, dtype=self.router_dtype_)
        routing_weights, selected_experts = torch.topk(routing_weights, self.topk_, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final_hidden_states = torch.zeros(
            (hidden_states.shape[0], self.out_features), dtype=hidden_states.dtype, device=hidden_states.device
        )
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts_).permute(2, 1, 0)
        for expert_idx in range(self.num_experts_):
            expert_layer = self.experts_[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        return result + final_hidden_states.reshape(*lead, self.out_features)

    def decision(self, x: torch.Tensor) -> Decision:
        # The forward's routing, op for op (inlined there as upstream writes it: a helper method
        # would become a separately compiled frame once the forward's loop graph-breaks).
        *lead, hidden_dim = x.shape
        hidden_states = x.reshape(-1, hidden_dim)
        router_logits = F.linear(hidden_states.to(self.router_dtype_), self.gate_.weight.to(self.router_dtype_))
        routing_weights = F.softmax(router_logits, dim=1, dtype=self.router_dtype_)
        routing_weights, selected_experts = torch.topk(routing_weights, self.topk_, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        return selected_experts.reshape(*lead, self.topk_), routing_weights.reshape(*lead, self.topk_)

    def canonical(self) -> dict[str, Any]:
        return {
            "weight": self.base_layer.weight.detach(),
            "bias": None if self.base_layer.bias is None else self.base_layer.bias.detach(),
            "A": _stack([m.lora_A.weight for m in self.experts_]),
            "B": _stack([m.lora_B.weight for m in self.experts_]),
            "scale": self.scaling,
            "router_weight": self.gate_.weight.detach(),
            "gate": "softmax_topk",
            "top_k": self.topk_,
        }


# --------------------------------------------------------------------------------------------
# 3. Stacked experts + einsum
# --------------------------------------------------------------------------------------------


class StackedEinsumStyleLinear(nn.Module):
    """Stacked expert tensors gathered by index, contracted with ``einsum`` (vectorized MoE code).

    ``lora_A [E, r, in]``, ``lora_B [E, out, r]`` and the router are raw ``nn.Parameter``s (the
    router applied with ``F.linear``); top-k on the logits, then softmax over the k
    (X-LoRA/Mixtral order); ``A[idx]`` / ``B[idx]`` gathers and a three-operand einsum that
    folds the gate weights in. For the passes: the closest to the canonical op, but with the
    router as a bare ``get_attr``/parameter input and the gate inside the einsum.
    """

    def __init__(
        self, base: nn.Linear, experts: int = 4, rank: int = 4, alpha: float = 8.0, top_k: int = 2, seed: int = 0
    ) -> None:
        super().__init__()
        _check_args(base, experts, rank, top_k)
        self.base_layer = _freeze(base)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_experts = experts
        self.top_k = top_k
        self.scaling = float(alpha) / rank
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.router_weight = nn.Parameter(torch.empty(experts, self.in_features, **kw))
        self.lora_A = nn.Parameter(torch.empty(experts, rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(experts, self.out_features, rank, **kw))
        _seed_weights(base, rank, self.scaling, seed, [self.lora_A], [self.lora_B], [self.router_weight])

    def _gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.router_weight)
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)
        gates = top_logits.softmax(dim=-1, dtype=torch.float32).to(x.dtype)
        return gates, top_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates, top_idx = self._gate(x)
        h = torch.einsum("...i,...kri->...kr", x, self.lora_A[top_idx])
        delta = torch.einsum("...kr,...kor,...k->...o", h, self.lora_B[top_idx], gates)
        return self.base_layer(x) + self.scaling * delta

    def decision(self, x: torch.Tensor) -> Decision:
        gates, top_idx = self._gate(x)
        return top_idx, gates

    def canonical(self) -> dict[str, Any]:
        return {
            "weight": self.base_layer.weight.detach(),
            "bias": None if self.base_layer.bias is None else self.base_layer.bias.detach(),
            "A": self.lora_A.detach(),
            "B": self.lora_B.detach(),
            "scale": self.scaling,
            "router_weight": self.router_weight.detach(),
            "gate": "topk_softmax",
            "top_k": self.top_k,
        }


# --------------------------------------------------------------------------------------------
# 4. HydraLoRA
# --------------------------------------------------------------------------------------------


class HydraLoRAStyleLinear(nn.Module):
    """HydraLoRA's asymmetric LoRA: ONE shared ``lora_A``, per-expert ``lora_B`` heads.

    A dense softmax router over all B heads (no top-k), ``result += g_e * B_e(A(x)) * scaling``
    in a loop, recomputing ``A(x)`` for every head as the original code does. For the passes:
    ``E_A == 1`` (``idx`` selects only the B), the shared A appears E times (CSE it), and the
    dense gate is ``k == E``.
    """

    def __init__(
        self, base: nn.Linear, experts: int = 4, rank: int = 4, alpha: float = 8.0, top_k: int = 2, seed: int = 0
    ) -> None:
        super().__init__()
        _check_args(base, experts, rank, min(top_k, experts))
        self.base_layer = _freeze(base)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_num = experts
        self.scaling = float(alpha) / rank
        self.lora_A = _linear(self.in_features, rank, base)
        self.lora_B = nn.ModuleList(_linear(rank, self.out_features, base) for _ in range(experts))
        self.lora_route = _linear(self.in_features, experts, base)
        self.lora_dropout = nn.Identity()
        _seed_weights(
            base, rank, self.scaling, seed, [self.lora_A.weight], [m.weight for m in self.lora_B], [self.lora_route.weight]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        route_weight = F.softmax(self.lora_route(x), dim=-1, dtype=torch.float32).to(result.dtype)
        for i in range(self.lora_num):
            result = result + torch.unsqueeze(route_weight[..., i], -1) * self.lora_B[i](
                self.lora_A(self.lora_dropout(x))
            ) * self.scaling
        return result

    def decision(self, x: torch.Tensor) -> Decision:
        g = F.softmax(self.lora_route(x), dim=-1, dtype=torch.float32).to(x.dtype)
        return _dense_idx(g), g

    def canonical(self) -> dict[str, Any]:
        return {
            "weight": self.base_layer.weight.detach(),
            "bias": None if self.base_layer.bias is None else self.base_layer.bias.detach(),
            "A": self.lora_A.weight.detach().unsqueeze(0),
            "B": _stack([m.weight for m in self.lora_B]),
            "scale": self.scaling,
            "router_weight": self.lora_route.weight.detach(),
            "gate": "dense",
            "top_k": self.lora_num,
        }


# --------------------------------------------------------------------------------------------
# 5. X-LoRA
# --------------------------------------------------------------------------------------------


class XLoRAStyleLinear(nn.Module):
    """X-LoRA (PEFT's ``XLoraLayer``): named adapters in ``ModuleDict``s, scalings on the INPUT.

    A classifier gives per-token scalings over the adapters; top-k keeps k of them (a bool mask
    built with ``scatter_``) and softmax runs over the kept ones; then for each adapter
    ``result += B(A(dropout(x * s_n))) * scaling``: the routing weight multiplies the expert's
    input (equal to weighting its output, the expert being linear). Upstream's softmax over
    ``scalings[nonzero_mask]`` is data-dependent (and mixes tokens); this keeps the same
    top-k->softmax semantics with a fixed-shape ``-inf`` mask. For the passes: the gate weight
    sits before ``lora_A``, adapters are found by ModuleDict key, results accumulate in place.
    """

    def __init__(
        self, base: nn.Linear, experts: int = 4, rank: int = 4, alpha: float = 8.0, top_k: int = 2, seed: int = 0
    ) -> None:
        super().__init__()
        _check_args(base, experts, rank, top_k)
        self.base_layer = _freeze(base)
        self.in_features, self.out_features = base.in_features, base.out_features
        names = [f"adapter_{i}" for i in range(experts)]
        self.lora_A = nn.ModuleDict({n: _linear(self.in_features, rank, base) for n in names})
        self.lora_B = nn.ModuleDict({n: _linear(rank, self.out_features, base) for n in names})
        self.lora_dropout = nn.ModuleDict({n: nn.Identity() for n in names})
        self.scaling = {n: float(alpha) / rank for n in names}
        self._active_adapter = names
        self.top_k_lora = top_k
        self.global_scaling_weight = 1.0
        self.internal_xlora_classifier = _linear(self.in_features, experts, base)
        _seed_weights(
            base, rank, float(alpha) / rank, seed,
            [self.lora_A[n].weight for n in names], [self.lora_B[n].weight for n in names],
            [self.internal_xlora_classifier.weight],
        )

    @property
    def active_adapters(self) -> list[str]:
        return self._active_adapter

    def get_maybe_topk_scalings(self, scalings: torch.Tensor) -> torch.Tensor:
        _, topk_indices = torch.topk(scalings, k=self.top_k_lora, dim=-1)
        mask = torch.zeros_like(scalings, dtype=torch.bool)
        mask.scatter_(-1, topk_indices, True)
        scalings = scalings.masked_fill(~mask, float("-inf"))
        return torch.softmax(scalings, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xlora_scalings = self.get_maybe_topk_scalings(self.internal_xlora_classifier(x))
        result = self.base_layer(x)
        for adapter_n, active_adapter in enumerate(self.active_adapters):
            lora_A = self.lora_A[active_adapter]
            lora_B = self.lora_B[active_adapter]
            dropout = self.lora_dropout[active_adapter]
            scaling = self.scaling[active_adapter]
            x_mod = x * xlora_scalings[..., adapter_n].unsqueeze(-1)
            result += lora_B(lora_A(dropout(x_mod))) * scaling * self.global_scaling_weight
        return result

    def decision(self, x: torch.Tensor) -> Decision:
        scalings = self.internal_xlora_classifier(x)
        _, topk_indices = torch.topk(scalings, k=self.top_k_lora, dim=-1)
        return topk_indices, self.get_maybe_topk_scalings(scalings).gather(-1, topk_indices)

    def canonical(self) -> dict[str, Any]:
        names = self.active_adapters
        return {
            "weight": self.base_layer.weight.detach(),
            "bias": None if self.base_layer.bias is None else self.base_layer.bias.detach(),
            "A": _stack([self.lora_A[n].weight for n in names]),
            "B": _stack([self.lora_B[n].weight for n in names]),
            "scale": self.scaling[names[0]] * self.global_scaling_weight,
            "router_weight": self.internal_xlora_classifier.weight.detach(),
            "gate": "topk_softmax",
            "top_k": self.top_k_lora,
        }


# --------------------------------------------------------------------------------------------
# 6. LoRAMoE
# --------------------------------------------------------------------------------------------


class LoRAMoEStyleLinear(nn.Module):
    """LoRAMoE (Dou et al.): dense softmax over experts, forward returns a TUPLE.

    Experts are flat attributes ``lora_A{i}`` / ``lora_B{i}`` reached with ``getattr``, the
    router ``lora_route`` is dense (every expert, no top-k), and forward returns
    ``(output, router_logits)`` (upstream returns an auxiliary-loss tensor second; a wrapper
    takes ``[0]``). For the passes: the site's output is a tuple element, and the router's
    logits escape the site, so the router cannot be deleted when the site is fused.
    """

    def __init__(
        self, base: nn.Linear, experts: int = 4, rank: int = 4, alpha: float = 8.0, top_k: int = 2, seed: int = 0
    ) -> None:
        super().__init__()
        _check_args(base, experts, rank, min(top_k, experts))
        self.base_layer = _freeze(base)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_num = experts
        self.scaling = float(alpha) / rank
        for i in range(experts):
            setattr(self, f"lora_A{i}", _linear(self.in_features, rank, base))
            setattr(self, f"lora_B{i}", _linear(rank, self.out_features, base))
        self.lora_route = _linear(self.in_features, experts, base)
        self.lora_dropout = nn.Identity()
        _seed_weights(
            base, rank, self.scaling, seed,
            [getattr(self, f"lora_A{i}").weight for i in range(experts)],
            [getattr(self, f"lora_B{i}").weight for i in range(experts)],
            [self.lora_route.weight],
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        previous_dtype = x.dtype
        result = self.base_layer(x)
        router_logits = self.lora_route(x)
        route_weight = F.softmax(router_logits, dim=-1, dtype=torch.float32).to(result.dtype)
        for i in range(self.lora_num):
            result = result + torch.unsqueeze(route_weight[..., i], -1) * getattr(self, f"lora_B{i}")(
                getattr(self, f"lora_A{i}")(self.lora_dropout(x))
            ) * self.scaling
        return result.to(previous_dtype), router_logits

    def decision(self, x: torch.Tensor) -> Decision:
        g = F.softmax(self.lora_route(x), dim=-1, dtype=torch.float32).to(x.dtype)
        return _dense_idx(g), g

    def canonical(self) -> dict[str, Any]:
        return {
            "weight": self.base_layer.weight.detach(),
            "bias": None if self.base_layer.bias is None else self.base_layer.bias.detach(),
            "A": _stack([getattr(self, f"lora_A{i}").weight for i in range(self.lora_num)]),
            "B": _stack([getattr(self, f"lora_B{i}").weight for i in range(self.lora_num)]),
            "scale": self.scaling,
            "router_weight": self.lora_route.weight.detach(),
            "gate": "dense",
            "top_k": self.lora_num,
        }


# --------------------------------------------------------------------------------------------
# 7. PEFT static LoRA
# --------------------------------------------------------------------------------------------


class PEFTStyleLoraLinear(nn.Module):
    """PEFT's ``lora.Linear`` (``LoraLayer``): one static adapter, no router.

    ``ModuleDict``s keyed by adapter name (``lora_A["default"]``, ``lora_B["default"]``,
    ``lora_dropout["default"]`` = ``nn.Dropout(p)`` or ``nn.Identity``), a plain-dict
    ``scaling``, and ``result = result + lora_B(lora_A(dropout(x))) * scaling`` per active
    adapter. ``experts`` and ``top_k`` are ignored (one adapter). For the passes: the site to
    FOLD into the base weight (in eval mode; dropout appears as an eval-mode no-op).
    """

    def __init__(
        self,
        base: nn.Linear,
        experts: int = 4,
        rank: int = 4,
        alpha: float = 8.0,
        top_k: int = 2,
        seed: int = 0,
        *,
        lora_dropout: float = 0.0,
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        _check_args(base, 1, rank, 1)
        self.base_layer = _freeze(base)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.merged = False
        self.update_layer(adapter_name, rank, alpha, lora_dropout)
        self._active_adapter = [adapter_name]
        _seed_weights(base, rank, self.scaling[adapter_name], seed, [self.lora_A[adapter_name].weight],
                      [self.lora_B[adapter_name].weight])

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float) -> None:
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = float(lora_alpha)
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.lora_A[adapter_name] = _linear(self.in_features, r, self.base_layer)
        self.lora_B[adapter_name] = _linear(r, self.out_features, self.base_layer)
        self.scaling[adapter_name] = float(lora_alpha) / r

    @property
    def active_adapters(self) -> list[str]:
        return self._active_adapter

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        torch_result_dtype = result.dtype
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A.keys():  # noqa: SIM118 (PEFT's spelling)
                continue
            lora_A = self.lora_A[active_adapter]
            lora_B = self.lora_B[active_adapter]
            dropout = self.lora_dropout[active_adapter]
            scaling = self.scaling[active_adapter]
            x = x.to(lora_A.weight.dtype)
            result = result + lora_B(lora_A(dropout(x))) * scaling
        return result.to(torch_result_dtype)

    def decision(self, x: torch.Tensor) -> Decision:
        lead = x.shape[:-1]
        return (
            torch.zeros(*lead, 1, dtype=torch.int64, device=x.device),
            torch.ones(*lead, 1, dtype=x.dtype, device=x.device),
        )

    def canonical(self) -> dict[str, Any]:
        name = self.active_adapters[0]
        return {
            "weight": self.base_layer.weight.detach(),
            "bias": None if self.base_layer.bias is None else self.base_layer.bias.detach(),
            "A": self.lora_A[name].weight.detach().unsqueeze(0),
            "B": self.lora_B[name].weight.detach().unsqueeze(0),
            "scale": self.scaling[name],
            "router_weight": None,
            "gate": None,
            "top_k": 1,
        }


# --------------------------------------------------------------------------------------------
# Registry, reference, two-site model
# --------------------------------------------------------------------------------------------

STYLES: dict[str, type[nn.Module]] = {
    "mola": MoLAStyleLinear,
    "mixlora": MixLoRAStyleLinear,
    "stacked": StackedEinsumStyleLinear,
    "hydralora": HydraLoRAStyleLinear,
    "xlora": XLoRAStyleLinear,
    "loramoe": LoRAMoEStyleLinear,
    "peft": PEFTStyleLoraLinear,
}
"""Style name -> class; all share ``(base, experts=4, rank=4, alpha=8.0, top_k=2, seed=0)``."""


def reference_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``layer(x)`` must compute (its first element for tuple-returning styles), by
    :func:`lora_moe_linear_ref` on the layer's :meth:`canonical` weights and :meth:`decision`.
    ``x`` may be ``[..., in]``; the result is ``[..., out]`` in ``x``'s dtype."""
    c = layer.canonical()
    idx, g = layer.decision(x)
    lead = x.shape[:-1]
    xt = x.reshape(-1, x.shape[-1])
    k = idx.shape[-1]
    y = lora_moe_linear_ref(
        xt, c["weight"], c["bias"], c["A"], c["B"], idx.reshape(-1, k), g.reshape(-1, k), c["scale"]
    )
    return y.reshape(*lead, y.shape[-1])


def _seeded_base(in_f: int, out_f: int, gen: torch.Generator) -> nn.Linear:
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f))
        lin.bias.copy_(torch.randn(out_f, generator=gen) * 0.1)
    return lin


class StyledMLP(nn.Module):
    """Two styled sites (``fc1``, ``fc2``) with SiLU between: two adapter sites in one graph.

    ``style`` is a :data:`STYLES` name or class; ``**kw`` goes to both sites (``experts``,
    ``rank``, ``alpha``, ``top_k``). Tuple-returning sites (LoRAMoE) are unwrapped with ``[0]``
    as a model built on them does.
    """

    def __init__(
        self, style: str | type[nn.Module], in_f: int = 48, hidden: int = 40, out_f: int = 24, seed: int = 0, **kw: Any
    ) -> None:
        super().__init__()
        if isinstance(style, str):
            if style not in STYLES:
                raise ValueError(f"unknown style {style!r}; expected one of {sorted(STYLES)}")
            style = STYLES[style]
        gen = torch.Generator().manual_seed(seed)
        self.fc1 = style(_seeded_base(in_f, hidden, gen), seed=seed, **kw)
        self.act = nn.SiLU()
        self.fc2 = style(_seeded_base(hidden, out_f, gen), seed=seed + 1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if isinstance(h, tuple):
            h = h[0]
        y = self.fc2(self.act(h))
        if isinstance(y, tuple):
            y = y[0]
        return y

    def sites(self) -> dict[str, nn.Module]:
        """The adapter sites by attribute name."""
        return {"fc1": self.fc1, "fc2": self.fc2}

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The output by the kernel reference, site by site."""
        return reference_output(self.fc2, self.act(reference_output(self.fc1, x)))
