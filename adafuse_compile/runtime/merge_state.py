"""Runtime state of merged weights: which decision is merged, and when to re-base.

The fused merge-switch ops are stateless; a group of sites whose weights hold a merged decision
needs someone to remember that decision, skip redundant switches, and bound rounding drift.
"""

from __future__ import annotations

import threading
import weakref

import torch

from . import epoch
from .cost_model import CostModel
from ..kernels.merge_ops import merge_rebase_, merge_switch_

__all__ = ["MergedGroup", "SwitchedGroup", "default_rebase_every"]


def default_rebase_every(dtype: torch.dtype) -> int:
    """Switches between re-bases so that drift stays below ~1.5e-5 * |W|.

    One incremental switch adds at most about one unit roundoff ``u`` of ``|W|`` (see
    :mod:`adafuse_compile.kernels.merge_ops`). float32 (``u = 6e-8``): 256 switches ->
    ~1.5e-5. For 16-bit weights one switch already costs 4e-3 (bf16) or 5e-4 (fp16), so they
    re-base every time, which moves the same bytes as a switch.
    """
    return 256 if dtype in (torch.float32, torch.float64) else 1


class MergedGroup:
    """Sites driven by one decision, with that decision merged into their weights.

    ``weights`` are the live tensors the model computes with (modified in place). With
    ``pristine`` given, those unmerged weights are used to re-base (and must not change); else with
    ``keep_pristine=True`` (default) a copy of the unmerged weights is kept and used to re-base
    every ``rebase_every`` switches, so the error never exceeds ``rebase_every`` switches' worth
    of rounding, however long the run. With ``keep_pristine=False`` memory is saved and the
    drift grows with the number of switches; :attr:`switches_since_rebase` tells how many.
    """

    def __init__(
        self,
        weights: list[torch.Tensor],
        As: list[torch.Tensor],
        Bs: list[torch.Tensor],
        scales: list[float],
        *,
        keep_pristine: bool = True,
        rebase_every: int | None = None,
        pristine: list[torch.Tensor] | None = None,
    ) -> None:
        if not weights:
            raise ValueError("MergedGroup needs at least one site")
        if rebase_every is not None and rebase_every < 1:
            raise ValueError(f"rebase_every must be >= 1, got {rebase_every}")
        self.weights, self.As, self.Bs, self.scales = list(weights), list(As), list(Bs), list(scales)
        if pristine is not None:  # the caller's unmerged weights (e.g. the model's own): not copied
            self.pristine = list(pristine)
        else:
            self.pristine = [w.detach().clone() for w in weights] if keep_pristine else None
        self.rebase_every = rebase_every or default_rebase_every(weights[0].dtype)
        device = weights[0].device
        self.idx = torch.empty(0, dtype=torch.int64, device=device)
        self.g = torch.empty(0, dtype=torch.float32, device=device)
        self.switches_since_rebase = 0

    def switch(self, idx: torch.Tensor, g: torch.Tensor) -> bool:
        """Merge decision ``(idx [k], g [k])`` in place of the current one.

        Returns ``False`` when the decision is already merged (nothing is done).
        """
        idx = idx.reshape(-1).to(torch.int64)
        g = g.reshape(-1).to(torch.float32)
        if torch.equal(idx, self.idx) and torch.equal(g, self.g):
            return False
        with torch.no_grad():
            if self.pristine is not None and self.switches_since_rebase + 1 >= self.rebase_every:
                merge_rebase_(self.weights, self.pristine, self.As, self.Bs, self.scales, idx, g)
                self.switches_since_rebase = 0
            else:
                merge_switch_(self.weights, self.As, self.Bs, self.scales, self.idx, self.g, idx, g)
                self.switches_since_rebase += 1
        self.idx, self.g = idx.clone(), g.clone()
        return True

    def unmerge(self) -> None:
        """Return the weights to the backbone (exactly, when a pristine copy is kept)."""
        if self.pristine is not None:
            with torch.no_grad():
                for w, p in zip(self.weights, self.pristine):
                    w.copy_(p)
            self.idx, self.g = self.idx[:0], self.g[:0]
            self.switches_since_rebase = 0
        else:
            self.switch(self.idx[:0], self.g[:0])


