"""FuseMoLEPass: each verified MoLE site becomes one ``adafuse::lora_moe_linear`` call.

Before (a MoLA-style site, per-expert loop with masks)::

    y  = linear(x, W, b)
    w, i = topk(softmax(linear(x, R)), k); w = w / w.sum(-1)
    y  = y + (w * (i == 0)).sum(-1) * linear(linear(x, A0), B0) * s
    ...                                              # once per expert
    y  = y + (w * (i == E-1)).sum(-1) * linear(linear(x, A_{E-1}), B_{E-1}) * s

After::

    w, i = topk(softmax(linear(x, R)), k); w = w / w.sum(-1)   # the model's own routing, kept
    y  = lora_moe_linear_lists(x, W, b, [A_0, ..., A_{E-1}], [B_0, ..., B_{E-1}], i, w, s)

Only sites whose canonical form is proved (:mod:`.canonical`, :mod:`.verify`) are rewritten;
every other site is left exactly as it was, with the reason in the report. The rewritten site
reads the model's parameters at every call, so weight updates of any kind are seen; per-expert
parameter lists go to the op as lists, read in place, or, with ``freeze=True`` (the user
promises the weights do not change behind the compiler's back), are stacked once into cached
derived inputs (:mod:`.derived`). ``lowering="decomposed"`` emits the gathered form in plain
torch ops instead of the op (stacking per-expert lists in the graph).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import torch
import torch.fx as fx

from .canonical import Canonical, canonicalize
from .derived import StackedTensors, add_derived_input
from .graph_ops import fused_site
from .manager import DERIVED_INPUTS, GraphPass
from .sites import ancestors, find_sites, is_inplace, needs_gradients, node_value_meta, parameter_values, size_values

log = logging.getLogger("adafuse_compile")

__all__ = ["FuseMoLEPass", "SITE_META", "SiteReport", "remove_unused"]

SITE_META = "adafuse_site"  # node.meta key of a fused site's SiteReport (read by later passes)


@dataclasses.dataclass
class SiteReport:
    """What happened to one site (the rows of :func:`adafuse_compile.explain`)."""

    path: str
    status: Literal["fused", "folded", "left"]
    reason: str
    experts: int | None = None
    k: int | None = None
    rank: int | None = None
    gate: str | None = None
    scale: float | None = None


def _alias_group(node: fx.Node) -> set[fx.Node]:
    """``node`` and every value that is the same tensor through in-place ops (``y += t`` chains)."""
    root = node
    while is_inplace(root) and root.args and isinstance(root.args[0], fx.Node):
        root = root.args[0]
    group, stack = set(), [root]
    while stack:
        n = stack.pop()
        if n not in group:
            group.add(n)
            stack.extend(u for u in n.users if is_inplace(u) and u.args and u.args[0] is n)
    return group


def _is_size_assert(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (
        torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default)


def _computed_only_from(node: fx.Node, replaced: set[fx.Node]) -> bool:
    """Whether every path from ``node`` back to the graph inputs passes through ``replaced``."""
    stack, seen = list(node.all_input_nodes), set()
    while stack:
        n = stack.pop()
        if n in replaced or n in seen:
            continue
        if n.op == "placeholder" or n.op == "get_attr":
            return False
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return True


def remove_unused(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase the replaced sites' nodes that nothing uses any more.

    Not ``Graph.eliminate_dead_code``: it treats ``call_method`` nodes as pure, so it would
    drop a ``mask.scatter_(...)`` whose only effect is the mutation. An in-place node goes only
    with its whole alias group (``result += t_1; result += t_2``), when every member is a
    replaced node and nothing outside the group uses any of them.
    """
    candidates = set(nodes)
    # Runtime asserts on the sizes of data-dependent ops (nonzero in token dispatch) are impure
    # nodes that would keep the replaced dispatch alive; they check only values the replaced
    # nodes computed, so they go with them.
    for node in list(gm.graph.nodes):
        if _is_size_assert(node) and node.all_input_nodes and _computed_only_from(node, candidates):
            candidates.add(node)
            candidates.update(ancestors(node, stop=candidates))
    nodes = [n for n in gm.graph.nodes if n in candidates]  # graph order
    changed = True
    while changed:
        changed = False
        for node in reversed(nodes):
            if node not in candidates or node.users or (node.is_impure() and not _is_size_assert(node)):
                continue
            if is_inplace(node):
                group = _alias_group(node)
                if not group <= candidates or any(u not in group for m in group for u in m.users):
                    continue
            gm.graph.erase_node(node)
            candidates.discard(node)
            changed = True


