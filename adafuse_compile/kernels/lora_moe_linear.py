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

``adafuse::lora_moe_linear_lists`` is the same op for experts held one tensor each (``A`` a list
of ``[r, in]``, ``B`` of ``[out, r]``: ``nn.ModuleList`` experts, PEFT-style dicts): the C++
kernel reads them in place, where stacking them would copy every expert at every call (~0.5 MB
per site on the small model, ~90 us of the step per site at batch 8 before this op existed).
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

from .checks import check_lora_moe_args, raise_unless
from .cpu_extension import load_cpu_kernels
from .reference import topk_route

__all__ = ["check_lora_moe_args", "cuda_op", "lora_moe_linear", "lora_moe_linear_lists", "opaque_cuda_kernels",
           "routed_lora_moe_linear"]

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


@torch.library.custom_op("adafuse::lora_moe_linear_lists", mutates_args=())
def _lora_moe_linear_lists_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: list[torch.Tensor],
    B: list[torch.Tensor],
    idx: torch.Tensor,
    g: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    if x.device.type == "cpu":
        load_cpu_kernels()
    return lora_moe_linear_torch(x, weight, bias, torch.stack(A), torch.stack(B), idx, g, scale)


def _stacked(A, B):
    """``(A, B)`` stacked: the tensors of the stacked form (``[A]``, ``[B]`` with ``B`` 3-d), or
    ``torch.stack`` of per-expert lists."""
    if len(B) == 1 and B[0].dim() == 3:
        return A[0], B[0]
    return torch.stack(A), torch.stack(B)


def _check_factor_lists(x, weight, bias, A, B, idx, g) -> None:
    """:func:`check_lora_moe_args` for per-expert lists: matrices of one shape and dtype each,
    checked as their first one, stacked."""
    torch._check(len(B) > 0 and len(A) in (1, len(B)), lambda: f"{len(A)} A factors for {len(B)} experts")
    for name, ts in (("A", A), ("B", B)):
        for t in ts:
            torch._check(t.dim() == 2 and t.shape == ts[0].shape and t.dtype == ts[0].dtype,
                         lambda name=name, t=t, ts=ts: f"every {name} must be like {name}[0] {tuple(ts[0].shape)} "
                                                       f"{ts[0].dtype}, got {tuple(t.shape)} {t.dtype}")
    check_lora_moe_args(x, weight, bias, A[0].unsqueeze(0), B[0].unsqueeze(0), idx, g)


@_lora_moe_linear_lists_op.register_fake
def _(x, weight, bias, A, B, idx, g, scale):
    _check_factor_lists(x, weight, bias, A, B, idx, g)
    return x.new_empty(x.shape[0], weight.shape[0])


@_lora_moe_linear_lists_op.register_kernel("cuda")
def _(x, weight, bias, A, B, idx, g, scale):
    from .lora_moe_linear_triton import lora_moe_linear_triton

    return lora_moe_linear_triton(x, weight, bias, torch.stack(A), torch.stack(B), idx, g, scale)


def lora_moe_linear_lists(x, weight, bias, A, B, idx, g, scale: float) -> torch.Tensor:
    """:func:`lora_moe_linear` for experts held one tensor each: ``A`` a list of ``[r, in]``
    (or one shared), ``B`` a list of ``[out, r]``; ``x [T, in]``, ``idx, g [T, k]``."""
    if x.is_cuda:  # the Triton kernels take stacks
        return cuda_op()(x, weight, bias, *_stacked(list(A), list(B)), idx, g, float(scale))
    return torch.ops.adafuse.lora_moe_linear_lists.default(x, weight, bias, list(A), list(B), idx, g, float(scale))


@torch.library.custom_op("adafuse::routed_lora_moe_linear", mutates_args=())
def _routed_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    router_input: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor | None,
    A: list[torch.Tensor],
    B: list[torch.Tensor],
    k: int,
    softmax_first: bool,
    renorm: bool,
    softmax_dtype: torch.dtype | None,
    gate_dtype: torch.dtype | None,
    sorted: bool,
    scale: float,
) -> torch.Tensor:
    if x.device.type == "cpu":
        load_cpu_kernels()
    idx, g = topk_route(router_input, router_weight, router_bias, k=k, softmax_first=softmax_first, renorm=renorm,
                        softmax_dtype=softmax_dtype, gate_dtype=gate_dtype, sorted=sorted)
    return lora_moe_linear_torch(x, weight, bias, *_stacked(A, B), idx, g, scale)


