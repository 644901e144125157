"""Ordering and running of graph passes, with the logging and fallback every pass shares."""

from __future__ import annotations

import logging
import os

import torch.fx

log = logging.getLogger("adafuse_compile")

# ADAFUSE_DUMP_GRAPHS=1 logs the graph before and after each pass (at INFO).
_DUMP_ENV = "ADAFUSE_DUMP_GRAPHS"

# gm.meta key: inputs a pass added as placeholders at the end, each a callable of the original
# inputs that the backend evaluates before every call (e.g. folded weights).
DERIVED_INPUTS = "adafuse_derived_inputs"
# gm.meta key: run-time state the rewritten graph's ops look up by id (e.g. a switched group's
# merged weights); the compiled callable keeps it alive as long as it lives.
KEEPALIVE = "adafuse_keepalive"


class GraphPass:
    """One rewrite of an FX graph. Subclasses implement :meth:`__call__` and mutate ``gm`` in place.

    ``example_inputs`` are the graph's inputs as Dynamo passes them to a backend (parameters
    included, as real tensors); ``None`` for a ``symbolic_trace`` graph, whose parameters are
    ``get_attr`` nodes.
    """

    name: str = "pass"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs=None) -> None:
        raise NotImplementedError


class PassManager:
    """Runs passes in order. A failing pass leaves the graph as it was before that pass."""

    def __init__(self, passes: list[GraphPass], *, strict: bool = False) -> None:
        self.passes = list(passes)
        self.strict = strict

    def __call__(self, gm: torch.fx.GraphModule, example_inputs=None) -> torch.fx.GraphModule:
        dump = os.environ.get(_DUMP_ENV, "") not in ("", "0")
        for p in self.passes:
            if dump:
                log.info("graph before %s:\n%s", p.name, gm.graph)
            backup = copy_graph(gm)
            derived = len(gm.meta.get(DERIVED_INPUTS, []))
            try:
                p(gm, example_inputs)
                gm.graph.lint()
                gm.recompile()
            except Exception:
                if self.strict:
                    raise
                log.warning("adafuse pass %s failed; continuing without it", p.name, exc_info=True)
                gm.graph = backup
                del gm.meta.get(DERIVED_INPUTS, [])[derived:]
                gm.recompile()
            if dump:
                log.info("graph after %s:\n%s", p.name, gm.graph)
        return gm


def copy_graph(gm: torch.fx.GraphModule) -> torch.fx.Graph:
    """A copy of ``gm``'s graph (nodes and their meta), to restore or to keep the original."""
    graph = torch.fx.Graph(owning_module=gm)
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return graph
