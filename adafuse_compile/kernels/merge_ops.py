"""The paper's SGMM: merge one decision's experts into the weights of N sites in one call.

Two in-place ops over a group of sites that one gate decision drives (pre-gating):

- ``adafuse::merge_switch_`` goes from decision ``old`` to decision ``new`` incrementally:
  ``W_n += s_n * sum_e (g_new[e] - g_old[e]) B_n[e] A_n[e]``, touching only the experts whose
  coefficient changed (an expert kept with the same weight costs nothing; an unchanged decision
  leaves the weights alone). Fast, but every switch rounds ``W`` once more (see *Drift*).
- ``adafuse::merge_rebase_`` writes ``W_n = base_n + s_n * sum_k g[k] B_n[idx[k]] A_n[idx[k]]``
  from a pristine copy: one rounding, no drift, and the same bytes moved as a switch (read one
  ``[out, in]`` matrix, write one), at the price of keeping the pristine copy in memory.

*Drift.* With unit roundoff ``u`` of the weight dtype, one merge or switch is off the exact
update by about ``u/2 * |W'| + u * |delta|`` per element (the final store, plus the 16-bit
rounding of the coefficient-scaled ``B``; the product itself accumulates in float32). Incremental
switches add up: after ``n`` of them the bound is ``n`` times that, ~``n * 6e-8 * |W|`` in
float32 but ~``n * 4e-3 * |W|`` in bfloat16. :class:`adafuse_compile.runtime.merge_state.MergedGroup`
therefore re-bases from the pristine copy every ``rebase_every`` switches (every switch for 16-bit
weights, where re-basing moves the same bytes anyway). tests/kernels/test_merge_switch.py checks
both bounds over 1,000 (float32) and 300 (bfloat16) switches.

CPU: one ``addmm`` per site over the stacked changed experts (rank ``m*r`` update).
CUDA: one Triton launch for all sites (:mod:`adafuse_compile.kernels.merge_ops_triton`).
"""

from __future__ import annotations

import torch

__all__ = ["merge_switch_", "merge_rebase_", "switch_coefficients"]


def _check_group(weights, As, Bs, scales, sources=None) -> None:
    n = len(weights)
    torch._check(
        len(As) == n and len(Bs) == n and len(scales) == n,
        lambda: f"sites disagree: {n} weights, {len(As)} A, {len(Bs)} B, {len(scales)} scales",
    )
    if sources is not None:
        torch._check(len(sources) == n, lambda: f"{len(sources)} bases for {n} weights")
    for i, (W, A, B) in enumerate(zip(weights, As, Bs)):
        _check_site(i, W, A, B, Bs[0].shape[0], None if sources is None else sources[i])


def _check_site(i, W, A, B, E, source) -> None:
    """One site of a group (a function, so the messages bind this site's values)."""
    torch._check(W.dim() == 2 and A.dim() == 3 and B.dim() == 3, lambda: f"site {i}: bad ranks")
    torch._check(
        B.shape[1] == W.shape[0] and A.shape[2] == W.shape[1] and A.shape[1] == B.shape[2],
        lambda: f"site {i}: W {tuple(W.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)} disagree",
    )
    torch._check(A.shape[0] in (1, B.shape[0]), lambda: f"site {i}: A has {A.shape[0]} experts")
    torch._check(B.shape[0] == E, lambda: "all sites of a group need the same E")
    torch._check(A.dtype == W.dtype and B.dtype == W.dtype, lambda: f"site {i}: dtypes differ")
    if source is not None:
        torch._check(source.shape == W.shape, lambda: f"site {i}: base shape differs")


def _check_decision(idx, g, name) -> None:
    torch._check(idx.dim() == 1 and g.shape == idx.shape, lambda: f"{name}: idx, g must be [k]")
    torch._check(idx.dtype == torch.int64, lambda: f"{name}: idx must be int64, got {idx.dtype}")