class _PerThread(threading.local):
    """A switched group's state for one thread: two threads running the same compiled graph each
    merge into their own copies (measured cost: none per step; memory: one copy per thread)."""

    def __init__(self) -> None:
        self.merged: MergedGroup | None = None
        self.sources: tuple = ()
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.switch_rate = 1.0  # until observed: assume every step brings a new decision
        self.use_merged = False
        self.merged_steps = 0


class SwitchedGroup:
    """A pre-gated group at run time: per step, fused or merged, and the merged copies.

    ``strategy`` is ``"merge"`` (merge whenever one decision covers the step) or ``"auto"``
    (also ask the cost model, with the observed rate of decision changes). The model's weights
    are never modified: the decision is merged into copies (made at the first merged step, so a
    group that never merges costs no memory), re-based from the model's weights; copies made
    from weights that have since changed (new tensors, in-place updates, or a call of
    :func:`adafuse_compile.refresh` after writes through ``.data``) are rebuilt. The state is per
    thread; one group object serves every graph compiled for the same weights (:meth:`shared`),
    so recompiling does not add copies.
    """

    _shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def __init__(self, strategy: str, cost: CostModel | None) -> None:
        if strategy not in ("merge", "auto") or (strategy == "auto" and cost is None):
            raise ValueError(f"strategy must be 'merge', or 'auto' with a cost model, got {strategy!r}")
        self.strategy, self.cost = strategy, cost
        self._local = _PerThread()

    @classmethod
    def shared(cls, strategy: str, cost: CostModel | None, weights: list[torch.Tensor]) -> "SwitchedGroup":
        """The group for these weights (by identity) and strategy, made once per process."""
        key = (strategy, *(id(w) for w in weights))
        group = cls._shared.get(key)
        if group is None:
            group = cls._shared[key] = cls(strategy, cost)
        return group

    @property
    def merged(self) -> MergedGroup | None:
        return self._local.merged

    @property
    def use_merged(self) -> bool:
        return self._local.use_merged

    @property
    def merged_steps(self) -> int:
        return self._local.merged_steps

    @property
    def switch_rate(self) -> float:
        return self._local.switch_rate

    def step(self, idx: torch.Tensor, g: torch.Tensor, weights, As, Bs, scales) -> None:
        """Decide this step's mode from the decision ``idx, g [T, k]``; merge it if merged."""
        local = self._local
        row = self._common_row(idx, g)
        if row is not None:
            self._observe(row)
        local.use_merged = row is not None and (self.strategy == "merge" or self._merged_is(row)
                                                or self.cost.merge_pays(idx.shape[0], local.switch_rate))
        if local.use_merged:
            local.merged_steps += 1
            self._merged_group(weights, As, Bs, scales).switch(*row)

    def weight(self, site: int) -> torch.Tensor:
        return self._local.merged.weights[site]

    @staticmethod
    def _common_row(idx, g):
        """The decision ``(idx [k], g [k])`` if every token of the step has it, else None."""
        if idx.shape[0] == 0 or not (bool((idx == idx[:1]).all()) and bool((g == g[:1]).all())):
            return None
        return idx[0].to(torch.int64), g[0].to(torch.float32)

    def _observe(self, row) -> None:
        """Running rate of steps whose (common) decision differs from the last one seen."""
        local = self._local
        changed = local.last is None or not (torch.equal(row[0], local.last[0]) and torch.equal(row[1], local.last[1]))
        local.switch_rate += (float(changed) - local.switch_rate) / 16  # ~16-step memory
        local.last = row

    def _merged_is(self, row) -> bool:
        merged = self._local.merged
        return merged is not None and torch.equal(merged.idx, row[0]) and torch.equal(merged.g, row[1])

    def _merged_group(self, weights, As, Bs, scales) -> MergedGroup:
        local = self._local
        sources = (epoch.current(), *((id(t), t._version, t.data_ptr()) for t in (*weights, *As, *Bs)))
        if local.merged is None or sources != local.sources:
            copies = [w.detach().clone() for w in weights]
            local.merged = MergedGroup(copies, [a.detach() for a in As], [b.detach() for b in Bs], scales,
                                       pristine=[w.detach() for w in weights])
            local.sources = sources
        return local.merged
