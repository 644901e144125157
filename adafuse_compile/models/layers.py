"""Reference Mixture-of-LoRA-Experts (MoLE) layers: what the compiler's passes must recognize.

Written the clear way users write them (stacked expert tensors, gather by the chosen indices,
``einsum``), with fixed-shape routing so that Dynamo traces them without graph breaks. Shapes
follow :mod:`adafuse_compile.kernels.reference`: ``lora_A [E_A, r, in]`` (``E_A`` is ``E``, or
``1`` for HydraLoRA's shared A), ``lora_B [E, out, r]``, ``idx [..., k]`` int64 and
``g [..., k]`` float32, ``scaling = alpha / r``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GATES = ("softmax_topk", "topk_softmax", "dense", "top_p")
"""Gate variants: softmax->top-k->renormalize (MixLoRA, MoLA); top-k->softmax (X-LoRA,
Mixtral); dense softmax over all experts (LoRAMoE, HydraLoRA); top-p with an entropy threshold,
not renormalized (DynMoLE-like)."""

Decision = tuple[torch.Tensor, torch.Tensor]


def _check_gate_args(gate: str, experts: int, top_k: int, top_p: float) -> None:
    """Fail early with a readable message instead of an index error deep inside a forward."""
    if gate not in GATES:
        raise ValueError(f"unknown gate {gate!r}; expected one of {GATES}")
    if experts < 1:
        raise ValueError(f"experts must be >= 1, got {experts}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be in [1, experts={experts}], got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def gate_k(gate: str, experts: int, top_k: int) -> int:
    """Width of a decision: ``experts`` for the dense gate, else ``top_k`` (shapes stay fixed)."""
    return experts if gate == "dense" else top_k


def route(
    logits: torch.Tensor,
    gate: str,
    top_k: int,
    top_p: float = 0.75,
    entropy_threshold: float | None = None,
) -> Decision:
    """Turn router logits ``[..., E]`` into a fixed-shape decision ``(idx, g)``, each ``[..., k]``.

    Routing runs in float32 whatever the logits' dtype (MixLoRA's ``router_dtype``): top-k
    choices made in bf16 flip on ties and rounding, which would make results dtype-dependent.
    Shapes never depend on the data (``k`` is ``top_k``, or ``E`` for ``"dense"``; top-p drops
    experts by giving them weight 0), so Dynamo traces every variant without graph breaks.

    ``top_p`` and ``entropy_threshold`` (Shannon entropy of the softmax, in nats; ``None``
    disables it) are used by the ``"top_p"`` gate only: it keeps the smallest prefix of the
    sorted top-k whose cumulative probability reaches ``top_p`` (always at least one expert),
    except that tokens whose router entropy exceeds the threshold keep all k. Its weights are
    the raw softmax probabilities, NOT renormalized.
    """
    experts = logits.shape[-1]
    _check_gate_args(gate, experts, top_k, top_p)
    logits = logits.float()
    if gate == "softmax_topk":
        probs = torch.softmax(logits, dim=-1)
        g, idx = torch.topk(probs, top_k, dim=-1)
        g = g / g.sum(dim=-1, keepdim=True)
    elif gate == "topk_softmax":
        top, idx = torch.topk(logits, top_k, dim=-1)
        g = torch.softmax(top, dim=-1)
    elif gate == "dense":
        g = torch.softmax(logits, dim=-1)
        idx = torch.arange(experts, device=logits.device).expand(g.shape)
    else:  # top_p
        probs = torch.softmax(logits, dim=-1)
        vals, idx = torch.topk(probs, top_k, dim=-1, sorted=True)
        before = torch.cumsum(vals, dim=-1) - vals  # mass of the experts ranked above
        keep = before < top_p  # first expert: before == 0 < top_p, so always kept
        if entropy_threshold is not None:
            entropy = torch.special.entr(probs).sum(dim=-1, keepdim=True)
            keep = keep | (entropy > entropy_threshold)
        g = torch.where(keep, vals, torch.zeros_like(vals))
    return idx.to(torch.int64), g


class MoLELinearBase(nn.Module):
    """The experts of one site, wrapped around a frozen base linear (PEFT's ``base_layer``).

    Subclasses differ only in where the routing decision comes from; the expert math lives in
    :meth:`lora_delta` so both variants compute exactly the same thing given a decision.
    """

    def __init__(
        self,
        base: nn.Linear,
        experts: int = 8,
        rank: int = 8,
        alpha: float = 16.0,
        top_k: int = 2,
        gate: str = "softmax_topk",
        shared_A: bool = False,
        top_p: float = 0.75,
        entropy_threshold: float | None = None,
        seed: int = 0,
        init_ratio: float = 0.2,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        _check_gate_args(gate, experts, top_k, top_p)
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.experts = experts
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = float(alpha) / rank
        self.top_k = top_k
        self.k = gate_k(gate, experts, top_k)
        self.gate = gate
        self.shared_A = shared_A
        self.top_p = float(top_p)
        self.entropy_threshold = entropy_threshold
        w = base.weight
        e_a = 1 if shared_A else experts
        self.lora_A = nn.Parameter(torch.empty(e_a, rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.empty(experts, self.out_features, rank, dtype=w.dtype, device=w.device))
        self._init_experts(seed, init_ratio)

    @torch.no_grad()
    def _init_experts(self, seed: int, init_ratio: float) -> None:
        """Seeded, non-zero init (PEFT zeroes B, which would make adapters invisible in tests).

        A ~ N(0, 1/in) keeps ``x A^T`` at the scale of ``x``; B is sized so that the effective
        weight change ``scaling * sum_k g_k B_k A_k`` has entries about ``init_ratio`` times the
        base weight's std: a clearly visible change that does not blow up a deep model.
        """
        gen = torch.Generator().manual_seed(seed)
        std_a = 1.0 / math.sqrt(self.in_features)
        w_std = float(self.base_layer.weight.detach().float().std()) if self.base_layer.weight.numel() > 1 else 0.0
        if not math.isfinite(w_std) or w_std == 0.0:
            w_std = 1.0 / math.sqrt(self.in_features)
        std_b = init_ratio * w_std / (self.scaling * math.sqrt(self.rank) * std_a)
        a = torch.randn(self.lora_A.shape, generator=gen) * std_a
        b = torch.randn(self.lora_B.shape, generator=gen) * std_b
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)

    def _flat_decision(self, x: torch.Tensor, idx: torch.Tensor, g: torch.Tensor) -> Decision:
        """Decision reshaped to ``[T, k]`` for ``x [..., in]``, with a clear error on mismatch."""
        if idx.shape != g.shape or idx.shape[:-1] != x.shape[:-1] or idx.shape[-1] != self.k:
            raise ValueError(
                f"decision shapes idx {tuple(idx.shape)} / g {tuple(g.shape)} do not fit input "
                f"{tuple(x.shape)} with k={self.k}: expected {tuple(x.shape[:-1]) + (self.k,)}"
            )
        return idx.reshape(-1, self.k), g.reshape(-1, self.k)

    def lora_delta(self, x: torch.Tensor, idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``scaling * sum_k g_k (x A_{idx_k}^T) B_{idx_k}^T`` for ``x [..., in]``.

        Gathers the chosen experts' stacked weights and contracts with ``einsum``: no Python
        loop over experts, no data-dependent shapes, so it traces as one graph.
        """
        lead = x.shape[:-1]
        idx, g = self._flat_decision(x, idx, g)
        xt = x.reshape(-1, self.in_features)
        if self.lora_A.shape[0] == 1:  # HydraLoRA: one A, idx selects only the B
            h = (xt @ self.lora_A[0].T).unsqueeze(1)  # [T, 1, r], same for every k
        else:
            h = torch.einsum("ti,tkri->tkr", xt, self.lora_A[idx])  # [T, k, r]
        h = h * g.to(x.dtype).unsqueeze(-1)  # [T, k, r]
        delta = torch.einsum("tkr,tkor->to", h, self.lora_B[idx])  # [T, out]
        return (self.scaling * delta).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"experts={self.experts}",
            f"rank={self.rank}",
            f"gate={self.gate}",
            f"top_k={self.top_k}",
            f"scaling={self.scaling:g}",
        ]
        if self.gate == "top_p":
            parts.append(f"top_p={self.top_p:g}, entropy_threshold={self.entropy_threshold}")
        if self.shared_A:
            parts.append("shared_A=True")
        return ", ".join(parts)


