"""RouteIntoSitesPass: a fused site's own top-k router moves into the site's op.

After :class:`~.fuse_mole.FuseMoLEPass` a per-layer-routed site still computes its decision in
the graph, four to six small ops before the fused op::

    logits = linear(h, R)
    w, i = topk(softmax(logits, -1), k); w = w / w.sum(-1, keepdim=True)
    y = fused_site(x, W, b, A, B, i, w, ...)

At decode every one of them is a call or a kernel of a few microseconds (measured on the small
model at batch 1: the routing cost ~20 us per site over a plain linear, the adapter ~10 us).
This pass recognizes the two top-k routers MoLE code writes (softmax, top-k, optional
renormalization: MixLoRA, MoLA, Mixtral; top-k of the logits, then softmax: X-LoRA style), with
optional dtype casts of the softmax and of the weights, and rewrites the site into one call::

    y = routed_site(x, W, b, h, R, None, A, B, k=k, softmax_first=True, renorm=True, ...)

which runs :func:`~adafuse_compile.kernels.reference.topk_route`, the same ATen calls in the
same order as the matched nodes, inside ``adafuse::routed_lora_moe_linear``. The decision is
therefore bitwise what the model's code computes eagerly from the same router input (a
decision Inductor compiled from the graph would be its own generated softmax instead).

A router is moved only when nothing else reads any of its nodes (a router whose logits also
feed an auxiliary loss, or whose decision drives several sites, stays in the graph), and only
between matching dtypes. Anything else, say a temperature, noise, a bias added to the logits, or
a mask, is not one of the two forms and stays as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import operator

import torch
import torch.fx as fx

from .fuse_mole import SITE_META
from .graph_ops import fused_site, is_call, routed_site
from .manager import GraphPass
from .sites import is_linear, is_write, node_value_meta

log = logging.getLogger("adafuse_compile")

__all__ = ["RouteIntoSitesPass", "RouteMatch", "match_route"]

_SOFTMAX_FNS = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)
_DIVS = (operator.truediv, operator.itruediv, torch.div, torch.true_divide)
_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}


@dataclasses.dataclass
class RouteMatch:
    """A site's router, as the arguments of :func:`~.graph_ops.routed_site`."""

    router_input: fx.Node
    router_weight: fx.Node
    router_bias: fx.Node | None
    k: int
    softmax_first: bool
    renorm: bool
    softmax_dtype: torch.dtype | None
    gate_dtype: torch.dtype | None
    sorted: bool
    nodes: list[fx.Node]  # the routing nodes the op replaces


def _arg(node: fx.Node, pos: int, name: str, default=None):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _input(node: fx.Node):
    """The tensor an op reads first (``self`` of a method, ``input`` of a function)."""
    return node.args[0] if node.args else node.kwargs.get("input")


