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

Three launches per call (linear, shrink, expand). The rank ``r`` is padded to a power of two
with ``tl.arange`` and masked, so any ``r``, ``in`` and ``out`` work. A shared A (``E_A == 1``,
HydraLoRA) is handled by giving the kernel an expert stride of 0 for A: every ``idx`` then
addresses ``A[0]`` while still selecting its own ``B``.

``idx`` must hold valid expert ids in ``[0, E)``; like every gather kernel this one does not
check them on the device (that would need a sync), an out-of-range id reads out of bounds.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .checks import check_lora_moe_args

__all__ = ["PATHS", "choose_path", "chosen_paths", "fits_one_pass", "lora_moe_linear_triton"]

log = logging.getLogger("adafuse_compile")

# Programs the shrink kernel aims for: about two per SM of an H100 (132 SMs). With T * k small
# at decode, the ``in`` reduction is split until the grid reaches this size.
_TARGET_PROGRAMS = 256


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
def _linear_expand_kernel(
    x_ptr,  # [T, in]               x.dtype
    w_ptr,  # [out, in]             x.dtype, rows of unit stride
    bias_ptr,  # [out] or unused    x.dtype
    b_ptr,  # [E, out, r]           x.dtype
    idx_ptr,  # [T, k]              int64
    h_ptr,  # [split, T, k, R_PAD]  float32 partial sums from the shrink kernel
    y_ptr,  # [T, out]              x.dtype, written entirely
    T,
    K,
    IN,
    OUT,
    E,
    R,
    SPLIT,
    stride_xt,
    stride_wo,
    stride_be,
    stride_bo,
    stride_it,
    stride_hs,
    stride_ht,
    stride_yt,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    E_PAD: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,  # the interpreter's dot of 16-bit floats is wrong (Triton 3.9): cast first
):
    """The base linear and the expand in one pass (decode, ``T <= BLOCK_T``): each program owns
    ``BLOCK_N`` output features of every token. ``acc = x W^T`` over the whole ``in``; then the
    chosen experts' ``h`` are scattered into a dense ``[T, E * R_PAD]`` row (zero where not
    chosen, summed where an expert is chosen twice) and one more small dot with this block's rows
    of every expert's ``B`` adds the adapter: the ``B`` bytes read are ``E * r / in`` of ``W``'s."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < OUT
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < T

    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < IN
        xv = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :], mask=t_mask[:, None] & k_mask[None, :],
                     other=0.0)
        wv = tl.load(w_ptr + offs_n[:, None] * stride_wo + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                     other=0.0)
        if DOT_FP32:
            xv = xv.to(tl.float32)
            wv = wv.to(tl.float32)
        acc += tl.dot(xv, tl.trans(wv), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]

    offs_c = tl.arange(0, E_PAD * R_PAD)  # column c: expert c // R_PAD, rank c % R_PAD
    c_e = offs_c // R_PAD
    c_r = offs_c % R_PAD
    h_dense = tl.zeros([BLOCK_T, E_PAD * R_PAD], dtype=tl.float32)
    for j in range(K):
        e = tl.load(idx_ptr + offs_t * stride_it + j, mask=t_mask, other=-1)  # [BLOCK_T]
        hit = (c_e[None, :] == e[:, None]) & t_mask[:, None]  # only the chosen expert's columns load
        for s in range(SPLIT):
            h_dense += tl.load(h_ptr + s * stride_hs + offs_t[:, None] * stride_ht + j * R_PAD + c_r[None, :],
                               mask=hit, other=0.0)
    bt = tl.load(b_ptr + c_e[:, None] * stride_be + offs_n[None, :] * stride_bo + c_r[:, None],
                 mask=((c_e < E) & (c_r < R))[:, None] & n_mask[None, :], other=0.0)  # [E_PAD * R_PAD, BLOCK_N]
    acc += tl.dot(h_dense, bt.to(tl.float32), input_precision="ieee")

    y_ptrs = y_ptr + offs_t[:, None] * stride_yt + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=t_mask[:, None] & n_mask[None, :])


def _block_sizes(T: int, k: int, in_f: int, out_f: int, r: int,
                 target: int = _TARGET_PROGRAMS) -> tuple[int, int, int, int, int]:
    """``(R_PAD, BLOCK_IN, chunk, split, BLOCK_OUT)`` for one call.

    - ``R_PAD``: ``r`` rounded up to a power of two (``tl.arange`` needs one); masked.
    - ``BLOCK_IN``: the shrink tile is ``[R_PAD, BLOCK_IN]``; ~4096 elements (32 fp32 registers
      per thread at 4 warps) keeps loads wide without spilling, capped by ``in`` so tiny layers
      do not run mostly-masked tiles.
    - ``split``: the ``in`` reduction is cut into ``split`` chunks of whole blocks until
      ``T * k * split`` reaches ``target`` (one decode token alone has only ``k``
      (token, expert) pairs). Recomputed from ``chunk`` so no split is empty.
    - ``BLOCK_OUT``: the expand tile is ``[BLOCK_OUT, R_PAD]`` (<= 2048 elements); 128 rows
      unless that leaves fewer than ``_TARGET_PROGRAMS`` programs, then down to 16.
    """
    r_pad = triton.next_power_of_2(max(r, 1))
    block_in = max(16, min(4096 // r_pad, 512, triton.next_power_of_2(max(in_f, 1))))
    n_in_blocks = triton.cdiv(max(in_f, 1), block_in)
    split = min(n_in_blocks, max(1, triton.cdiv(target, T * k)))
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
    path: str | None = None,
) -> torch.Tensor:
    """``y [T, out]`` (``x.dtype``) for ``x [T, in]``; see the module docstring for the design.

    ``weight [out, in]``, ``bias [out]`` or None, ``A [E or 1, r, in]``, ``B [E, out, r]``,
    ``idx [T, k]`` int64, ``g [T, k]`` any float dtype (read as float32 in the kernel).
    ``path``: one of :data:`PATHS`; by default the one measured fastest for this shape on this
    device (:func:`choose_path`).
    """
    check_lora_moe_args(x, weight, bias, A, B, idx, g)
    for name, t in (("weight", weight), ("A", A), ("B", B), ("idx", idx), ("g", g)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if bias is not None and bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    T, k = idx.shape
    r = A.shape[1]
    if T == 0 or k == 0 or r == 0 or weight.shape[0] == 0 or scale == 0.0:
        return F.linear(x, weight, bias)
    # The kernels assume unit stride along the last dim (contiguous rows); these are no-ops
    # for the usual inputs (activations, nn.Parameter stacks, the gate's outputs).
    args = (x.contiguous(), weight, bias, A.contiguous(), B.contiguous(), idx.contiguous(), g.contiguous(),
            float(scale))
    if path is None:
        path = choose_path(*args)
    elif path not in PATHS or (path == "one-pass" and not fits_one_pass(*args[:7])):
        raise ValueError(f"path {path!r} is not one of the paths this call can take")
    with _device_guard(x):
        return _RUN[path](*args)


def _three_launches(x, weight, bias, A, B, idx, g, scale):
    y = F.linear(x, weight, bias)  # [T, out], x.dtype, fresh and contiguous
    assert y.is_contiguous(), "F.linear returned a non-contiguous output"
    T, k = idx.shape
    out_f = weight.shape[0]
    r_pad, block_in, chunk, split, block_out = _block_sizes(T, k, A.shape[2], out_f, A.shape[1])
    h = _shrink(x, A, idx, g, scale, r_pad, block_in, chunk, split)
    _expand_kernel[(T, triton.cdiv(out_f, block_out))](
        y, B, idx, h,
        k, out_f, A.shape[1], split,
        y.stride(0), B.stride(0), B.stride(1), idx.stride(0), h.stride(0), h.stride(1),
        R_PAD=r_pad, BLOCK_OUT=block_out,
    )  # fmt: skip
    return y


def _shrink(x, A, idx, g, scale, r_pad, block_in, chunk, split) -> torch.Tensor:
    """``h [split, T, k, r_pad]``: the gated shrink's partial sums (see ``_shrink_kernel``)."""
    T, k = idx.shape
    E_A, r, in_f = A.shape
    h = torch.empty(split, T, k, r_pad, dtype=torch.float32, device=x.device)
    stride_ae = 0 if E_A == 1 else A.stride(0)  # shared A: every expert id reads A[0]
    _shrink_kernel[(T, k, split)](
        x, A, idx, g, h,
        k, in_f, r, scale, chunk,
        x.stride(0), stride_ae, A.stride(1), idx.stride(0), g.stride(0), h.stride(0), h.stride(1),
        R_PAD=r_pad, BLOCK_IN=block_in,
    )  # fmt: skip
    return h


