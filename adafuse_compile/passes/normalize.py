"""NormalizeLinearsPass: ``nn.Linear`` modules called from the graph become ``F.linear`` calls.

Dynamo inlines ``nn.Linear`` into ``F.linear(x, weight, bias)`` on parameter inputs;
``symbolic_trace`` keeps ``call_module`` nodes. Before::

    y = self.q_proj(x)                                  # call_module

After::

    y = F.linear(x, self.q_proj.weight, self.q_proj.bias)   # get_attr parameters

so that one site finder (:func:`~.sites.find_sites`, which only reads the graph) serves both.
It runs first in the backend's pass manager; apply it before the other passes when using them
on a ``symbolic_trace`` graph by hand.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from .manager import GraphPass

__all__ = ["NormalizeLinearsPass"]


class NormalizeLinearsPass(GraphPass):
    """Inline every ``call_module`` of an ``nn.Linear`` as ``F.linear`` on ``get_attr`` parameters."""

    name = "normalize_linears"

    def __call__(self, gm: fx.GraphModule, example_inputs=None) -> None:
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), torch.nn.Linear):
                continue
            mod = gm.get_submodule(node.target)
            with gm.graph.inserting_before(node):
                w = gm.graph.get_attr(f"{node.target}.weight")
                b = gm.graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
                lin = gm.graph.call_function(F.linear, (node.args[0], w, b))
            lin.meta.update(node.meta)
            node.replace_all_uses_with(lin)
            gm.graph.erase_node(node)