class LoRAMoELinear(MoLELinearBase):
    """A frozen linear plus E LoRA experts chosen per token by this layer's own router.

    ``y = base(x) + scaling * sum_k g_k (x A_{idx_k}^T) B_{idx_k}^T`` with ``(idx, g)`` from
    :func:`route` on ``router(x)``. This is the per-layer routing whose cost AdaFuse removes:
    every adapted linear runs its own router and expert matmuls.
    """

    def __init__(
        self,
        base: nn.Linear,
        experts: int = 8,
        rank: int = 8,
        alpha: float = 16.0,
        top_k: int = 2,
        gate: str = "softmax_topk",
        shared_A: bool = False,
        top_p: float = 0.75,
        entropy_threshold: float | None = None,
        seed: int = 0,
        init_ratio: float = 0.2,
        router_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            base, experts, rank, alpha, top_k, gate, shared_A, top_p, entropy_threshold, seed, init_ratio
        )
        self.router_dtype = router_dtype
        # Kept in router_dtype like MixLoRA's gate; forward casts anyway, so a later
        # model.to(bfloat16) still routes in float32 (on the rounded weight).
        self.router = nn.Linear(self.in_features, self.experts, bias=False, device=base.weight.device, dtype=router_dtype)
        gen = torch.Generator().manual_seed(seed + 0x5EED)  # independent of the experts' stream
        with torch.no_grad():
            self.router.weight.copy_(torch.randn(self.router.weight.shape, generator=gen) / math.sqrt(self.in_features))

    def route(self, x: torch.Tensor) -> Decision:
        """This layer's decision for ``x [..., in]``: ``(idx, g)`` each ``[..., k]``, g float32."""
        rd = self.router_dtype
        logits = F.linear(x.to(rd), self.router.weight.to(rd))
        return route(logits, self.gate, self.top_k, self.top_p, self.entropy_threshold)

    def forward(self, x: torch.Tensor, decision: Decision | None = None) -> torch.Tensor:
        """``decision`` overrides the router (tests, or hoisting a shared decision by hand)."""
        idx, g = self.route(x) if decision is None else decision
        return self.base_layer(x) + self.lora_delta(x, idx, g)


