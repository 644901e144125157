"""``adafuse::lora_moe_linear``: a frozen linear plus its chosen LoRA experts, in one op.

``y = x W^T + b + scale * sum_k g[:, k] * (x A[idx[:, k]]^T) B[idx[:, k]]^T``

(definition and shape conventions: :mod:`adafuse_compile.kernels.reference`). Eager MoLE code
spends ~70 small ops per adapted linear on this (shared/MEASUREMENTS.md: ~300 us of dispatch per linear
on the 2-core CPU); here it is one dispatcher call with a handful of large ops inside.

Implementations:

- CPU: ``csrc/lora_moe_linear_cpu.cpp``, one dispatcher call: the base linear through ATen, the
  chosen experts of each token in loops over their rows (built on first use,
  :mod:`.cpu_extension`).
- Any device without a dedicated kernel, and CPU when the C++ kernel cannot be built:
  :func:`lora_moe_linear_torch`, which gathers the chosen experts and runs two ``bmm`` when few
  (token, expert) pairs are needed, or runs every expert densely when the batch covers them
  anyway. The switch point is measured, see ``_DENSE_MIN_PAIRS_PER_EXPERT``.
- CUDA: the Triton kernels of :mod:`adafuse_compile.kernels.lora_moe_linear_triton`.
- Fake (meta): shape inference for Dynamo, AOTAutograd and Inductor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_lora_moe_args, raise_unless
from .cpu_extension import load_cpu_kernels

__all__ = ["lora_moe_linear", "check_lora_moe_args"]

# Pure-torch path: gathering copies k*(r*in + out*r) expert values per token; running every
# expert densely reads each expert once per call but does E/k times the FLOPs. Measured on the
# 2-core CPU (in=out=1024, E=8, k=2, r=8, fp32, whole op incl. the base linear, bench_ops.py):
# T=1 gathered 139 vs dense 173 us; T=4 728 vs 728 (an earlier run); T=8 594 vs 479. So dense
# from about one (token, expert) pair per expert.
_DENSE_MIN_PAIRS_PER_EXPERT = 1.0


@torch.library.custom_op("adafuse::lora_moe_linear", mutates_args=())
def _lora_moe_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    idx: torch.Tensor,
    g: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    # The first CPU call loads the C++ kernel, which registers for the CPU key and serves every
    # later call; this call (and every call if it cannot be built) takes the pure-torch path.
    if x.device.type == "cpu":
        load_cpu_kernels()
    return lora_moe_linear_torch(x, weight, bias, A, B, idx, g, scale)


def lora_moe_linear_torch(x, weight, bias, A, B, idx, g, scale: float) -> torch.Tensor:
    """The op in ATen calls: the portable fallback of the C++ and Triton kernels."""
    check_lora_moe_args(x, weight, bias, A, B, idx, g, raise_unless)
    y = F.linear(x, weight, bias)
    T, k = idx.shape
    if T == 0 or k == 0 or scale == 0.0:
        return y
    gs = g * scale  # [T, k]; each tensor op costs ~3-4 us here, so convert only when needed
    if gs.dtype != x.dtype:
        gs = gs.to(x.dtype)
    E = B.shape[0]
    if T * k >= _DENSE_MIN_PAIRS_PER_EXPERT * E:
        return _add_experts_dense(y, x, A, B, idx, gs)
    return _add_experts_gathered(y, x, A, B, idx, gs)


def _add_experts_gathered(y, x, A, B, idx, gs):
    """Few (token, expert) pairs: gather exactly the chosen experts, two ``bmm``."""
    T, k = idx.shape
    r = B.shape[2]
    flat = idx.reshape(-1)
    if A.shape[0] == 1:  # shared A (HydraLoRA): one shrink, weights per chosen B
        h = (x @ A[0].T).unsqueeze(1) * gs.unsqueeze(-1)  # [T, k, r]
    else:
        A_sel = A.index_select(0, flat).view(T, k * r, -1)  # [T, k*r, in]
        h = torch.bmm(A_sel, x.unsqueeze(-1)).view(T, k, r) * gs.unsqueeze(-1)
    B_sel = B.index_select(0, flat)  # [T*k, out, r]
    delta = torch.bmm(B_sel, h.reshape(T * k, r, 1)).view(T, k, -1).sum(1)
    return y.add_(delta)


def _add_experts_dense(y, x, A, B, idx, gs):
    """Many pairs: run every expert once and weight the unchosen ones by zero."""
    T = x.shape[0]
    E, out_f, r = B.shape
    dense_g = torch.zeros(T, E, dtype=gs.dtype, device=gs.device).scatter_add_(1, idx, gs)
    if A.shape[0] == 1:
        h = (x @ A[0].T).unsqueeze(1) * dense_g.unsqueeze(-1)  # [T, E, r]
    else:
        h = (x @ A.reshape(E * r, -1).T).view(T, E, r) * dense_g.unsqueeze(-1)
    B_t = B.transpose(1, 2).reshape(E * r, out_f)  # [E*r, out]
    return y.addmm_(h.reshape(T, E * r), B_t)


@_lora_moe_linear_op.register_fake
def _(x, weight, bias, A, B, idx, g, scale):
    check_lora_moe_args(x, weight, bias, A, B, idx, g)
    return x.new_empty(x.shape[0], weight.shape[0])


@_lora_moe_linear_op.register_kernel("cuda")
def _(x, weight, bias, A, B, idx, g, scale):
    from .lora_moe_linear_triton import lora_moe_linear_triton  # imports triton only on GPU

    return lora_moe_linear_triton(x, weight, bias, A, B, idx, g, scale)


def lora_moe_linear(x, weight, bias, A, B, idx, g, scale: float) -> torch.Tensor:
    """The fused adapter linear for ``x [..., in]`` and ``idx, g [..., k]``.

    Flattens the leading (token) dimensions, calls ``torch.ops.adafuse.lora_moe_linear``, and
    restores them: ``[..., out]``.
    """
    op = torch.ops.adafuse.lora_moe_linear.default  # not the CustomOpDef wrapper: ~3 us less
    if x.dim() == 2 and idx.dim() == 2:  # already [T, in]: skip the reshapes (~3 us each)
        return op(x, weight, bias, A, B, idx, g, float(scale))
    lead = x.shape[:-1]
    if idx.shape[:-1] != lead:
        raise ValueError(f"idx leading shape {tuple(idx.shape[:-1])} must match x's {tuple(lead)}")
    k = idx.shape[-1]
    y = op(x.reshape(-1, x.shape[-1]), weight, bias, A, B, idx.reshape(-1, k), g.reshape(-1, k), float(scale))
    return y.view(*lead, weight.shape[0])
