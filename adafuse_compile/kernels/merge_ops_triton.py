"""Triton kernel for the SGMM merge: every site of a group updated in one launch (CUDA).

``weights[n] = src_n + scales[n] * sum_j coefs[j] * Bs[n][e_j] @ As[n][e_j]`` with
``e_j = expert_ids[j]`` and ``src_n = sources[n]`` (re-base) or ``weights[n]`` (incremental).

Design:

- *One launch for all N sites*, like vLLM's multi-LoRA kernels: the sites' data pointers go to
  the device as an int64 table and are cast back with ``.to(tl.pointer_type(...))``; shapes,
  strides and scales go in side tables. Sites may differ in ``out``, ``in``, ``r`` and ``E``.
  This also works under ``TRITON_INTERPRET=1`` with CPU tensors (the interpreter dereferences
  raw host addresses), so the same path is tested without a GPU. A pointer's element type is
  a compile-time constant, so sites are grouped by dtype: one launch per dtype present
  (in practice one).
- *Grid* ``(max_tiles, N)``: program ``(p, n)`` owns the ``p``-th ``[BLOCK_OUT, BLOCK_IN]``
  tile of site ``n`` and exits at once if site ``n`` has fewer tiles. Early-exit programs cost
  a few table loads; this avoids a per-program search through a prefix-sum table.
- *Per tile*: for each chosen expert, ``tl.dot`` of the ``[BLOCK_OUT, R_PAD]`` tile of ``B[e]``
  with the ``[R_PAD, BLOCK_IN]`` tile of ``A[e]`` (rank padded to a power of two >= 16 and
  masked), weighted by ``coefs[j]`` and accumulated in float32; then one read of the source
  tile, one add, one rounding and one store. The op is bound by reading and writing ``W``; the
  ``m * r`` reduction is small. Each element is read and written by exactly one program, so
  the in-place case (``src is W``) is race-free.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["merge_combination_triton"]

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Columns of the per-site integer table (int64 [N, _NDIMS]).
_OUT, _IN, _R, _SW0, _SW1, _SS0, _SS1, _SAE, _SAR, _SBE, _SBO = range(11)
_NDIMS = 11


@triton.jit
def _merge_kernel(
    ptr_tab,  # int64 [N, 4]: data_ptr of W, src, A, B per site
    dim_tab,  # int64 [N, _NDIMS]: out, in, r and strides per site (see the column constants)
    scale_tab,  # float32 [N]
    ids_ptr,  # int64 [M]: expert ids
    coef_ptr,  # float [M]: their coefficients
    M,
    DTYPE: tl.constexpr,
    NDIMS: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_IN: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    tile = tl.program_id(0)
    site = tl.program_id(1).to(tl.int64)

    dims = dim_tab + site * NDIMS
    OUT = tl.load(dims + 0)
    IN = tl.load(dims + 1)
    n_tiles_in = tl.cdiv(IN, BLOCK_IN)
    if tile >= tl.cdiv(OUT, BLOCK_OUT) * n_tiles_in:
        return  # this site is smaller than the largest one
    R = tl.load(dims + 2)
    stride_w0 = tl.load(dims + 3)
    stride_w1 = tl.load(dims + 4)
    stride_s0 = tl.load(dims + 5)
    stride_s1 = tl.load(dims + 6)
    stride_ae = tl.load(dims + 7)  # 0 for a shared A: every expert id reads A[0]
    stride_ar = tl.load(dims + 8)
    stride_be = tl.load(dims + 9)
    stride_bo = tl.load(dims + 10)
    scale = tl.load(scale_tab + site)

    ptrs = ptr_tab + site * 4
    w_ptr = tl.load(ptrs + 0).to(tl.pointer_type(DTYPE))
    src_ptr = tl.load(ptrs + 1).to(tl.pointer_type(DTYPE))
    a_ptr = tl.load(ptrs + 2).to(tl.pointer_type(DTYPE))
    b_ptr = tl.load(ptrs + 3).to(tl.pointer_type(DTYPE))

    offs_o = (tile // n_tiles_in) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    offs_i = (tile % n_tiles_in) * BLOCK_IN + tl.arange(0, BLOCK_IN)
    offs_r = tl.arange(0, R_PAD)
    o_mask = offs_o < OUT
    i_mask = offs_i < IN
    r_mask = offs_r < R
    b_tile = b_ptr + offs_o[:, None] * stride_bo + offs_r[None, :]  # [BLOCK_OUT, R_PAD]
    a_tile = a_ptr + offs_r[:, None] * stride_ar + offs_i[None, :]  # [R_PAD, BLOCK_IN]
    b_mask = o_mask[:, None] & r_mask[None, :]
    a_mask = r_mask[:, None] & i_mask[None, :]

    acc = tl.zeros([BLOCK_OUT, BLOCK_IN], dtype=tl.float32)
    for j in range(M):
        e = tl.load(ids_ptr + j)
        c = tl.load(coef_ptr + j).to(tl.float32)
        bv = tl.load(b_tile + e * stride_be, mask=b_mask, other=0.0)
        av = tl.load(a_tile + e * stride_ae, mask=a_mask, other=0.0)
        if UPCAST_DOT:  # interpreter only, see _launch
            bv = bv.to(tl.float32)
            av = av.to(tl.float32)
        # The coefficient multiplies the float32 product rather than B, so B is not rounded to
        # the weight dtype once more after scaling.
        acc += c * tl.dot(bv, av, input_precision=PRECISION)

    tile_mask = o_mask[:, None] & i_mask[None, :]
    src = tl.load(
        src_ptr + offs_o[:, None] * stride_s0 + offs_i[None, :] * stride_s1, mask=tile_mask, other=0.0
    )
    out = src.to(tl.float32) + scale * acc
    tl.store(w_ptr + offs_o[:, None] * stride_w0 + offs_i[None, :] * stride_w1, out.to(DTYPE), mask=tile_mask)


# Whether triton.jit gave us the interpreter (TRITON_INTERPRET set before triton was imported):
# asked of the kernel itself rather than re-parsing the environment variable.
_INTERPRETED = type(_merge_kernel).__name__ == "InterpretedFunction"


def _block_sizes(max_out: int, max_in: int, max_r: int) -> tuple[int, int, int]:
    """``(R_PAD, BLOCK_OUT, BLOCK_IN)`` shared by all sites of one launch (they are constexpr).

    ``tl.dot`` needs every dimension >= 16, hence the floors. A 64 x 128 tile keeps the float32
    accumulator at 64 registers per thread (4 warps) and stores 256-byte (bf16) rows; the
    ``B``/``A`` operand tiles are at most 64 x R_PAD and R_PAD x 128. Small layers get smaller
    tiles so they are not mostly masked.
    """
    r_pad = max(16, triton.next_power_of_2(max(max_r, 1)))
    block_out = max(16, min(64, triton.next_power_of_2(max(max_out, 1))))
    block_in = max(16, min(128, triton.next_power_of_2(max(max_in, 1))))
    return r_pad, block_out, block_in


def _check_sites(weights, sources, As, Bs, scales) -> None:
    n = len(weights)
    if not (len(As) == len(Bs) == len(scales) == n):
        raise ValueError(f"sites disagree: {n} weights, {len(As)} A, {len(Bs)} B, {len(scales)} scales")
    if sources is not None and len(sources) != n:
        raise ValueError(f"{len(sources)} sources for {n} weights")
    for i, (W, A, B) in enumerate(zip(weights, As, Bs)):
        if W.dim() != 2 or A.dim() != 3 or B.dim() != 3:
            raise ValueError(f"site {i}: W must be [out, in], A [E or 1, r, in], B [E, out, r]")
        out_f, in_f = W.shape
        if B.shape[1] != out_f or A.shape[2] != in_f or A.shape[1] != B.shape[2]:
            raise ValueError(f"site {i}: W {tuple(W.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)} disagree")
        if A.shape[0] not in (1, B.shape[0]):
            raise ValueError(f"site {i}: A has {A.shape[0]} experts, B {B.shape[0]}")
        if W.dtype not in _TL_DTYPE:
            raise ValueError(f"site {i}: weight dtype {W.dtype} unsupported; use one of {list(_TL_DTYPE)}")
        if A.dtype != W.dtype or B.dtype != W.dtype:
            raise ValueError(f"site {i}: W {W.dtype}, A {A.dtype}, B {B.dtype} must share a dtype")
        if A.device != W.device or B.device != W.device:
            raise ValueError(f"site {i}: W, A, B must be on one device")
        if sources is not None:
            S = sources[i]
            if S.shape != W.shape or S.dtype != W.dtype or S.device != W.device:
                raise ValueError(f"site {i}: source {tuple(S.shape)} {S.dtype} does not match W")


def merge_combination_triton(
    weights: list[torch.Tensor],
    sources: list[torch.Tensor] | None,
    As: list[torch.Tensor],
    Bs: list[torch.Tensor],
    scales: list[float],
    expert_ids: torch.Tensor,
    coefs: torch.Tensor,
) -> None:
    """Write ``weights[n] = src_n + scales[n] * sum_j coefs[j] Bs[n][e_j] As[n][e_j]`` in place.

    ``weights[n] [out_n, in_n]`` (any strides; the tensors themselves are updated),
    ``sources[n]`` like ``weights[n]`` or None (then ``src_n = weights[n]``),
    ``As[n] [E or 1, r_n, in_n]``, ``Bs[n] [E, out_n, r_n]``, ``expert_ids [m]`` int64 in
    ``[0, E)`` (unchecked on the device), ``coefs [m]`` any float dtype. ``m == 0`` copies the
    sources (if any) and otherwise does nothing.
    """
    _check_sites(weights, sources, As, Bs, scales)
    if expert_ids.dim() != 1 or coefs.shape != expert_ids.shape:
        raise ValueError(f"expert_ids {tuple(expert_ids.shape)} and coefs {tuple(coefs.shape)} must be [m]")
    if expert_ids.dtype != torch.int64:
        raise ValueError(f"expert_ids must be int64, got {expert_ids.dtype}")
    if not coefs.is_floating_point():
        raise ValueError(f"coefs must be floating point, got {coefs.dtype}")
    m = expert_ids.numel()
    if not weights or (m == 0 and sources is None):
        return

    device = weights[0].device
    expert_ids = expert_ids.to(device).contiguous()  # [m]
    coefs = coefs.to(device).contiguous()  # [m]

    by_dtype: dict[torch.dtype, list[int]] = {}
    for n, W in enumerate(weights):
        if W.device != device:
            raise ValueError(f"site {n} is on {W.device}, site 0 on {device}: one launch needs one device")
        if W.numel():
            by_dtype.setdefault(W.dtype, []).append(n)

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for dtype, sites in by_dtype.items():
            _launch(dtype, sites, weights, sources, As, Bs, scales, expert_ids, coefs, device)


def _launch(dtype, sites, weights, sources, As, Bs, scales, expert_ids, coefs, device) -> None:
    """One kernel launch over ``sites`` (all of ``dtype``)."""
    keep = []  # the tables hold raw pointers: keep contiguous copies alive through the launch
    ptr_rows, dim_rows, scale_row = [], [], []
    for n in sites:
        W = weights[n]
        S = W if sources is None else sources[n]
        A = As[n].contiguous()  # [E_A, r, in]
        B = Bs[n].contiguous()  # [E, out, r]
        keep += [A, B]
        out_f, in_f = W.shape
        ptr_rows.append([W.data_ptr(), S.data_ptr(), A.data_ptr(), B.data_ptr()])
        row = [0] * _NDIMS
        row[_OUT], row[_IN], row[_R] = out_f, in_f, A.shape[1]
        row[_SW0], row[_SW1] = W.stride()
        row[_SS0], row[_SS1] = S.stride()
        row[_SAE] = 0 if A.shape[0] == 1 else A.stride(0)
        row[_SAR], row[_SBE], row[_SBO] = A.stride(1), B.stride(0), B.stride(1)
        dim_rows.append(row)
        scale_row.append(float(scales[n]))

    max_out = max(weights[n].shape[0] for n in sites)
    max_in = max(weights[n].shape[1] for n in sites)
    max_r = max(r[_R] for r in dim_rows)
    r_pad, block_out, block_in = _block_sizes(max_out, max_in, max_r)
    max_tiles = max(triton.cdiv(r[_OUT], block_out) * triton.cdiv(r[_IN], block_in) for r in dim_rows)

    # The interpreter stores bfloat16 as uint16 and its tl.dot multiplies the bit patterns
    # (triton-lang/triton#11584, "not supported yet"). Under it, bf16 operands go to float32
    # first: exact (a bf16 product is exact in float32), so the result matches the GPU's bf16
    # tensor-core dot with float32 accumulation. On the GPU the native bf16 dot is kept.
    upcast = dtype == torch.bfloat16 and _INTERPRETED
    ptr_tab = torch.tensor(ptr_rows, dtype=torch.int64, device=device)  # [N, 4]
    dim_tab = torch.tensor(dim_rows, dtype=torch.int64, device=device)  # [N, _NDIMS]
    scale_tab = torch.tensor(scale_row, dtype=torch.float32, device=device)  # [N]
    _merge_kernel[(max_tiles, len(sites))](
        ptr_tab, dim_tab, scale_tab, expert_ids, coefs, expert_ids.numel(),
        DTYPE=_TL_DTYPE[dtype], NDIMS=_NDIMS, R_PAD=r_pad, BLOCK_OUT=block_out, BLOCK_IN=block_in,
        # float32 weights: exact products, not TF32 (whose ~1e-3 error would swamp float32 drift)
        PRECISION="ieee" if dtype == torch.float32 or upcast else "tf32",
        UPCAST_DOT=upcast,
    )  # fmt: skip
    del keep
