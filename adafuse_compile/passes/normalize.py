"""Normalizations before site finding: how a linear is called, and which rows it computes.

``NormalizeLinearsPass``: ``nn.Linear`` modules called from the graph become ``F.linear`` calls.

Dynamo inlines ``nn.Linear`` into ``F.linear(x, weight, bias)`` on parameter inputs;
``symbolic_trace`` keeps ``call_module`` nodes. Before::

    y = self.q_proj(x)                                  # call_module

After::

    y = F.linear(x, self.q_proj.weight, self.q_proj.bias)   # get_attr parameters

so that one site finder (:func:`~.sites.find_sites`, which only reads the graph) serves both.
It runs first in the backend's pass manager; apply it before the other passes when using them
on a ``symbolic_trace`` graph by hand.

``SliceLinearRowsPass``: a linear whose output is only read in row slices computes those rows
only. Code that serves several adapters in one batch (MoE-PEFT) slices each adapter's rows out
of the base output and adds that adapter's terms computed on the same rows of the input::

    y = F.linear(x, W);  out = torch.empty_like(y)
    rows = y[0:2] + adapter(x[0:2]);  out.index_copy_(0, range[0:2], rows)

After::

    out = empty_linear_output(x, W)
    rows = F.linear(x[0:2], W) + adapter(x[0:2]);  out.index_copy_(0, range[0:2], rows)

so that each slice is a site (:func:`~.sites.find_sites`: a linear followed by adds). Slicing
rows commutes with a linear; the values agree up to the BLAS's rounding of the product.

``MaskedAccumulatePass``: an add into the rows a boolean mask selects, written as Python does
``acc[mask] += v`` (eulerforge's expert loop)::

    sel = acc[mask];  sel += v;  acc[mask] = sel          # getitem, iadd (or add), setitem

After::

    acc.index_put_((mask,), v, accumulate=True)

A boolean mask selects each position at most once, so reading the rows, adding and writing them
back is an accumulation: the same one rounding of ``acc + v`` per element, exactly. The in-place
form is what the site finder follows (an in-place write of values computed from the input).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_ops import empty_linear_output
from .manager import GraphPass
from .sites import is_inplace, is_linear, is_write, node_value_meta

__all__ = ["MaskedAccumulatePass", "NormalizeLinearsPass", "SliceLinearRowsPass"]


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


class SliceLinearRowsPass(GraphPass):
    """``F.linear(x, W, b)[rows]`` becomes ``F.linear(x[rows], W, b)`` where the linear's output
    is read only in row slices (and by ``empty_like``, which needs its shape only)."""

    name = "slice_linear_rows"

    def __call__(self, gm: fx.GraphModule, example_inputs=None) -> None:
        for lin in list(gm.graph.nodes):
            if not is_linear(lin) or not isinstance(lin.args[0], fx.Node):
                continue
            out = node_value_meta(lin)
            row_reads = [u for u in lin.users if _row_index(u, lin, out) is not None]
            shape_reads = [u for u in lin.users if _is_empty_like(u, lin)]
            if not row_reads or len(row_reads) + len(shape_reads) != len(lin.users):
                continue
            x, weight = lin.args[0], lin.args[1]
            bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
            for read in row_reads:
                x_rows = _shared_getitem(x, read.args[1])
                if x_rows is not None and _after(x_rows, read):
                    read.prepend(x_rows)  # it reads x only, which comes before the linear: move it up
                with gm.graph.inserting_before(read):
                    x_rows = x_rows or _getitem(gm.graph, x, read.args[1])
                    new = gm.graph.call_function(F.linear, (x_rows, weight, bias))
                new.meta.update(read.meta)
                read.replace_all_uses_with(new)
                gm.graph.erase_node(read)
            for read in shape_reads:
                with gm.graph.inserting_before(read):
                    new = gm.graph.call_function(empty_linear_output, (x, weight), dict(read.kwargs))
                new.meta.update(read.meta)
                read.replace_all_uses_with(new)
                gm.graph.erase_node(read)
            gm.graph.erase_node(lin)


def _row_index(node: fx.Node, lin: fx.Node, out):
    """The index of ``lin[index]`` if it is a fixed selection of leading (row) dimensions only."""
    if node.op != "call_function" or node.target is not operator.getitem or node.args[0] is not lin:
        return None
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if out is None or not index or len(index) >= out.dim():
        return None
    if not all(isinstance(i, (int, slice)) and not any(isinstance(b, fx.Node) for b in _bounds(i)) for i in index):
        return None
    return index


def _bounds(i):
    return (i.start, i.stop, i.step) if isinstance(i, slice) else (i,)


def _is_empty_like(node: fx.Node, lin: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.empty_like and node.args == (lin,)
            and set(node.kwargs) <= {"dtype", "device", "memory_format"})


def _shared_getitem(x: fx.Node, index):
    """The one node computing ``x[index]``: where the graph has several (one per adapter layer
    reading the same rows), they become the first, so that the adapter terms read the node the
    sliced linear reads. ``None`` if there is none, or one is written in place."""
    same = [u for u in x.users if u.op == "call_function" and u.target is operator.getitem and u.args == (x, index)]
    if not same or any(is_inplace(v) for u in same for v in u.users):
        return None
    order = {n: i for i, n in enumerate(x.graph.nodes)}
    first, *rest = sorted(same, key=order.__getitem__)
    for dup in rest:
        dup.replace_all_uses_with(first)
        x.graph.erase_node(dup)
    return first


def _after(a: fx.Node, b: fx.Node) -> bool:
    node = b.next
    while node.op != "root":
        if node is a:
            return True
        node = node.next
    return False


def _getitem(graph: fx.Graph, x: fx.Node, index) -> fx.Node:
    node = graph.call_function(operator.getitem, (x, index))
    val = node_value_meta(x)
    if val is not None:
        node.meta["example_value"] = val[index]
    return node


class MaskedAccumulatePass(GraphPass):
    """``sel = acc[mask]; sel += v; acc[mask] = sel`` or ``acc[mask] = acc[mask] + v`` (``mask``
    boolean) becomes ``acc.index_put_((mask,), v, accumulate=True)``."""

    name = "masked_accumulate"

    def __call__(self, gm: fx.GraphModule, example_inputs=None) -> None:
        for store in list(gm.graph.nodes):
            if not (store.op == "call_function" and store.target is operator.setitem and len(store.args) == 3):
                continue
            acc, mask, added = store.args
            if not (isinstance(mask, fx.Node) and _is_bool(mask) and isinstance(added, fx.Node)
                    and added.op == "call_function" and added.target in _ADDS and len(added.args) == 2
                    and not added.kwargs and len(added.users) == 1):
                continue
            # acc[mask] + v or v + acc[mask] (one rounding of the same two values either way)
            read, v = added.args if _reads(added.args[0], acc, mask) else reversed(added.args)
            if not (_reads(read, acc, mask) and all(u is added or _is_size_query(u) for u in read.users)
                    and _no_write_between(read, added, store)):
                continue
            with gm.graph.inserting_before(store):
                new = gm.graph.call_method("index_put_", (acc, (mask,), v), {"accumulate": True})
            new.meta.update(store.meta)
            gm.graph.erase_node(store)
            gm.graph.erase_node(added)
            if not read.users:  # else its size is read (Dynamo's checks of a data-dependent size)
                gm.graph.erase_node(read)


_ADDS = (operator.iadd, operator.add, torch.add)


def _reads(node, acc: fx.Node, mask: fx.Node) -> bool:
    """``node`` is ``acc[mask]``."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and node.args == (acc, mask))


def _is_size_query(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.ops.aten.sym_size.int) or (
        node.op == "call_method" and node.target == "size")


def _is_bool(node: fx.Node) -> bool:
    val = node_value_meta(node)
    return val is not None and val.dtype == torch.bool


def _no_write_between(read: fx.Node, added: fx.Node, store: fx.Node) -> bool:
    """Nothing between ``read`` and ``store`` but ``added`` writes in place (the rows read are the
    rows written back, holding what they held)."""
    node = read.next
    while node is not store:
        if node is not added and is_write(node):
            return False
        node = node.next
    return True