@_routed_op.register_fake
def _(x, weight, bias, router_input, router_weight, router_bias, A, B, k, softmax_first, renorm, softmax_dtype,
      gate_dtype, sorted, scale):
    torch._check(router_input.dim() == 2 and router_input.shape[0] == x.shape[0],
                 lambda: f"router_input must be [T, in] with x's T, got {tuple(router_input.shape)}")
    torch._check(router_weight.dim() == 2 and router_weight.shape[1] == router_input.shape[1],
                 lambda: f"router_weight must be [E, {router_input.shape[1]}], got {tuple(router_weight.shape)}")
    torch._check(0 < k <= router_weight.shape[0], lambda: f"k={k} of {router_weight.shape[0]} experts")
    idx, g = x.new_empty(x.shape[0], k, dtype=torch.int64), x.new_empty(x.shape[0], k, dtype=torch.float32)
    if len(B) == 1 and B[0].dim() == 3:  # the stacked form
        check_lora_moe_args(x, weight, bias, A[0], B[0], idx, g)
    else:
        _check_factor_lists(x, weight, bias, A, B, idx, g)
    return x.new_empty(x.shape[0], weight.shape[0])


@_routed_op.register_kernel("cuda")
def _(x, weight, bias, router_input, router_weight, router_bias, A, B, k, softmax_first, renorm, softmax_dtype,
      gate_dtype, sorted, scale):
    from .lora_moe_linear_triton import lora_moe_linear_triton

    idx, g = topk_route(router_input, router_weight, router_bias, k=k, softmax_first=softmax_first, renorm=renorm,
                        softmax_dtype=softmax_dtype, gate_dtype=gate_dtype, sorted=sorted)
    return lora_moe_linear_triton(x, weight, bias, *_stacked(A, B), idx, g, scale)


def routed_lora_moe_linear(x, weight, bias, router_input, router_weight, router_bias, A, B, *, k: int,
                           softmax_first: bool, renorm: bool, softmax_dtype=None, gate_dtype=None, sorted: bool = True,
                           scale: float) -> torch.Tensor:
    """:func:`lora_moe_linear` whose decision is :func:`~.reference.topk_route` of ``router_input
    [T, in_r]``, computed inside the op. ``A``/``B``: ``[A]``/``[B]`` stacked ``[E, r, in]`` /
    ``[E, out, r]``, or per-expert lists as in :func:`lora_moe_linear_lists`."""
    return torch.ops.adafuse.routed_lora_moe_linear.default(
        x, weight, bias, router_input, router_weight, router_bias, list(A), list(B), int(k), bool(softmax_first),
        bool(renorm), softmax_dtype, gate_dtype, bool(sorted), float(scale))


_OPAQUE = threading.local()


def cuda_op():
    """The op for CUDA tensors: ``adafuse::lora_moe_linear_cuda``, whose Triton kernels Inductor
    sees and launches from its own code (registered on first use, which imports Triton); inside
    :func:`opaque_cuda_kernels`, ``adafuse::lora_moe_linear``, which it calls as a black box."""
    if getattr(_OPAQUE, "on", False):
        return torch.ops.adafuse.lora_moe_linear.default
    from . import lora_moe_linear_triton  # noqa: F401  (registers the op)

    return torch.ops.adafuse.lora_moe_linear_cuda.default


@contextlib.contextmanager
def opaque_cuda_kernels():
    """Graphs traced meanwhile (in this thread) call the opaque op on CUDA: what the backend
    falls back to if Inductor cannot compile the visible kernels."""
    before = getattr(_OPAQUE, "on", False)
    _OPAQUE.on = True
    try:
        yield
    finally:
        _OPAQUE.on = before


def lora_moe_linear(x, weight, bias, A, B, idx, g, scale: float) -> torch.Tensor:
    """The fused adapter linear for ``x [..., in]`` and ``idx, g [..., k]``.

    Flattens the leading (token) dimensions, calls ``torch.ops.adafuse.lora_moe_linear``, and
    restores them: ``[..., out]``.
    """
    # not the CustomOpDef wrappers: ~3 us less
    op = cuda_op() if x.is_cuda else torch.ops.adafuse.lora_moe_linear.default
    if x.dim() == 2 and idx.dim() == 2:  # already [T, in]: skip the reshapes (~3 us each)
        return op(x, weight, bias, A, B, idx, g, float(scale))
    lead = x.shape[:-1]
    if idx.shape[:-1] != lead:
        raise ValueError(f"idx leading shape {tuple(idx.shape[:-1])} must match x's {tuple(lead)}")
    k = idx.shape[-1]
    y = op(x.reshape(-1, x.shape[-1]), weight, bias, A, B, idx.reshape(-1, k), g.reshape(-1, k), float(scale))
    return y.view(*lead, weight.shape[0])