# The one-pass path: at most this many tokens (the base dot's M), and at most this many dense
# adapter columns (E_PAD * R_PAD floats per token, held by every program).
_ONE_PASS_MAX_T = 16
_ONE_PASS_MAX_COLS = 1024
# Shrink programs for the one-pass path: every program of the linear-expand kernel sums the
# ``split`` partial sums of its tokens' chosen experts, so fewer, longer shrink programs.
_ONE_PASS_SHRINK_PROGRAMS = 64
_ONE_PASS_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": kk}, num_warps=w, num_stages=st)
    for n, kk, w, st in [(16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 3)]
]
_linear_expand_tuned = triton.autotune(_ONE_PASS_CONFIGS, key=["OUT", "IN", "T", "E", "R"])(_linear_expand_kernel)


def _one_pass_pads(E: int, r: int) -> tuple[int, int]:
    """``(E_PAD, R_PAD)``: powers of two with ``E_PAD * R_PAD >= 16`` (a dot's inner dimension)."""
    r_pad = triton.next_power_of_2(max(r, 1))
    return max(triton.next_power_of_2(E), triton.cdiv(16, r_pad)), r_pad


def fits_one_pass(x, weight, bias, A, B, idx, g) -> bool:
    """Whether the one-pass kernel takes this call (decode-sized ``T``, few expert columns,
    ``weight`` rows of unit stride: it is read in place, never copied)."""
    e_pad, r_pad = _one_pass_pads(B.shape[0], A.shape[1])
    return (idx.shape[0] <= _ONE_PASS_MAX_T and e_pad * r_pad <= _ONE_PASS_MAX_COLS and weight.stride(1) == 1
            and (bias is None or bias.stride(0) == 1))