def _is(node, fns=(), methods=()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in fns
    return node.op == "call_method" and node.target in methods


def _last_dim(node: fx.Node, dim) -> bool:
    val = node_value_meta(node)
    return isinstance(dim, int) and val is not None and dim in (-1, val.dim() - 1)


def _softmax(node) -> tuple[fx.Node, torch.dtype | None] | None:
    """``(input, dtype)`` of a softmax over the last dimension."""
    if not _is(node, _SOFTMAX_FNS, ("softmax",)):
        return None
    dtype_pos = 3 if node.target is torch.nn.functional.softmax else 2  # F.softmax(x, dim, _stacklevel, dtype)
    if len(node.args) > dtype_pos + 1 or set(node.kwargs) - {"input", "dim", "dtype", "_stacklevel"}:
        return None
    src, dim, dtype = _input(node), _arg(node, 1, "dim"), _arg(node, dtype_pos, "dtype")
    return (src, dtype) if isinstance(src, fx.Node) and _last_dim(src, dim) else None


def _cast(node) -> tuple[fx.Node, torch.dtype] | None:
    """``(input, dtype)`` of a pure dtype cast (``.to(dtype)``, ``.float()``, ...)."""
    if not isinstance(node, fx.Node) or node.op != "call_method":
        return None
    if node.target in _CAST_METHODS and len(node.args) == 1 and not node.kwargs:
        return node.args[0], _CAST_METHODS[node.target]
    if node.target == "to":
        dtype = _arg(node, 1, "dtype")
        if isinstance(dtype, torch.dtype) and len(node.args) <= 2 and set(node.kwargs) <= {"dtype"}:
            return node.args[0], dtype
    return None


def _through_noop_casts(node, nodes: list):
    """``node`` seen through casts to the dtype it already has (``logits.float()`` of float32
    logits, ``idx.to(torch.int64)``), which are appended to ``nodes``."""
    while (cast := _cast(node)) is not None and cast[1] == _dtype(cast[0]) is not None:
        nodes.append(node)
        node = cast[0]
    return node


def _renormalized(node, vals: fx.Node) -> bool:
    """Whether ``node`` is ``vals / vals.sum(-1, keepdim=True)`` (``/`` or ``/=``)."""
    if not _is(node, _DIVS, ("div", "div_", "__truediv__")) or len(node.args) != 2 or node.kwargs:
        return False
    num, den = node.args
    return (num is vals and _is(den, (torch.sum,), ("sum",)) and _input(den) is vals
            and _last_dim(vals, _arg(den, 1, "dim")) and _arg(den, 2, "keepdim", False) is True
            and len(den.args) <= 3 and set(den.kwargs) <= {"input", "dim", "keepdim"})


def match_route(idx: fx.Node | None, g: fx.Node | None) -> RouteMatch | None:
    """The router computing ``(idx, g)``, if it is one of the two top-k forms."""
    nodes: list[fx.Node] = []
    idx = _through_noop_casts(idx, nodes)
    if not (_is(idx, (operator.getitem,)) and idx.args[1] == 1 and _is(idx.args[0], (torch.topk,), ("topk",))):
        return None
    topk = idx.args[0]
    scores = _input(topk)
    k, dim = _arg(topk, 1, "k"), _arg(topk, 2, "dim", -1)
    largest, is_sorted = _arg(topk, 3, "largest", True), _arg(topk, 4, "sorted", True)
    if not (isinstance(scores, fx.Node) and isinstance(k, int) and largest is True and isinstance(is_sorted, bool)
            and _last_dim(scores, dim)):
        return None
    vals = [u for u in topk.users if _is(u, (operator.getitem,)) and u.args[1] == 0]
    if len(vals) != 1:
        return None
    vals, gate_dtype, renorm = vals[0], None, False
    nodes += [topk, idx, vals]
    node = g
    if (cast := _cast(node)) is not None:
        nodes.append(node)
        node, gate_dtype = cast
    first = _softmax(scores)
    if first is not None:  # softmax over the experts, top-k of the probabilities
        logits, softmax_dtype = first
        nodes.append(scores)
        if node is not vals:
            if not _renormalized(node, vals):
                return None
            nodes += [node, node.args[1]]
            renorm = True
    else:  # top-k of the logits, softmax over the k
        second = _softmax(node)
        if second is None or second[0] is not vals:
            return None
        logits, softmax_dtype = scores, second[1]
        nodes.append(node)
    logits = _through_noop_casts(logits, nodes)
    if not is_linear(logits) or len(logits.args) < 2 or logits.kwargs:
        return None
    nodes.append(logits)
    bias = logits.args[2] if len(logits.args) > 2 else None
    return RouteMatch(logits.args[0], logits.args[1], bias, k, first is not None, renorm, softmax_dtype, gate_dtype,
                      is_sorted, nodes)


def _dtype(node) -> torch.dtype | None:
    val = node_value_meta(node) if isinstance(node, fx.Node) else None
    return None if val is None else val.dtype


class RouteIntoSitesPass(GraphPass):
    """Move each fused site's own top-k router into its op (see the module docstring)."""

    name = "route_into_sites"

    def __init__(self) -> None:
        self.moved: list[str] = []  # paths of the sites whose router moved

    def __call__(self, gm: fx.GraphModule, example_inputs=None) -> None:
        self.moved = []
        for node in list(gm.graph.nodes):
            if not is_call(node, fused_site) or node.kwargs.get("lowering") != "op":
                continue
            x, weight, bias, A, B, idx, g = node.args
            match = match_route(idx, g)
            if match is None or not self._exclusive(match, node) or self._written_before(match, node):
                continue
            dtypes = {_dtype(t) for t in (x, weight, *(A if isinstance(A, (list, tuple)) else [A]),
                                          *(B if isinstance(B, (list, tuple)) else [B]))}
            if len(dtypes) != 1 or None in dtypes:
                continue  # adapters in another dtype than the base: fused_site's mixed path
            kwargs = {k: v for k, v in node.kwargs.items() if k != "lowering"}
            with gm.graph.inserting_before(node):
                routed = gm.graph.call_function(
                    routed_site, (x, weight, bias, match.router_input, match.router_weight, match.router_bias, A, B),
                    dict(kwargs, k=match.k, softmax_first=match.softmax_first, renorm=match.renorm,
                         softmax_dtype=match.softmax_dtype, gate_dtype=match.gate_dtype, sorted=match.sorted))
            routed.meta.update(node.meta)
            node.replace_all_uses_with(routed)
            gm.graph.erase_node(node)
            chain = set(match.nodes)
            for n in reversed([n for n in gm.graph.nodes if n in chain]):  # read by nothing else
                gm.graph.erase_node(n)
            report = routed.meta.get(SITE_META)
            self.moved.append(report.path if report is not None else routed.name)
        if self.moved:
            log.info("adafuse: routers moved into %d fused sites", len(self.moved))
            gm.recompile()

    @staticmethod
    def _written_before(match: RouteMatch, site: fx.Node) -> bool:
        """Whether anything may be written in place between the router and the site: the op
        reads the router's input and weight where the site is, so they must still hold what the
        router read (any write at all, of any tensor, is refused: it could reach them through a
        view)."""
        start = match.nodes[-1]  # the router's linear
        n = start.next
        while n is not site:
            if n not in match.nodes and (is_write(n) or n.op == "call_module"):
                return True
            n = n.next
        return False

    @staticmethod
    def _exclusive(match: RouteMatch, site: fx.Node) -> bool:
        """Whether the router's nodes are read by nothing but each other and the site."""
        allowed = set(match.nodes) | {site}
        return all(u in allowed for n in match.nodes for u in n.users)
