"""MergeSwitchPass: the fused sites of one pre-gated decision become a group that merges or fuses.

Runs after :class:`~.fuse_mole.FuseMoLEPass`. Fused sites whose decision was made elsewhere (a
shared pre-gate: their ``idx, g`` are the same graph nodes) form one group. Before::

    idx, g = pregate(embeds)
    y_1 = fused_site(x_1, W_1, b_1, A_1, B_1, idx, g, scale=s_1, ...)
    ...
    y_N = fused_site(x_N, W_N, b_N, A_N, B_N, idx, g, scale=s_N, ...)

After (``strategy`` ``"merge"`` or ``"auto"``)::

    token = group_decision(idx, g, weights=[W_1..W_N], As=[A_1..A_N], Bs=[B_1..B_N], ..., group=gid)
    y_1 = group_site(x_1, W_1, b_1, A_1, B_1, idx, g, scale=s_1, ..., token=token, group=gid, site=0)
    ...

``group_decision`` picks the step's mode at run time (merged needs one decision for every token
of the step; ``"auto"`` also asks :mod:`adafuse_compile.runtime.cost_model`), and merges the whole group
in one call; each ``group_site`` is a plain linear on the merged copy or the fused op. With
``strategy="fused"`` the graph is left as the fusion pass made it; the group is still reported.
"""

from __future__ import annotations

import dataclasses
import logging

import torch.fx as fx

from ..runtime.cost_model import CostModel, GroupShape
from ..runtime.switched_ops import register_group
from ..runtime.merge_state import SwitchedGroup
from .fuse_mole import SITE_META
from .graph_ops import fused_site, group_decision, group_site, is_call
from .manager import KEEPALIVE, GraphPass
from .sites import node_value_meta, parameter_values

log = logging.getLogger("adafuse_compile")

__all__ = ["GroupReport", "MergeSwitchPass"]


@dataclasses.dataclass
class GroupReport:
    """One decision and the sites it drives, with the strategy and the cost model's estimate."""

    decision: str
    sites: list[str]
    strategy: str
    estimate: str


class MergeSwitchPass(GraphPass):
    """Group the fused sites of each shared decision; under ``merge``/``auto``, make them switchable."""

    name = "merge_switch"

    def __init__(self, strategy: str = "fused") -> None:
        if strategy not in ("auto", "fused", "merge"):
            raise ValueError(f"strategy must be 'auto', 'fused' or 'merge', got {strategy!r}")
        self.strategy = strategy
        self.reports: list[GroupReport] = []

    def __call__(self, gm: fx.GraphModule, example_inputs=None) -> None:
        self.reports = []
        groups: dict[tuple[fx.Node, fx.Node], list[fx.Node]] = {}
        for node in gm.graph.nodes:
            report = node.meta.get(SITE_META)
            if is_call(node, fused_site) and report and report.gate == "pre-gated":
                groups.setdefault((node.args[5], node.args[6]), []).append(node)  # (idx, g)
        for (idx, g), nodes in groups.items():
            cost = CostModel(self._shape(nodes))
            paths = [n.meta[SITE_META].path for n in nodes]
            self.reports.append(GroupReport(f"{idx.name}, {g.name}", paths, self.strategy, cost.describe()))
            log.info("adafuse: group of %d sites on decision (%s, %s), strategy %s: %s", len(nodes), idx.name,
                     g.name, self.strategy, cost.describe())
            if self.strategy != "fused":
                params = parameter_values(gm, example_inputs)
                weights = [params.get(n.args[1], n.args[1]) for n in nodes]
                self._switch(gm, idx, g, nodes, SwitchedGroup.shared(self.strategy, cost, weights))

    @staticmethod
    def _shape(nodes: list[fx.Node]) -> GroupShape:
        reports = [n.meta[SITE_META] for n in nodes]
        weights = [node_value_meta(n.args[1]) for n in nodes]
        return GroupShape(tuple(int(w.shape[1]) for w in weights), tuple(int(w.shape[0]) for w in weights),
                          max(s.rank for s in reports), reports[0].k, reports[0].experts, weights[0].dtype.itemsize)

    @staticmethod
    def _switch(gm: fx.GraphModule, idx: fx.Node, g: fx.Node, nodes: list[fx.Node], state: SwitchedGroup) -> None:
        gid = getattr(state, "group_id", None)
        if gid is None:
            gid = state.group_id = register_group(state)
        gm.meta.setdefault(KEEPALIVE, []).append(state)
        kw = [n.kwargs for n in nodes]
        with gm.graph.inserting_before(nodes[0]):
            token = gm.graph.call_function(group_decision, (idx, g), dict(
                weights=[n.args[1] for n in nodes], As=[n.args[3] for n in nodes], Bs=[n.args[4] for n in nodes],
                A_layouts=[k["A_layout"] for k in kw], B_layouts=[k["B_layout"] for k in kw],
                scales=[k["scale"] for k in kw], group=gid))
        for i, node in enumerate(nodes):
            kwargs = {k: v for k, v in node.kwargs.items() if k != "lowering"}
            with gm.graph.inserting_before(node):
                site = gm.graph.call_function(group_site, node.args, dict(kwargs, token=token, group=gid, site=i))
            site.meta.update(node.meta)
            node.replace_all_uses_with(site)
            gm.graph.erase_node(node)