class PreGate(nn.Module):
    """AdaFuse's token-level gate: one router, one decision per token, used by every site.

    Calling it on the token representation ``h [..., hidden]`` computes ``(idx, g)`` and stores
    it as :attr:`decision`, where every :class:`PreGatedLoRAMoELinear` linked to it reads it.
    The input is RMS-normalized (no weight) before the router: raw token embeddings have a
    small, arbitrary scale, which would make a fresh router's softmax nearly uniform.
    """

    def __init__(
        self,
        in_features: int,
        experts: int = 8,
        top_k: int = 2,
        gate: str = "softmax_topk",
        top_p: float = 0.75,
        entropy_threshold: float | None = None,
        normalize: bool = True,
        router_dtype: torch.dtype = torch.float32,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_gate_args(gate, experts, top_k, top_p)
        self.in_features = in_features
        self.experts = experts
        self.top_k = top_k
        self.k = gate_k(gate, experts, top_k)
        self.gate = gate
        self.top_p = float(top_p)
        self.entropy_threshold = entropy_threshold
        self.normalize = normalize
        self.router_dtype = router_dtype
        self.router = nn.Linear(in_features, experts, bias=False, device=device, dtype=router_dtype)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.router.weight.copy_(torch.randn(self.router.weight.shape, generator=gen) / math.sqrt(in_features))
        self.decision: Decision | None = None

    def decide(self, h: torch.Tensor) -> Decision:
        """The decision for ``h [..., in]`` without storing it (pure; for tests and passes)."""
        rd = self.router_dtype
        h = h.to(rd)
        if self.normalize:
            h = F.rms_norm(h, (self.in_features,), eps=1e-6)
        logits = F.linear(h, self.router.weight.to(rd))
        return route(logits, self.gate, self.top_k, self.top_p, self.entropy_threshold)

    def forward(self, h: torch.Tensor) -> Decision:
        self.decision = self.decide(h)
        return self.decision

    def reset(self) -> None:
        """Forget the last decision, so a layer run without a fresh one fails loudly."""
        self.decision = None

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, experts={self.experts}, gate={self.gate}, top_k={self.top_k}"
        if self.gate == "top_p":
            s += f", top_p={self.top_p:g}, entropy_threshold={self.entropy_threshold}"
        return s + f", normalize={self.normalize}"


class PreGatedLoRAMoELinear(MoLELinearBase):
    """The same experts as :class:`LoRAMoELinear`, but no router: the decision comes from a
    shared :class:`PreGate` ("decide once, apply everywhere").

    The PreGate is held as a plain attribute (not a registered submodule), so it appears once in
    the module tree and the state dict, wherever its owner registered it.
    """

    def __init__(
        self,
        base: nn.Linear,
        pregate: PreGate,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        shared_A: bool = False,
        seed: int = 0,
        init_ratio: float = 0.2,
    ) -> None:
        if not isinstance(pregate, PreGate):
            raise TypeError(f"pregate must be a PreGate, got {type(pregate).__name__}")
        super().__init__(
            base,
            experts=pregate.experts,
            rank=rank,
            alpha=alpha,
            top_k=pregate.top_k,
            gate=pregate.gate,
            shared_A=shared_A,
            top_p=pregate.top_p,
            entropy_threshold=pregate.entropy_threshold,
            seed=seed,
            init_ratio=init_ratio,
        )
        object.__setattr__(self, "pregate", pregate)  # bypass nn.Module registration

    def forward(self, x: torch.Tensor, decision: Decision | None = None) -> torch.Tensor:
        if decision is None:
            decision = self.pregate.decision
            if decision is None:
                raise RuntimeError(
                    "PreGatedLoRAMoELinear ran without a pre-gate decision: call the PreGate on "
                    "the token representation first (add_pregated_lora_moe does this when the "
                    "model computes its input embeddings)"
                )
        idx, g = decision
        return self.base_layer(x) + self.lora_delta(x, idx, g)


class PreGatedEmbedding(nn.Embedding):
    """The model's token embedding that also runs the :class:`PreGate` on what it returns.

    Being an ``nn.Embedding`` that shares the original ``weight`` Parameter keeps the backbone's
    state-dict keys, ``isinstance`` checks and weight tying intact; the only new entries are the
    PreGate's (registered here as ``pregate``). This is how the decision reaches every layer
    without changing any transformers signature: computing the embeddings computes it.
    """

    def __init__(self, embedding: nn.Embedding, pregate: PreGate) -> None:
        nn.Module.__init__(self)
        for name in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"):
            setattr(self, name, getattr(embedding, name))
        self.weight = embedding.weight  # the same Parameter object
        self.pregate = pregate

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = super().forward(input_ids)
        self.pregate(embeds)
        return embeds
