"""FoldStaticLoRAPass: a static LoRA site (one adapter, no router) becomes a plain linear.

Before (PEFT's ``LoraLayer``)::

    out = linear(x, W, b) + linear(linear(dropout(x), A), B) * s

After::

    out = linear(x, W_folded, b)        # W_folded = W + s * B @ A, a new graph input

``W_folded`` is not baked into the graph: it is a derived input (:mod:`.derived`) that the
backend computes from the live ``W``, ``A`` and ``B`` before each call, cached by their identity,
version counter and storage. Loading new adapter weights (``copy_``, ``load_state_dict``) bumps
the version, so the next call refolds; a write through ``.data`` changes none of these, which is
why the backend runs this pass only with ``freeze=True`` (then :func:`adafuse_compile.refresh`).

Needs the graph's parameters as inputs (Dynamo graphs); on a ``symbolic_trace`` graph, whose
parameters are attributes, the site is left to :class:`FuseMoLEPass`.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.fx as fx
import torch.nn.functional as F

from .canonical import canonicalize, stack_experts
from .fuse_mole import SiteReport, remove_unused
from .derived import DerivedInput, add_derived_input
from .manager import DERIVED_INPUTS, GraphPass
from .sites import find_sites, has_routing, needs_gradients, parameter_values, size_values

log = logging.getLogger("adafuse_compile")

__all__ = ["FoldStaticLoRAPass", "FoldedWeights"]


@dataclasses.dataclass
class FoldedWeights(DerivedInput):
    """``W + s * B @ A`` from the inputs at ``positions`` = (W, A..., B...)."""

    n_A: int = 1
    A_layout: str = "list"
    B_layout: str = "list"
    scale: float = 1.0

    def compute(self, W, *AB):
        values = dict(enumerate(AB))
        A_keys, B_keys = list(range(self.n_A)), list(range(self.n_A, len(AB)))
        A, B = stack_experts(A_keys if self.A_layout == "list" else A_keys[0], self.A_layout,
                             B_keys if self.B_layout == "list" else B_keys[0], self.B_layout, values)
        if A.dtype == W.dtype and B.dtype == W.dtype:
            return torch.addmm(W, B[0], A[0], alpha=self.scale)  # W + s * B_0 @ A_0
        # Adapters in another dtype (PEFT keeps float32 adapters on a bf16 base): the sum in
        # float32, rounded once to the weight's dtype.
        wide = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
        return torch.addmm(W.to(wide), B[0].to(wide), A[0].to(wide), alpha=self.scale).to(W.dtype)


class FoldStaticLoRAPass(GraphPass):
    """Fold every verified static LoRA site into its base weight (exact, zero runtime cost)."""

    name = "fold_static_lora"

    def __init__(self) -> None:
        self.reports: list[SiteReport] = []

    def __call__(self, gm: fx.GraphModule, example_inputs=None) -> None:
        self.reports = []
        if example_inputs is None:
            return  # parameters are attributes: nothing to take as a live input
        sites, _ = find_sites(gm, example_inputs)
        params = parameter_values(gm, example_inputs)
        position = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        replaced: list[fx.Node] = []
        for site in sites:
            if needs_gradients(site, params) or has_routing(site) or site.externals:
                continue  # FuseMoLEPass probes and reports these; no need to probe them twice
            canon, _ = canonicalize(gm, site, params, size_values(gm, example_inputs))
            if canon is None or canon.gate != "static":
                continue
            A = canon.A if isinstance(canon.A, list) else [canon.A]
            B = canon.B if isinstance(canon.B, list) else [canon.B]
            if not all(n in position for n in (site.weight, *A, *B)):
                continue
            folder = FoldedWeights(tuple(position[n] for n in (site.weight, *A, *B)), n_A=len(A),
                                   A_layout=canon.A_layout, B_layout=canon.B_layout, scale=canon.scale)
            name = f"adafuse_folded_{len(gm.meta.get(DERIVED_INPUTS, []))}"
            folded = add_derived_input(gm, folder, name, like=site.weight)
            with gm.graph.inserting_before(site.out):
                linear = gm.graph.call_function(F.linear, (site.x, folded, site.bias))
            linear.meta.update(site.out.meta)
            site.out.replace_all_uses_with(linear)
            replaced.extend(site.nodes)
            self.reports.append(SiteReport(site.name, "folded", "static LoRA folded into the weight "
                                           "(refolded when W, A or B change)", 1, 1, canon.rank, "static",
                                           canon.scale))
            log.info("adafuse: folded %s (r=%d)", site.name, canon.rank)
        remove_unused(gm, replaced)