def switch_coefficients(old_idx, old_g, new_idx, new_g, num_experts: int):
    """Experts whose merged weight changes between two decisions, and by how much.

    Returns ``(expert_ids [m], coefs [m])`` in float32 with duplicates summed and unchanged
    experts dropped, so a switch touches only what changed.
    """
    coef = torch.zeros(num_experts, dtype=torch.float32, device=new_g.device)
    coef.index_add_(0, new_idx, new_g.float()).index_add_(0, old_idx, -old_g.float())
    expert_ids = coef.nonzero().view(-1)
    return expert_ids, coef[expert_ids]


def _merge_combination_torch(weights, sources, As, Bs, scales, expert_ids, coefs) -> None:
    """``W_n = src_n + s_n * sum_j coefs[j] B_n[e_j] A_n[e_j]`` as one rank-``m*r`` addmm per site."""
    m = expert_ids.numel()
    for n, (W, A, B, s) in enumerate(zip(weights, As, Bs, scales)):
        src = W if sources is None else sources[n]
        if m == 0:
            if src is not W:
                W.copy_(src)
            continue
        out_f, in_f = W.shape
        r = B.shape[2]
        B_sel = B.index_select(0, expert_ids) * coefs.to(B.dtype)[:, None, None]  # [m, out, r]
        if A.shape[0] == 1:  # shared A: sum_j c_j B_j A = (sum_j c_j B_j) A, a rank-r update
            B_cat, A_cat = B_sel.sum(0), A[0]
        else:
            B_cat = B_sel.permute(1, 0, 2).reshape(out_f, m * r)
            A_cat = A.index_select(0, expert_ids).reshape(m * r, in_f)
        if src is W:
            W.addmm_(B_cat, A_cat, alpha=s)
        else:
            torch.addmm(src, B_cat, A_cat, alpha=s, out=W)


def _launch(weights, sources, As, Bs, scales, expert_ids, coefs) -> None:
    if weights and weights[0].is_cuda:
        from .merge_ops_triton import merge_combination_triton  # imports triton only on GPU

        merge_combination_triton(weights, sources, As, Bs, scales, expert_ids, coefs)
    else:
        _merge_combination_torch(weights, sources, As, Bs, scales, expert_ids, coefs)


@torch.library.custom_op("adafuse::merge_switch_", mutates_args=("weights",))
def merge_switch_(
    weights: list[torch.Tensor],
    As: list[torch.Tensor],
    Bs: list[torch.Tensor],
    scales: list[float],
    old_idx: torch.Tensor,
    old_g: torch.Tensor,
    new_idx: torch.Tensor,
    new_g: torch.Tensor,
) -> None:
    """Switch every site's merged experts from ``(old_idx, old_g)`` to ``(new_idx, new_g)``.

    A decision is ``idx [k]`` (int64), ``g [k]``; ``k == 0`` means "nothing merged", so the
    first merge is a switch from the empty decision and unmerging a switch to it.
    """
    _check_group(weights, As, Bs, scales)
    _check_decision(old_idx, old_g, "old")
    _check_decision(new_idx, new_g, "new")
    if not weights:
        return
    ids, coefs = switch_coefficients(old_idx, old_g, new_idx, new_g, Bs[0].shape[0])
    _launch(weights, None, As, Bs, scales, ids, coefs)


@merge_switch_.register_fake
def _(weights, As, Bs, scales, old_idx, old_g, new_idx, new_g):
    _check_group(weights, As, Bs, scales)


@torch.library.custom_op("adafuse::merge_rebase_", mutates_args=("weights",))
def merge_rebase_(
    weights: list[torch.Tensor],
    bases: list[torch.Tensor],
    As: list[torch.Tensor],
    Bs: list[torch.Tensor],
    scales: list[float],
    idx: torch.Tensor,
    g: torch.Tensor,
) -> None:
    """Write ``W_n = base_n + delta_n(idx, g)`` for every site: a merge with no drift."""
    _check_group(weights, As, Bs, scales, bases)
    _check_decision(idx, g, "decision")
    if not weights:
        return
    empty = idx[:0]
    ids, coefs = switch_coefficients(empty, g[:0], idx, g, Bs[0].shape[0])
    _launch(weights, bases, As, Bs, scales, ids, coefs)


@merge_rebase_.register_fake
def _(weights, bases, As, Bs, scales, idx, g):
    _check_group(weights, As, Bs, scales, bases)