def _one_pass(x, weight, bias, A, B, idx, g, scale):
    T, k = idx.shape
    E, out_f, r = B.shape
    in_f = A.shape[2]
    r_pad, block_in, chunk, split, _ = _block_sizes(T, k, in_f, out_f, r, target=_ONE_PASS_SHRINK_PROGRAMS)
    h = _shrink(x, A, idx, g, scale, r_pad, block_in, chunk, split)
    y = torch.empty(T, out_f, dtype=x.dtype, device=x.device)
    e_pad, _ = _one_pass_pads(E, r)
    args = (x, weight, bias if bias is not None else y, B, idx, h, y,
            T, k, in_f, out_f, E, r, split,
            x.stride(0), weight.stride(0), B.stride(0), B.stride(1), idx.stride(0), h.stride(0), h.stride(1),
            y.stride(0))
    meta = dict(HAS_BIAS=bias is not None, BLOCK_T=max(16, triton.next_power_of_2(T)), E_PAD=e_pad, R_PAD=r_pad,
                DOT_FP32=not x.is_cuda)
    if x.is_cuda:
        _linear_expand_tuned[lambda m: (triton.cdiv(out_f, m["BLOCK_N"]),)](*args, **meta)
    else:  # the interpreter (tests): small tiles exercise the masks
        _linear_expand_kernel[(triton.cdiv(out_f, 16),)](*args, **meta, BLOCK_N=16, BLOCK_K=32)
    return y


_RUN = {"three-launch": _three_launches, "one-pass": _one_pass}
PATHS = tuple(_RUN)
# (device, dtype, T, in, out, E_A, E, r, k, bias) -> the path measured fastest there
_CHOSEN: dict[tuple, str] = {}


def choose_path(x, weight, bias, A, B, idx, g, scale) -> str:
    """The path for this call's shape on this device, measured once per shape and remembered:
    both are timed on these operands with ``triton.testing.do_bench`` (the L2 flushed before each
    run, as a model's other layers would). A shape met first inside a CUDA-graph capture, where
    nothing can be timed, takes the three launches without remembering; off CUDA (the interpreter),
    the one-pass kernel whenever it fits."""
    if not fits_one_pass(x, weight, bias, A, B, idx, g):
        return "three-launch"
    if not x.is_cuda:
        return "one-pass"
    key = (x.device, x.dtype, idx.shape[0], A.shape[2], weight.shape[0], A.shape[0], B.shape[0], A.shape[1],
           idx.shape[1], bias is not None)
    path = _CHOSEN.get(key)
    if path is None:
        if torch.cuda.is_current_stream_capturing():
            return "three-launch"
        times = {}
        for p, run in _RUN.items():
            try:
                times[p] = triton.testing.do_bench(lambda run=run: run(x, weight, bias, A, B, idx, g, scale),
                                                   warmup=5, rep=25)
            except Exception:  # a kernel this device cannot build: the other path is as exact
                if p == "three-launch":
                    raise
                log.warning("adafuse: the %s kernel failed on %s; using the three launches", p, key, exc_info=True)
        path = _CHOSEN[key] = min(times, key=times.get)
        log.info("adafuse: lora_moe_linear %s takes %s (%s)", key, path,
                 ", ".join(f"{p} {t * 1e3:.1f} us" for p, t in times.items()))
    return path


def chosen_paths() -> dict[tuple, str]:
    """The paths measured so far in this process, by shape (what ``gpu_check.py`` reports)."""
    return dict(_CHOSEN)
