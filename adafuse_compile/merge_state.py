"""Runtime state of merged weights: which decision is merged, and when to re-base.

The fused merge-switch ops are stateless; a group of sites whose weights hold a merged decision
needs someone to remember that decision, skip redundant switches, and bound rounding drift.
"""

from __future__ import annotations

import torch

from .kernels.merge_switch import merge_rebase_, merge_switch_

__all__ = ["MergedGroup", "default_rebase_every"]


def default_rebase_every(dtype: torch.dtype) -> int:
    """Switches between re-bases so that drift stays below ~1.5e-5 * |W|.

    One incremental switch adds at most about one unit roundoff ``u`` of ``|W|`` (see
    :mod:`adafuse_compile.kernels.merge_switch`). float32 (``u = 6e-8``): 256 switches ->
    ~1.5e-5. For 16-bit weights one switch already costs 4e-3 (bf16) or 5e-4 (fp16), so they
    re-base every time, which moves the same bytes as a switch.
    """
    return 256 if dtype in (torch.float32, torch.float64) else 1


class MergedGroup:
    """Sites driven by one decision, with that decision merged into their weights.

    ``weights`` are the live tensors the model computes with (modified in place). With
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
    ) -> None:
        if not weights:
            raise ValueError("MergedGroup needs at least one site")
        if rebase_every is not None and rebase_every < 1:
            raise ValueError(f"rebase_every must be >= 1, got {rebase_every}")
        self.weights, self.As, self.Bs, self.scales = list(weights), list(As), list(Bs), list(scales)
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
