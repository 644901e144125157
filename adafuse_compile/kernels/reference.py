"""Pure-torch references for the fused ops: the definition of what each op computes.

Written for clarity, not speed (they gather every chosen expert per token), and dtype-agnostic
so tests can run them in float64. Every fast path (CPU and Triton) is tested against these.

Shapes (the conventions of every op in this package):

- ``x [T, in]`` tokens, ``weight [out, in]`` and ``bias [out]`` the frozen base linear;
- ``A [E_A, r, in]`` and ``B [E, out, r]`` the stacked LoRA experts, as ``nn.Linear`` stores
  ``lora_A.weight`` and ``lora_B.weight``. ``E_A`` is ``E`` or ``1``: a single A shared by all
  experts is HydraLoRA's asymmetric form, and then ``idx`` selects only the B;
- ``idx [T, k]`` (int64) the experts the gate chose per token, ``g [T, k]`` their weights;
  a dense gate (LoRAMoE, HydraLoRA) is ``k == E`` with ``idx`` every expert;
- ``scale`` the LoRA scaling ``alpha / r``.
"""

from __future__ import annotations

import torch


def _chosen_A(A: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``A`` of each chosen expert, honouring a shared (``E_A == 1``) A."""
    if A.shape[0] == 1:
        return A[torch.zeros_like(idx)]
    return A[idx]


def lora_moe_delta_ref(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, idx: torch.Tensor,
                       g: torch.Tensor) -> torch.Tensor:
    """``sum_k g[:, k] * (x A[idx[:, k]]^T) B[idx[:, k]]^T``: the adapter term with scale 1."""
    h = torch.einsum("ti,tkri->tkr", x, _chosen_A(A, idx))  # [T, k, r]
    h = h * g.to(x.dtype).unsqueeze(-1)
    return torch.einsum("tkr,tkor->to", h, B[idx])  # [T, out]


def lora_moe_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    idx: torch.Tensor,
    g: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``y = x W^T + b + scale * sum_k g[:, k] * (x A[idx[:, k]]^T) B[idx[:, k]]^T``."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y + scale * lora_moe_delta_ref(x, A, B, idx, g)


def merged_delta_ref(
    A: torch.Tensor, B: torch.Tensor, scale: float, idx: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    """``scale * sum_k g[k] * B[idx[k]] @ A[idx[k]]`` for one decision ``idx [k], g [k]``.

    This is what a site's weight changes by when that decision is merged into it. An empty
    decision (``k == 0``) gives zeros.
    """
    if idx.numel() == 0:  # an empty einsum raises on some torch builds (2.11 with CUDA)
        return torch.zeros(B.shape[1], A.shape[2], dtype=B.dtype, device=B.device)
    delta = torch.einsum("kor,kri->oi", B[idx] * g.to(B.dtype)[:, None, None], _chosen_A(A, idx))
    return scale * delta


def merge_switch_ref(
    weights: list[torch.Tensor],
    As: list[torch.Tensor],
    Bs: list[torch.Tensor],
    scales: list[float],
    old_idx: torch.Tensor,
    old_g: torch.Tensor,
    new_idx: torch.Tensor,
    new_g: torch.Tensor,
) -> list[torch.Tensor]:
    """New weights after switching every site from decision ``old`` to decision ``new``.

    ``W'_n = W_n - delta_n(old) + delta_n(new)``; returns new tensors, leaves inputs alone.
    """
    return [
        W + merged_delta_ref(A, B, s, new_idx, new_g) - merged_delta_ref(A, B, s, old_idx, old_g)
        for W, A, B, s in zip(weights, As, Bs, scales)
    ]


def merge_rebase_ref(
    bases: list[torch.Tensor],
    As: list[torch.Tensor],
    Bs: list[torch.Tensor],
    scales: list[float],
    idx: torch.Tensor,
    g: torch.Tensor,
) -> list[torch.Tensor]:
    """``W_n = base_n + delta_n(decision)``: merging from pristine weights, with no drift."""
    return [base + merged_delta_ref(A, B, s, idx, g) for base, A, B, s in zip(bases, As, Bs, scales)]


def topk_route(router_input: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None, *,
               k: int, softmax_first: bool, renorm: bool, softmax_dtype: torch.dtype | None = None,
               gate_dtype: torch.dtype | None = None, sorted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx, g) [T, k]``: a linear router's top-k decision, in the two orders MoLE code uses.

    ``softmax_first``: softmax over all experts, top-k of the probabilities, and with ``renorm``
    the k weights divided by their sum (MixLoRA, MoLA, Mixtral's HF code); otherwise top-k of
    the logits, then softmax over the k (X-LoRA style). ``gate_dtype`` casts the weights last.
    These are the ATen calls, in order, that ``adafuse::routed_lora_moe_linear`` makes, so its
    decision is bitwise this function's (and the model code's it was matched from).
    """
    logits = torch.nn.functional.linear(router_input, router_weight, router_bias)
    if softmax_first:
        g, idx = torch.topk(torch.softmax(logits, -1, dtype=softmax_dtype), k, -1, True, sorted)
        if renorm:
            g = g / g.sum(-1, keepdim=True)
    else:
        g, idx = torch.topk(logits, k, -1, True, sorted)
        g = torch.softmax(g, -1, dtype=softmax_dtype)
    return idx, (g if gate_dtype is None else g.to(gate_dtype))
