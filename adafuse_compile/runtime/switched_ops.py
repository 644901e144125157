"""Ops for a pre-gated group whose step is either fused or merged (the merge-switch rewrite).

Two custom ops, so the choice is made at run time from the actual tokens (never a recompile):

- ``adafuse::group_decide(idx, g, weights, As, Bs, scales, group)`` runs once per step before the
  group's sites. It decides this step's mode (see :class:`adafuse_compile.runtime.merge_state.SwitchedGroup`)
  and, if merged, switches the merged copies of *all* the group's weights to the step's decision
  in one call (``merge_switch_``/``merge_rebase_``: one Triton launch on CUDA). It returns a
  0-dim token that every site takes as input, which orders the sites after it in any compiler.
- ``adafuse::group_site_linear(x, W, b, A, B, idx, g, scale, token, group, site)`` is one site:
  a plain linear on the merged copy, or ``lora_moe_linear`` (the model's own weights) otherwise.

Both read their group's state from a registry by id (ops take no Python objects). The state is
owned by the compiled graph that uses it; the registry holds it weakly.

Both are tagged ``torch.Tag.cudagraph_unsafe``: their choice is Python run at every call (and
``group_decide`` reads the decision on the host), which a CUDA graph would replay frozen. Under
``mode="reduce-overhead"`` Inductor therefore runs them outside its CUDA graphs (it partitions
the graph around them, or skips CUDA graphs for it and logs why), and each step decides anew.
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn.functional as F

from ..kernels.lora_moe_linear import lora_moe_linear

__all__ = ["group_decide", "group_site_linear", "register_group"]

_GROUPS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count()


def register_group(state) -> int:
    """An id for ``state`` (a :class:`~adafuse_compile.runtime.merge_state.SwitchedGroup`); the caller keeps it alive."""
    gid = next(_NEXT_ID)
    _GROUPS[gid] = state
    return gid


def _state(group: int):
    state = _GROUPS.get(group)
    if state is None:
        raise RuntimeError(f"adafuse: switched group {group} no longer exists (its compiled graph was freed)")
    return state


@torch.library.custom_op("adafuse::group_decide", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def group_decide(
    idx: torch.Tensor,
    g: torch.Tensor,
    weights: list[torch.Tensor],
    As: list[torch.Tensor],
    Bs: list[torch.Tensor],
    scales: list[float],
    group: int,
) -> torch.Tensor:
    """Choose fused or merged for this step (``idx, g [T, k]``); merge the decision if merged."""
    _state(group).step(idx, g, weights, As, Bs, scales)
    return torch.zeros((), dtype=torch.int8, device=idx.device)


@group_decide.register_fake
def _(idx, g, weights, As, Bs, scales, group):
    return idx.new_zeros((), dtype=torch.int8)


@torch.library.custom_op("adafuse::group_site_linear", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def group_site_linear(
    x: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    idx: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    token: torch.Tensor,
    group: int,
    site: int,
) -> torch.Tensor:
    """One site of the group in the mode ``group_decide`` chose for this step."""
    state = _state(group)
    if state.use_merged:
        return F.linear(x, state.weight(site), b)
    return lora_moe_linear(x, W, b, A, B, idx, g, scale)


@group_site_linear.register_fake
def _(x, W, b, A, B, idx, g, scale, token, group, site):
    return x.new_empty((*x.shape[:-1], W.shape[0]))
