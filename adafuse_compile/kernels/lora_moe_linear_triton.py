"""Triton kernels for ``adafuse::lora_moe_linear`` on CUDA (decode: 1..64 tokens).

Computes exactly :func:`adafuse_compile.kernels.reference.lora_moe_linear_ref`:

``y = x W^T + b + scale * sum_k g[:, k] * (x A[idx[:, k]]^T) B[idx[:, k]]^T``

Design (Punica / SGMV style: the chosen experts are gathered by index *inside* the kernels,
so there is no per-expert Python loop and no gathered copy of ``A`` or ``B``):

1. base ``y = x W^T + b`` with ``F.linear`` (cuBLAS): at decode the base GEMV reads the whole
   ``[out, in]`` matrix and cuBLAS already runs it at bandwidth; re-implementing it buys nothing.
2. *shrink* (grid ``(T, k, split)``): ``h[s, t, j, :] = g[t, j] * scale * x[t, chunk_s] .
   A[idx[t, j], :, chunk_s]^T`` in float32. The ``in`` reduction is split over ``split``
   programs so that a single token still fills the GPU; the partial sums are reduced by the
   expand kernel (deterministic, no atomics).
3. *expand* (grid ``(T, cdiv(out, BLOCK_OUT))``): ``y[t, tile] += sum_j h[t, j, :] @
   B[idx[t, j], tile, :]^T``, accumulated in float32 and rounded once into ``y`` in place.

Three launches per call (linear, shrink, expand); measured on an H200 (bf16, T=1, E=8, k=2,
r=8, CUDA-graph replay) at 1.64x the linear alone for 4096x4096 (20.1 against 12.3 us) and 1.30x
for 4096x11008. A one-kernel variant (shrink, then base and expand as one Triton dot over W
with the experts' B rows appended) lost to cuBLAS's linear at every decode shape measured and
was removed (commit e1e19ed has it). :func:`lora_moe_linear_cuda` is the same as a
``torch.library.triton_op`` whose kernels Inductor launches from its generated code.

*One adapter kernel* (``adapter="one-kernel"``, grid ``(T, cdiv(out, BLOCK_OUT))``): each
program computes its token's ``h`` over the whole ``in`` (the chosen A rows come from L2 after
the first program reads them) and adds its tile of the expand, so the adapter is one launch and
one dependent trip to memory less (its B tile is loaded before the shrink). The price is the
shrink repeated by every program of a token: ``cdiv(out, BLOCK_OUT)`` reads of ``k * r * in``
elements from L2. Not measured yet (no GPU since it was written): off unless
``ONE_KERNEL_MAX_TOKENS`` is raised; ``benchmarks/gpu_check.py`` times both
(``fused-one-kernel`` in its site timing) so that a GPU run can set it. On the H200 profile the
shrink and the expand took ~3.4 and ~3.7 us per site, most of it launch and memory latency.

The rank ``r`` is padded to a power of two with ``tl.arange`` and masked, so any ``r``, ``in``
and ``out`` work. A shared A (``E_A == 1``, HydraLoRA) is handled by giving the kernel an expert
stride of 0 for A: every ``idx`` then addresses ``A[0]`` while still selecting its own ``B``.

``idx`` must hold valid expert ids in ``[0, E)``; like every gather kernel this one does not
check them on the device (that would need a sync), an out-of-range id reads out of bounds.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .checks import check_lora_moe_args

__all__ = ["ADAPTER_PATHS", "ONE_KERNEL_MAX_TOKENS", "lora_moe_linear_cuda", "lora_moe_linear_triton"]

# Programs the shrink kernel aims for: about two per SM of an H100 (132 SMs). With T * k small
# at decode, the ``in`` reduction is split until the grid reaches this size.
_TARGET_PROGRAMS = 256

ADAPTER_PATHS = ("shrink-expand", "one-kernel")
# Calls with at most this many tokens run the adapter as one kernel. 0 (never) until measured:
# gpu_check.py's site timing reports both paths under CUDA-graph replay.
ONE_KERNEL_MAX_TOKENS = 0
# Output rows per program of the one-kernel path: each program repeats its token's shrink, so
# fewer, larger tiles than the expand kernel's (a first guess, not measured).
_ONE_KERNEL_BLOCK_OUT = 128


@triton.jit
def _shrink_kernel(
    x_ptr,  # [T, in]            x.dtype
    a_ptr,  # [E_A, r, in]       x.dtype (expert stride 0 when A is shared)
    idx_ptr,  # [T, k]           int64
    g_ptr,  # [T, k]             any float
    h_ptr,  # [split, T, k, R_PAD] float32, written entirely (padding and empty chunks get 0)
    K,
    IN,
    R,
    scale,
    chunk,  # elements of ``in`` per split, a multiple of BLOCK_IN
    stride_xt,
    stride_ae,
    stride_ar,
    stride_it,
    stride_gt,
    stride_hs,
    stride_ht,
    R_PAD: tl.constexpr,
    BLOCK_IN: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    s = tl.program_id(2)

    e = tl.load(idx_ptr + t * stride_it + j)  # int64: e * stride never overflows
    gate = tl.load(g_ptr + t * stride_gt + j).to(tl.float32) * scale

    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    a_rows = a_ptr + e * stride_ae + offs_r[:, None] * stride_ar  # [R_PAD, 1]
    x_row = x_ptr + t * stride_xt

    # Accumulate the [R_PAD, BLOCK_IN] products and reduce once at the end: one cross-lane
    # reduction per program instead of one per iteration.
    acc = tl.zeros([R_PAD, BLOCK_IN], dtype=tl.float32)
    start = s * chunk
    end = tl.minimum(start + chunk, IN)
    for i0 in range(start, end, BLOCK_IN):
        offs_i = i0 + tl.arange(0, BLOCK_IN)
        i_mask = offs_i < end
        xv = tl.load(x_row + offs_i, mask=i_mask, other=0.0).to(tl.float32)
        av = tl.load(a_rows + offs_i[None, :], mask=r_mask[:, None] & i_mask[None, :], other=0.0)
        acc += av.to(tl.float32) * xv[None, :]
    h = tl.sum(acc, axis=1) * gate  # [R_PAD]; padded ranks are exactly 0
    tl.store(h_ptr + s * stride_hs + t * stride_ht + j * R_PAD + offs_r, h)


@triton.jit
def _expand_kernel(
    y_ptr,  # [T, out]             x.dtype, updated in place
    b_ptr,  # [E, out, r]          x.dtype
    idx_ptr,  # [T, k]             int64
    h_ptr,  # [split, T, k, R_PAD] float32 partial sums from the shrink kernel
    K,
    OUT,
    R,
    SPLIT,
    stride_yt,
    stride_be,
    stride_bo,
    stride_it,
    stride_hs,
    stride_ht,
    R_PAD: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pid_o = tl.program_id(1)

    offs_o = pid_o * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    o_mask = offs_o < OUT
    offs_r = tl.arange(0, R_PAD)
    b_mask = o_mask[:, None] & (offs_r < R)[None, :]
    h_row = h_ptr + t * stride_ht

    acc = tl.zeros([BLOCK_OUT], dtype=tl.float32)
    for j in range(K):
        e = tl.load(idx_ptr + t * stride_it + j)
        h = tl.zeros([R_PAD], dtype=tl.float32)
        for s in range(SPLIT):
            h += tl.load(h_row + s * stride_hs + j * R_PAD + offs_r)
        # B[e] rows are contiguous in r, so this [BLOCK_OUT, R_PAD] tile is BLOCK_OUT short runs.
        bv = tl.load(
            b_ptr + e * stride_be + offs_o[:, None] * stride_bo + offs_r[None, :], mask=b_mask, other=0.0
        )
        acc += tl.sum(bv.to(tl.float32) * h[None, :], axis=1)

    y_ptrs = y_ptr + t * stride_yt + offs_o
    y = tl.load(y_ptrs, mask=o_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _adapter_kernel(
    y_ptr,  # [T, out]      x.dtype, updated in place
    x_ptr,  # [T, in]       x.dtype
    a_ptr,  # [E_A, r, in]  x.dtype (expert stride 0 when A is shared)
    b_ptr,  # [E, out, r]   x.dtype
    idx_ptr,  # [T, k]      int64
    g_ptr,  # [T, k]        any float
    K,
    IN,
    OUT,
    R,
    scale,
    stride_yt,
    stride_xt,
    stride_ae,
    stride_ar,
    stride_be,
    stride_bo,
    stride_it,
    stride_gt,
    R_PAD: tl.constexpr,
    BLOCK_IN: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pid_o = tl.program_id(1)

    offs_o = pid_o * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    o_mask = offs_o < OUT
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    x_row = x_ptr + t * stride_xt

    acc = tl.zeros([BLOCK_OUT], dtype=tl.float32)
    for j in range(K):
        e = tl.load(idx_ptr + t * stride_it + j)  # int64: e * stride never overflows
        gate = tl.load(g_ptr + t * stride_gt + j).to(tl.float32) * scale
        # This expert's B tile first: its load is in flight while the shrink below runs.
        bv = tl.load(b_ptr + e * stride_be + offs_o[:, None] * stride_bo + offs_r[None, :],
                     mask=o_mask[:, None] & r_mask[None, :], other=0.0)
        a_rows = a_ptr + e * stride_ae + offs_r[:, None] * stride_ar  # [R_PAD, 1]
        h_acc = tl.zeros([R_PAD, BLOCK_IN], dtype=tl.float32)
        for i0 in range(0, IN, BLOCK_IN):
            offs_i = i0 + tl.arange(0, BLOCK_IN)
            i_mask = offs_i < IN
            xv = tl.load(x_row + offs_i, mask=i_mask, other=0.0).to(tl.float32)
            av = tl.load(a_rows + offs_i[None, :], mask=r_mask[:, None] & i_mask[None, :], other=0.0)
            h_acc += av.to(tl.float32) * xv[None, :]
        h = tl.sum(h_acc, axis=1) * gate  # [R_PAD]; padded ranks are exactly 0
        acc += tl.sum(bv.to(tl.float32) * h[None, :], axis=1)

    y_ptrs = y_ptr + t * stride_yt + offs_o
    y = tl.load(y_ptrs, mask=o_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=o_mask)


def _block_sizes(T: int, k: int, in_f: int, out_f: int, r: int) -> tuple[int, int, int, int, int]:
    """``(R_PAD, BLOCK_IN, chunk, split, BLOCK_OUT)`` for one call.

    - ``R_PAD``: ``r`` rounded up to a power of two (``tl.arange`` needs one); masked.
    - ``BLOCK_IN``: the shrink tile is ``[R_PAD, BLOCK_IN]``; ~4096 elements (32 fp32 registers
      per thread at 4 warps) keeps loads wide without spilling, capped by ``in`` so tiny layers
      do not run mostly-masked tiles.
    - ``split``: the ``in`` reduction is cut into ``split`` chunks of whole blocks until
      ``T * k * split`` reaches ``_TARGET_PROGRAMS`` (one decode token alone has only ``k``
      (token, expert) pairs). Recomputed from ``chunk`` so no split is empty.
    - ``BLOCK_OUT``: the expand tile is ``[BLOCK_OUT, R_PAD]`` (<= 2048 elements); 128 rows
      unless that leaves fewer than ``_TARGET_PROGRAMS`` programs, then down to 16.
    """
    r_pad = triton.next_power_of_2(max(r, 1))
    block_in = max(16, min(4096 // r_pad, 512, triton.next_power_of_2(max(in_f, 1))))
    n_in_blocks = triton.cdiv(max(in_f, 1), block_in)
    split = min(n_in_blocks, max(1, triton.cdiv(_TARGET_PROGRAMS, T * k)))
    chunk = triton.cdiv(n_in_blocks, split) * block_in
    split = triton.cdiv(max(in_f, 1), chunk)
    block_out = 128
    while block_out > 16 and T * triton.cdiv(out_f, block_out) < _TARGET_PROGRAMS:
        block_out //= 2
    block_out = min(block_out, max(16, triton.next_power_of_2(out_f)))
    return r_pad, block_in, chunk, split, block_out


def _device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU even when it is not the current device (Triton uses the current one)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def lora_moe_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    idx: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    *,
    adapter: str | None = None,
) -> torch.Tensor:
    """``y [T, out]`` (``x.dtype``) for ``x [T, in]``; see the module docstring for the design.

    ``weight [out, in]``, ``bias [out]`` or None, ``A [E or 1, r, in]``, ``B [E, out, r]``,
    ``idx [T, k]`` int64, ``g [T, k]`` any float dtype (read as float32 in the kernel).
    ``adapter``: one of :data:`ADAPTER_PATHS`, or None for the default by token count.
    """
    return _launch(x, weight, bias, A, B, idx, g, scale, wrap=_direct, adapter=adapter)


@torch.library.triton_op("adafuse::lora_moe_linear_cuda", mutates_args=())
def lora_moe_linear_cuda(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    idx: torch.Tensor,
    g: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """:func:`lora_moe_linear_triton` as an op whose kernels ``torch.compile`` sees
    (``torch.library.triton_op``): Inductor launches them from its own generated code, where a
    Python op launched them through the dispatcher. Measured on an H200 (gpu_check.py site
    timing, one 4096x4096 site, bf16, T=1): ~150 us of host time per call through the custom op,
    102 us calling the kernels directly, against ~20 us of GPU time, so a compiled decode step
    without CUDA graphs was host-bound at 13x the backbone."""
    return _launch(x, weight, bias, A, B, idx, g, scale, wrap=torch.library.wrap_triton)


def _direct(kernel):
    return kernel


def _launch(x, weight, bias, A, B, idx, g, scale, *, wrap, adapter=None):
    check_lora_moe_args(x, weight, bias, A, B, idx, g)
    if adapter is not None and adapter not in ADAPTER_PATHS:
        raise ValueError(f"adapter must be one of {ADAPTER_PATHS} or None, got {adapter!r}")
    for name, t in (("weight", weight), ("A", A), ("B", B), ("idx", idx), ("g", g)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if bias is not None and bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}")

    y = F.linear(x, weight, bias)  # [T, out], x.dtype, fresh and contiguous
    T, k = idx.shape
    E_A, r, in_f = A.shape
    out_f = weight.shape[0]
    if T == 0 or k == 0 or r == 0 or out_f == 0 or scale == 0.0:
        return y

    # The kernels assume unit stride along the last dim (contiguous rows); these are no-ops
    # for the usual inputs (activations, nn.Parameter stacks, the gate's outputs).
    x = x.contiguous()  # [T, in]
    A = A.contiguous()  # [E_A, r, in]
    B = B.contiguous()  # [E, out, r]
    idx = idx.contiguous()  # [T, k]
    g = g.contiguous()  # [T, k]

    r_pad, block_in, chunk, split, block_out = _block_sizes(T, k, in_f, out_f, r)
    stride_ae = 0 if E_A == 1 else A.stride(0)  # shared A: every expert id reads A[0]
    if (adapter or ("one-kernel" if T <= ONE_KERNEL_MAX_TOKENS else "shrink-expand")) == "one-kernel":
        block_out = min(_ONE_KERNEL_BLOCK_OUT, max(16, triton.next_power_of_2(out_f)))
        with _device_guard(x):
            wrap(_adapter_kernel)[(T, triton.cdiv(out_f, block_out))](
                y, x, A, B, idx, g,
                k, in_f, out_f, r, float(scale),
                y.stride(0), x.stride(0), stride_ae, A.stride(1), B.stride(0), B.stride(1), idx.stride(0), g.stride(0),
                R_PAD=r_pad, BLOCK_IN=block_in, BLOCK_OUT=block_out,
            )  # fmt: skip
        return y
    h = torch.empty(split, T, k, r_pad, dtype=torch.float32, device=x.device)  # partial sums

    with _device_guard(x):
        wrap(_shrink_kernel)[(T, k, split)](
            x, A, idx, g, h,
            k, in_f, r, float(scale), chunk,
            x.stride(0), stride_ae, A.stride(1), idx.stride(0), g.stride(0), h.stride(0), h.stride(1),
            R_PAD=r_pad, BLOCK_IN=block_in,
        )  # fmt: skip
        wrap(_expand_kernel)[(T, triton.cdiv(out_f, block_out))](
            y, B, idx, h,
            k, out_f, r, split,
            y.stride(0), B.stride(0), B.stride(1), idx.stride(0), h.stride(0), h.stride(1),
            R_PAD=r_pad, BLOCK_OUT=block_out,
        )  # fmt: skip
    return y