class FuseMoLEPass(GraphPass):
    """Rewrite every verified MoLE site into one fused op; leave (and report) the rest."""

    name = "fuse_mole"

    def __init__(self, lowering: str = "op", strict: bool = False, freeze: bool = False) -> None:
        if lowering not in ("op", "decomposed"):
            raise ValueError(f"lowering must be 'op' or 'decomposed', got {lowering!r}")
        self.lowering, self.strict, self.freeze = lowering, strict, freeze
        self.reports: list[SiteReport] = []

    def __call__(self, gm: fx.GraphModule, example_inputs=None) -> None:
        sites, rejected = find_sites(gm, example_inputs)
        params = parameter_values(gm, example_inputs)
        self.reports = [SiteReport(r.path, "left", r.reason) for r in rejected]
        for r in rejected:
            log.info("adafuse: left %s: %s", r.path or "<root>", r.reason)
        replaced: list[fx.Node] = []
        renamed: dict[fx.Node, fx.Node] = {}  # a fused site's output -> the fused node
        for site in sites:
            if renamed:  # a site reading an earlier site's output reads its fused node now
                site = dataclasses.replace(site, x=renamed.get(site.x, site.x),
                                           externals=[renamed.get(e, e) for e in site.externals])
            if needs_gradients(site, params):
                reason = ("gradients are required (the fused op has no autograd formula yet); "
                          "compile under torch.no_grad() or torch.inference_mode() to fuse")
                self.reports.append(SiteReport(site.name, "left", reason))
                continue
            try:
                canon, reason = canonicalize(gm, site, params, size_values(gm, example_inputs))
            except Exception as e:  # probing is the step that runs arbitrary model code
                if self.strict:
                    raise
                log.warning("adafuse: left %s: probing it raised %s", site.name, type(e).__name__, exc_info=True)
                canon, reason = None, f"probing the site raised {type(e).__name__}: {e}"
            if canon is None:
                self.reports.append(SiteReport(site.name, "left", reason))
                log.info("adafuse: left %s: %s", site.name, reason)
                continue
            if self.freeze:
                self._stack_expert_lists(gm, canon, example_inputs)
            report = SiteReport(site.name, "fused", reason,
                                canon.experts, canon.k, canon.rank, canon.gate, canon.scale)
            fused = self._rewrite(gm, site, canon, self.lowering)
            fused.meta[SITE_META] = report
            renamed[site.out] = fused
            replaced.extend(site.nodes)
            self.reports.append(report)
            log.info("adafuse: fused %s (E=%d, k=%d, r=%d, %s)", site.name, canon.experts, canon.k,
                     canon.rank, canon.gate)
        remove_unused(gm, replaced)

    @staticmethod
    def _stack_expert_lists(gm: fx.GraphModule, canon: Canonical, example_inputs) -> None:
        """Per-expert matrices (``ModuleList``s) stacked once, as derived inputs, not per call
        (``freeze=True`` only: a ``.data`` write to an expert would not be seen).

        Measured (medium model, MoLA-style, batch-1 decode under Inductor): stacking in the
        graph copies every expert of every site per step and cost as much as the eager-style
        dense loop it replaces (1.33x vs 1.32x the backbone).
        """
        if example_inputs is None:
            return  # parameters are attributes: stack in the graph
        position = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        if canon.A_layout == "list" and all(a in position for a in canon.A):
            name = f"adafuse_stacked_A_{len(gm.meta.get(DERIVED_INPUTS, []))}"
            canon.A = add_derived_input(gm, StackedTensors(tuple(position[a] for a in canon.A)), name)
            canon.A_layout = "eri"
        if canon.B_layout == "list" and all(b in position for b in canon.B):
            name = f"adafuse_stacked_B_{len(gm.meta.get(DERIVED_INPUTS, []))}"
            canon.B = add_derived_input(gm, StackedTensors(tuple(position[b] for b in canon.B)), name)
            canon.B_layout = "eor"

    @staticmethod
    def _rewrite(gm: fx.GraphModule, site, canon: Canonical, lowering: str) -> fx.Node:
        out_val = node_value_meta(site.out)
        out_dtype = out_val.dtype if out_val is not None else None
        with gm.graph.inserting_before(site.out):
            fused = gm.graph.call_function(
                fused_site, (site.x, site.weight, site.bias, canon.A, canon.B, canon.idx, canon.g),
                dict(scale=canon.scale, A_layout=canon.A_layout, B_layout=canon.B_layout, out_dtype=out_dtype,
                     lowering=lowering))
        fused.meta.update(site.out.meta)
        site.out.replace_all_uses_with(fused)
        return fused
