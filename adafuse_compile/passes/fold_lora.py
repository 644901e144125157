"""FoldStaticLoRAPass: a static LoRA site (one adapter, no router) becomes a plain linear.

Before (PEFT's ``LoraLayer``)::

    out = linear(x, W, b) + linear(linear(dropout(x), A), B) * s

After::

    out = linear(x, W_folded, b)        # W_folded = W + s * B @ A, a new graph input

``W_folded`` is not baked into the graph: it is an extra input that the backend computes from
the live ``W``, ``A`` and ``B`` before each call and caches by their identity and version
counter (:class:`FoldedWeights`). Loading new adapter weights (``copy_``, ``load_state_dict``)
bumps the version, so the next call refolds: never stale weights, and no cost per call
otherwise (one version check per tensor).

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
from .fuse_mole import SiteReport, _remove_unused
from .manager import DERIVED_INPUTS, GraphPass
from .sites import find_sites, parameter_values

log = logging.getLogger("adafuse_compile")

__all__ = ["FoldStaticLoRAPass", "FoldedWeights"]


@dataclasses.dataclass
class FoldedWeights:
    """Computes ``W + s * B @ A`` from the graph's inputs, refolding only when they change."""

    weight: int  # input positions
    A: tuple[int, ...]
    B: tuple[int, ...]
    A_layout: str
    B_layout: str
    scale: float
    _tensors: list = dataclasses.field(default_factory=list)  # the inputs last folded (held, not ids:
    _versions: tuple = ()  # a freed tensor's id can come back for a new one)
    _value: torch.Tensor | None = None

    def __call__(self, inputs) -> torch.Tensor:
        tensors = [inputs[self.weight], *(inputs[i] for i in self.A), *(inputs[i] for i in self.B)]
        versions = tuple(t._version for t in tensors)
        same = len(tensors) == len(self._tensors) and all(a is b for a, b in zip(tensors, self._tensors))
        if not same or versions != self._versions:
            W = tensors[0]
            values = dict(enumerate(tensors))
            A_nodes = list(range(1, 1 + len(self.A)))
            B_nodes = list(range(1 + len(self.A), len(tensors)))
            A, B = stack_experts(A_nodes if self.A_layout == "list" else A_nodes[0], self.A_layout,
                                 B_nodes if self.B_layout == "list" else B_nodes[0], self.B_layout, values)
            with torch.no_grad():
                self._value = torch.addmm(W, B[0], A[0], alpha=self.scale)  # W + s * B_0 @ A_0
            self._tensors, self._versions = tensors, versions
        return self._value


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
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        position = {n: i for i, n in enumerate(placeholders)}
        derived = gm.meta.setdefault(DERIVED_INPUTS, [])
        replaced: list[fx.Node] = []
        for site in sites:
            if torch.is_grad_enabled() and any(params[p].requires_grad for p in (site.weight, *site.params)):
                continue  # FuseMoLEPass reports why
            canon, _ = canonicalize(gm, site, params)
            if canon is None or canon.gate != "static":
                continue
            A = canon.A if isinstance(canon.A, list) else [canon.A]
            B = canon.B if isinstance(canon.B, list) else [canon.B]
            if not all(n in position for n in (site.weight, *A, *B)):
                continue
            folder = FoldedWeights(position[site.weight], tuple(position[n] for n in A),
                                   tuple(position[n] for n in B), canon.A_layout, canon.B_layout, canon.scale)
            with gm.graph.inserting_after(placeholders[-1]):
                folded = gm.graph.placeholder(f"adafuse_folded_{len(derived)}")
            placeholders.append(folded)
            # Shape and dtype only: Dynamo reads "grapharg" to know which inputs it passes.
            folded.meta.update({k: v for k, v in site.weight.meta.items() if k in ("example_value", "val")})
            derived.append(folder)
            with gm.graph.inserting_before(site.out):
                linear = gm.graph.call_function(F.linear, (site.x, folded, site.bias))
            linear.meta.update(site.out.meta)
            site.out.replace_all_uses_with(linear)
            replaced.extend(site.nodes)
            self.reports.append(SiteReport(site.name, "folded", "static LoRA folded into the weight "
                                           "(refolded when W, A or B change)", 1, 1, canon.rank, "static",
                                           canon.scale))
            log.info("adafuse: folded %s (r=%d)", site.name, canon.rank)
        _remove_unused(gm, replaced)
