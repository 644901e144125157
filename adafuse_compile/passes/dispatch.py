"""BatchTokenDispatchPass: a loop over experts that gathers each expert's tokens becomes one
evaluation over every (token, slot) row, with each row's expert weights selected per row.

MixLoRA (the ``mixlora`` package, MoE-PEFT) gives each expert a whole feed-forward block (the
shared base weights plus the expert's LoRA pairs on gate, up and down) and runs it on the
tokens routed to that expert, the dispatch of Mixtral-style MoE code::

    mask = one_hot(sel, E).permute(2, 1, 0)               # sel [T, k]: the router's top-k
    for e in range(E):
        slot, tok = torch.where(mask[e])                   # data-dependent sizes (nonzero)
        y = F_e(x[None, tok].reshape(-1, D), common[None, tok], ...) * w[tok, slot, None]
        out.index_add_(0, tok, y)

The per-expert block is not linear in ``x``, so it is no site of :mod:`.sites`; the rewrite
here is proved by structure instead of by probing:

1. the dispatch is the pattern above (``tok`` and ``slot`` are the rows and slots where
   ``sel == e``: that is what ``where`` of that one-hot mask computes);
2. the E bodies are the same graph (same ops, same constants, same shared tensors) and differ
   only in which expert's parameters they read, parameter by parameter (lockstep comparison);
3. every op of the body is row-wise (a row of its output depends only on the same row of its
   inputs: linears, elementwise ops, casts, inactive dropout, gathers by ``tok``), so running
   it once on all rows, each row with its own expert's parameters, gives every row what its
   expert's loop iteration gave it.

After::

    rows, slots, experts = dispatch_rows(sel)             # T*k rows: token, slot, expert of each
    y = F(x[None, rows].reshape(-1, D), common[None, rows], ...) * w[rows, slots, None]
    out.index_add_(0, rows, y)

where each per-expert linear ``linear(h, P_e)`` of ``F`` is ``expert_linear(h, stack(P),
experts)`` (:func:`.graph_ops.expert_linear`). No data-dependent size is left, so the graph
has no ``nonzero`` sync and no unbacked sizes. Sums over the slots of a token are taken in slot
order instead of expert order: equal up to rounding. Routing is the model's own, untouched.
Experts whose varying parameters are full matrices (a plain MoE, not adapters) are left: per-row
expert selection computes every expert for every row, E times the FLOPs (only cheap for
low-rank factors).
"""

from __future__ import annotations

import dataclasses
import logging
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .derived import StackedTensors, add_derived_input
from .fuse_mole import SiteReport, remove_unused
from .graph_ops import dispatch_rows, expert_linear, rows_where
from .manager import DERIVED_INPUTS
from .sites import (REWRITTEN_META, VIEW_OPS, ancestors, is_inplace, is_linear, module_path, node_value_meta,
                    parameter_values, run_target, writers)

log = logging.getLogger("adafuse_compile")

__all__ = ["BatchTokenDispatchPass", "MAX_EXPERT_RANK"]

# The largest size of the smallest side of a per-expert parameter that is batched per row: a
# LoRA factor. expert_linear computes all E experts' products for every row (E * r columns).
MAX_EXPERT_RANK = 64

_ROWWISE_UNARY = {"silu", "gelu", "relu", "sigmoid", "tanh", "neg", "exp", "float", "half", "bfloat16",
                  "contiguous", "to", "type", "clone"}
_ROWWISE_BINARY = {"add", "sub", "mul", "truediv", "div"}


@dataclasses.dataclass
class _Dispatch:
    acc: fx.Node  # the tensor the experts' outputs are index_add_-ed into
    adds: dict[int, fx.Node]  # expert -> its index_add_
    sel: fx.Node  # the router's chosen experts [T, k]
    experts: int
    tok: dict[int, set[fx.Node]]  # expert -> nodes holding its token rows
    slot: dict[int, set[fx.Node]]  # expert -> nodes holding its slots
    wheres: set[fx.Node]
    order: dict[fx.Node, int]  # graph position of every node, as found


class BatchTokenDispatchPass:
    """Batch every proved token-dispatch loop over low-rank experts into one row-wise evaluation."""

    name = "batch_token_dispatch"

    def __init__(self, freeze: bool = False) -> None:
        self.freeze = freeze
        self.reports: list[SiteReport] = []

    def __call__(self, gm: fx.GraphModule, example_inputs=None) -> None:
        self.reports = []
        params = parameter_values(gm, example_inputs)
        for acc in list(gm.graph.nodes):
            if sum(_is_index_add(u, acc) for u in acc.users) < 2:
                continue
            found = _dispatch(acc)
            if isinstance(found, str):
                log.info("adafuse: token dispatch into %s left: %s", acc.name, found)
                continue
            plan = _plan(found, params)
            if plan is None:
                continue  # linear in the rows: sites FuseMoLEPass proves and fuses
            if isinstance(plan, str):
                self.reports.append(SiteReport(_path(found, _body(found, 0)[0], params), "left", plan))
                log.info("adafuse: left token dispatch into %s: %s", acc.name, plan)
                continue
            report = _rewrite(gm, found, plan, params, self.freeze and example_inputs is not None)
            self.reports.append(report)
            log.info("adafuse: batched token dispatch %s (E=%d, k=%d)", report.path, report.experts, report.k)


def _path(d: _Dispatch, body: list[fx.Node], params) -> str:
    """The module path the parameters of expert 0's computation (``body``) share (``model.layers.0.mlp``)."""
    paths = [module_path(p) for n in body for p in n.all_input_nodes if p in params]
    if not paths:
        return d.acc.name
    common = paths[0].split(".")
    for p in paths[1:]:
        parts = p.split(".")
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    return ".".join(common) or d.acc.name


def _is_fresh_zeros(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (torch.zeros, torch.zeros_like)) or (
        node.op == "call_method" and node.target == "new_zeros")


def _is_index_add(node: fx.Node, acc: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "index_add_" and len(node.args) == 4
            and node.args[0] is acc and node.args[1] == 0 and not node.kwargs)


def _expert_of(tok: fx.Node):
    """``(role, where, mask_all, e, sel, E)`` if ``tok`` is ``torch.where(mask_all[e])[i]`` with
    ``mask_all[e][j, t] == (sel[t, j] == e)`` (role "tok" for i == 1, "slot" for i == 0), else None."""
    if not (tok.op == "call_function" and tok.target is operator.getitem and tok.args[1] in (0, 1)):
        return None
    where = tok.args[0]
    if not (isinstance(where, fx.Node) and where.op == "call_function" and where.target is torch.where
            and len(where.args) == 1 and not where.kwargs):
        return None
    mask = where.args[0]
    if not (mask.op == "call_function" and mask.target is operator.getitem and isinstance(mask.args[1], int)):
        return None
    source = _mask_source(mask.args[0])
    if source is None or not 0 <= mask.args[1] < source[1]:
        return None
    return ("tok" if tok.args[1] == 1 else "slot"), where, mask.args[0], mask.args[1], *source


def _mask_source(mask_all: fx.Node):
    """``(sel, E)`` if ``mask_all[e][j, t] == (sel[t, j] == e)`` for every expert ``e``: either
    ``one_hot(sel, E).permute(2, 1, 0)`` (Mixtral, MixLoRA), or a new tensor whose only writes are
    ``mask_all[e] = (sel == e).transpose(0, 1)`` for each ``e`` (MoE-PEFT's top-p, whose ``sel``
    holds -1 for unused slots)."""
    if mask_all.op == "call_method" and mask_all.target == "permute" and tuple(mask_all.args[1:]) == (2, 1, 0):
        one_hot = mask_all.args[0]
        if not (one_hot.op == "call_function" and one_hot.target in (F.one_hot, torch._C._nn.one_hot)):
            return None
        E = one_hot.kwargs.get("num_classes", one_hot.args[1] if len(one_hot.args) > 1 else -1)
        return (one_hot.args[0], E) if isinstance(E, int) and E >= 1 else None
    if not (mask_all.op == "call_function" and mask_all.target in (torch.empty, torch.zeros)):
        return None
    writes = [u for u in mask_all.users if u.op == "call_function" and u.target is operator.setitem]
    reads = [u for u in mask_all.users if u not in writes]
    order = {n: i for i, n in enumerate(mask_all.graph.nodes)}
    if not writes or any(not (r.op == "call_function" and r.target is operator.getitem) for r in reads) or \
            max(order[w] for w in writes) > min((order[r] for r in reads), default=len(order)):
        return None
    sel, experts = None, set()
    for w in writes:
        e, value = w.args[1], w.args[2]
        is_t = isinstance(value, fx.Node) and (
            (value.op == "call_method" and value.target == "transpose" and tuple(value.args[1:]) == (0, 1))
            or (value.op == "call_function" and value.target is torch.transpose and tuple(value.args[1:]) == (0, 1)))
        eq = value.args[0] if is_t else None
        if not (isinstance(e, int) and eq is not None and eq.op == "call_function" and eq.target is operator.eq
                and eq.args[1] == e and isinstance(eq.args[0], fx.Node) and (sel is None or eq.args[0] is sel)):
            return None
        sel = eq.args[0]
        experts.add(e)
    shape, sel_shape = node_value_meta(mask_all), node_value_meta(sel)
    E = len(writes)
    if experts != set(range(E)) or shape is None or sel_shape is None or tuple(shape.shape) != (
            E, sel_shape.shape[1], sel_shape.shape[0]):
        return None
    return sel, E


def _dispatch(acc: fx.Node) -> _Dispatch | str:
    adds, order = {}, {n: i for i, n in enumerate(acc.graph.nodes)}
    sel = E = mask_all = None
    for u in acc.users:
        if not _is_index_add(u, acc):
            continue
        info = _expert_of(u.args[2])
        if info is None or info[0] != "tok":
            return "an index_add_ does not index by the rows torch.where(one_hot(sel, E).permute(2, 1, 0)[e]) gives"
        _, _, m, e, s, n_experts = info
        if (sel, E, mask_all) != (None, None, None) and (s, n_experts, m) != (sel, E, mask_all):
            return "the index_add_ calls dispatch by different decisions"
        sel, E, mask_all = s, n_experts, m
        if e in adds:
            return f"expert {e} is added twice"
        adds[e] = u
    if sorted(adds) != list(range(E)):
        return f"only experts {sorted(adds)} of {E} are added"
    last = max(order[a] for a in adds.values())
    if not _is_fresh_zeros(acc):
        return "the experts add into a tensor that is not a new zero tensor (it could alias what they read)"
    if any(not _is_index_add(u, acc) and order[u] < last for u in acc.users):
        return "the accumulator is read between the experts' index_add_ calls"
    # The decision must be what the masks were built from when the loop runs: nothing written in
    # place (sel, the masks, the one-hot), or the rows dispatch_rows(sel) gives are not the loop's.
    building = {mask_all, sel, *(mask_all.all_input_nodes if mask_all.op == "call_method" else ())}
    built_by_writes = mask_all.op == "call_function"  # top-p: the E setitems build it (checked by _mask_source)
    if any(writers(n) for n in building - ({mask_all} if built_by_writes else set())) or \
            any(writers(m) for m in mask_all.users if m.target is operator.getitem):
        return "the decision or its expert masks are written in place after they are built"
    tok, slot, wheres = {e: set() for e in range(E)}, {e: set() for e in range(E)}, set()
    for mask in mask_all.users:
        for where in mask.users:
            for g in where.users:
                info = _expert_of(g)
                if info is None:
                    continue
                role, w, _, e, _, _ = info
                (tok if role == "tok" else slot)[e].add(g)
                wheres.add(w)
    return _Dispatch(acc, adds, sel, E, tok, slot, wheres, order)


@dataclasses.dataclass
class _Plan:
    body: list[fx.Node]  # expert 0's body in graph order (its output last)
    varying: dict[fx.Node, list[fx.Node]]  # expert 0's parameter -> every expert's, in expert order
    rank: int


def _body(d: _Dispatch, e: int) -> tuple[list[fx.Node], set[fx.Node]]:
    """Nodes computing expert ``e``'s added value from its rows and slots, and the leaves."""
    dispatch = d.tok[e] | d.slot[e]
    on_dispatch = _computed_from(dispatch)
    nodes, leaves, stack = set(), set(), [d.adds[e].args[3]]
    while stack:
        n = stack.pop()
        if n in nodes or n in leaves:
            continue
        if n in dispatch or n not in on_dispatch:
            leaves.add(n)
            continue
        nodes.add(n)
        stack.extend(n.all_input_nodes)
    return sorted(nodes, key=d.order.__getitem__), leaves


def _computed_from(seeds: set[fx.Node]) -> set[fx.Node]:
    """``seeds`` and every node computed from them."""
    found, stack = set(seeds), list(seeds)
    while stack:
        for u in stack.pop().users:
            if u not in found:
                found.add(u)
                stack.append(u)
    return found


def _plan(d: _Dispatch, params) -> _Plan | str | None:
    """How to batch the dispatch, why it cannot be, or None where the experts are linear in
    their rows (adapter terms of a site: :class:`~.fuse_mole.FuseMoLEPass` fuses those)."""
    body0, leaves0 = _body(d, 0)
    if not any(_nonlinear(n, set(body0)) for n in body0):
        return None
    other_rows = {n for e in range(1, d.experts) for n in d.tok[e] | d.slot[e]}
    if leaves0 & other_rows:
        return "expert 0's computation reads another expert's rows"
    violation = _not_rowwise(body0, d, params)
    if violation:
        return violation
    # The batched body runs where the last index_add_ was: what it reads must not change in between.
    for leaf in leaves0 - d.tok[0] - d.slot[0]:
        if any(d.order[w] > d.order[body0[0]] for w in writers(_storage(leaf))):
            return f"{leaf.name}, which the experts read, is written in place during the loop"
    varying: dict[fx.Node, list[fx.Node]] = {}
    for e in range(1, d.experts):
        mapping = _match(d.adds[0].args[3], d.adds[e].args[3], d, e, params, set(body0))
        if isinstance(mapping, str):
            return f"the experts' computations differ ({mapping}): not one block with per-expert parameters"
        for p0, pe in mapping.items():
            varying.setdefault(p0, [p0]).append(pe)
    varying = {p: ps for p, ps in varying.items() if any(q is not p for q in ps)}
    rank = 0
    for p0, ps in varying.items():
        users = [u for u in p0.users if u in body0]
        if not all(is_linear(u) and u.args[1] is p0 for u in users):
            return f"the per-expert parameter {p0.name} is used other than as a linear's weight"
        if any(is_linear(u) and len(u.args) > 2 and u.args[2] is not None and u.args[2] in varying for u in users):
            return "a per-expert bias"
        small = min(params[p0].shape)
        if small > MAX_EXPERT_RANK:
            return (f"the experts' own parameters are full matrices ({tuple(params[p0].shape)}): a plain MoE, not "
                    "adapters; batching them per row would compute every expert for every row")
        rank = max(rank, small)
    if not varying:
        return "the experts read no parameters of their own"
    return _Plan(body0, varying, rank)


def _storage(node: fx.Node) -> fx.Node:
    """The node whose tensor ``node`` is (through in-place ops and views)."""
    while node.args and isinstance(node.args[0], fx.Node) and (
            is_inplace(node) or getattr(node.target, "__name__", node.target) in VIEW_OPS):
        node = node.args[0]
    return node


def _nonlinear(n: fx.Node, members: set) -> bool:
    """An activation, or a product of two values computed from the rows (``act(g) * u``)."""
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    if name in ("silu", "gelu", "relu", "sigmoid", "tanh", "exp"):
        return True
    return name in ("mul", "truediv", "div") and sum(a in members for a in n.all_input_nodes) == 2 and \
        not any(_is_weight_gather(a) for a in n.all_input_nodes)


def _is_weight_gather(n: fx.Node) -> bool:
    """``w[tok, slot, None]``: the routing weight of each row (a constant once the decision is fixed)."""
    return n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], tuple) and \
        len(n.args[1]) >= 2


def _match(a: fx.Node, b: fx.Node, d: _Dispatch, e: int, params, body0: set) -> dict | str:
    """Map expert 0's graph at ``a`` onto expert ``e``'s at ``b``: parameter -> parameter, or why not."""
    mapping, seen, stack = {}, {}, [(a, b)]
    while stack:
        x, y = stack.pop()
        if x in seen:
            if seen[x] is not y:
                return f"{x.name} corresponds to two values"
            continue
        seen[x] = y
        if x in d.tok[0] or x in d.slot[0]:
            if not ((x in d.tok[0] and y in d.tok[e]) or (x in d.slot[0] and y in d.slot[e])):
                return f"{y.name} is not expert {e}'s rows"
            continue
        if x in params:
            if y not in params or params[x].shape != params[y].shape or params[x].dtype != params[y].dtype:
                return f"{y.name} is not a parameter like {x.name}"
            mapping[x] = y
            continue
        if x not in body0:  # a value computed outside the loop: the experts must share it
            if x is not y:
                return f"expert {e} reads {y.name} where expert 0 reads {x.name}"
            continue
        if (x.op, x.target) != (y.op, y.target) or len(x.args) != len(y.args) or x.kwargs.keys() != y.kwargs.keys():
            return f"{x.name} and {y.name} are different ops"
        pairs = list(zip(_flat(x.args), _flat(y.args))) + list(zip(_flat(tuple(x.kwargs.values())),
                                                                 _flat(tuple(y.kwargs.values()))))
        for p, q in pairs:
            if isinstance(p, fx.Node) and isinstance(q, fx.Node):
                stack.append((p, q))
            elif isinstance(p, fx.Node) or isinstance(q, fx.Node) or p != q:
                return f"{x.name} and {y.name} have different arguments"
    return mapping


def _flat(args) -> list:
    out = []
    for a in args:
        if isinstance(a, (tuple, list)):
            out.append(type(a).__name__)  # the structure, then the items
            out.extend(_flat(a))
        elif isinstance(a, slice):
            out.extend(("slice", a.start, a.stop, a.step))
        else:
            out.append(a)
    return out


def _not_rowwise(body: list[fx.Node], d: _Dispatch, params) -> str | None:
    """Why some op of the body mixes rows (or is not known to keep them apart), or None."""
    rows = d.tok[0] | d.slot[0]
    members = set(body)
    tokens = _size(d.sel, 0)
    for n in body:
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
        if is_inplace(n):
            return f"the in-place op {name} in an expert's computation"
        if n.op == "call_function" and n.target is operator.getitem:
            if n.args[0] in members or not _is_row_gather(n, rows, tokens, d):
                return f"the index {n.name} is not a gather of token rows"
        elif is_linear(n):
            if n.args[0] not in members or any(a in members for a in n.args[1:]) or n.args[1] not in params:
                return f"the linear {n.name} is not on the expert's rows with a parameter weight"
        elif name in ("reshape", "view") and n.op == "call_method":
            if not _keeps_rows(n):
                return f"the reshape {n.name} mixes rows"
        elif name == "dropout":
            training = n.args[2] if len(n.args) > 2 else n.kwargs.get("training", True)
            if training is not False:
                return "active dropout in an expert's computation"
        elif name in _ROWWISE_UNARY or name in _ROWWISE_BINARY:
            for a in n.all_input_nodes:
                if a not in members and not (a in params and _broadcasts_per_row(params[a], n, members)):
                    return f"{name} ({n.name}) reads {a.name}, not a row of the expert's input"
        else:
            return f"{name} ({n.name}) is not known to be row-wise"
        if any(a in rows for a in n.all_input_nodes) and not (n.op == "call_function" and n.target is operator.getitem):
            return f"{n.name} computes with token indices"
    return None


def _broadcasts_per_row(param: torch.Tensor, n: fx.Node, members: set) -> bool:
    """A scalar, or a vector along the last dimension of [rows, features] operands."""
    if param.dim() == 0:
        return True
    return param.dim() == 1 and all((v := node_value_meta(a)) is not None and v.dim() >= 2
                                    for a in n.all_input_nodes if a in members)


def _size(node: fx.Node, dim: int):
    val = node_value_meta(node)
    return None if val is None or val.dim() <= dim else val.shape[dim]


def _is_row_gather(n: fx.Node, rows: set, tokens, d: _Dispatch) -> bool:
    """``t[None, tok]``, ``t[tok]``, ``t[tok, slot]`` or ``t[tok, slot, None]`` of a tensor ``t`` whose
    first dimension is the tokens (and second the slots)."""
    source, index = n.args
    index = index if isinstance(index, tuple) else (index,)
    if source in rows or not any(i in rows for i in index):
        return False
    shape = node_value_meta(source)
    if shape is None:
        return False
    toks = [i for i in index if i in d.tok[0]]
    slots = [i for i in index if i in d.slot[0]]
    k = _size(d.sel, 1)
    if index[:2] == (None, *toks) and len(index) == 2:
        return shape.dim() == 2 and shape.shape[0] == tokens
    if len(index) == 1 and toks:
        return shape.shape[0] == tokens
    if len(index) >= 2 and index[0] in d.tok[0] and index[1] in d.slot[0] and all(i is None for i in index[2:]):
        return shape.dim() == 2 and shape.shape[0] == tokens and shape.shape[1] == k and len(slots) == 1
    return False


def _keeps_rows(n: fx.Node) -> bool:
    src, out = node_value_meta(n.args[0]), node_value_meta(n)
    if src is None or out is None or out.dim() != 2 or src.shape[-1] != out.shape[-1]:
        return False
    return src.dim() == 2 or (src.dim() == 3 and src.shape[0] == 1)


def _rewrite(gm: fx.GraphModule, d: _Dispatch, plan: _Plan, params, freeze: bool) -> SiteReport:
    graph, path = gm.graph, _path(d, plan.body, params)
    position = {n: i for i, n in enumerate(n for n in graph.nodes if n.op == "placeholder")}
    stacked = {}
    if freeze:  # stacked once into cached derived inputs (the freeze contract), not per call
        for p, ps in plan.varying.items():
            if all(q in position for q in ps):
                name = f"adafuse_stacked_{len(gm.meta.get(DERIVED_INPUTS, []))}"
                stacked[p] = add_derived_input(gm, StackedTensors(tuple(position[q] for q in ps)), name)
                _propagate_meta(stacked[p], torch.stack, ([q for q in ps],))
    last = max(d.adds.values(), key=d.order.__getitem__)
    with graph.inserting_before(last):
        rows_slots = graph.call_function(dispatch_rows, (d.sel,), {"experts": d.experts})
        rows, slots, experts, valid = (graph.call_function(operator.getitem, (rows_slots, i)) for i in range(4))
        stacked.update({p: graph.call_function(torch.stack, (ps,)) for p, ps in plan.varying.items() if p not in stacked})
        env = {n: rows for n in d.tok[0]} | {n: slots for n in d.slot[0]}
        for n in plan.body:
            if is_linear(n) and n.args[1] in stacked:
                bias = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
                new = graph.call_function(expert_linear, (env.get(n.args[0], n.args[0]), stacked[n.args[1]],
                                                          experts), {"bias": bias})
            else:
                new = graph.node_copy(n, lambda a: env.get(a, a))
            new.meta[REWRITTEN_META] = path
            env[n] = new
        out = graph.call_function(rows_where, (valid, env[d.adds[0].args[3]]))
        added = graph.call_method("index_add_", (d.acc, 0, rows, out))
    added.meta.update(last.meta)
    for add in d.adds.values():
        graph.erase_node(add)
    for n in [rows_slots, rows, slots, experts, valid, *(s for s in stacked.values() if s.op != "placeholder"),
              *(env[n] for n in plan.body), out]:
        _propagate_meta(n)
    masks = {w.args[0] for w in d.wheres}
    building = {n for m in masks for n in (m.args[0], *ancestors(m.args[0], stop={d.sel}))}
    # everything computed from the old rows: every expert's computation, and gathers no expert's
    # output uses (so that no torch.where survives)
    stale = _computed_from({g for e in range(d.experts) for g in d.tok[e] | d.slot[e]})
    remove_unused(gm, [*d.wheres, *masks, *building, *(w for b in building for w in b.users), *stale])
    k = _size(d.sel, 1)
    reason = (f"batched token dispatch: the {d.experts} experts' computations are one graph on per-expert "
              f"parameters ({len(plan.varying)} per expert), every op row-wise; {k} rows per token, each with "
              "its own expert's weights; no data-dependent sizes left")
    return SiteReport(path, "fused", reason, d.experts, k if isinstance(k, int) else None,
                      plan.rank, "token dispatch")


def _propagate_meta(node: fx.Node, target=None, args=None) -> None:
    """``example_value`` of a new node (or of ``target(*args)`` for a placeholder), computed on
    the fake values of its inputs."""
    def value(a):
        return a.meta.get("example_value", a.meta.get("val")) if isinstance(a, fx.Node) else a

    args = fx.node.map_arg(node.args if args is None else args, value)
    kwargs = fx.node.map_arg(node.kwargs if target is None else {}, value)
    fake = next((v for v in _flat(args) if isinstance(v, torch.Tensor)), None)
    mode = getattr(fake, "fake_mode", None)
    if mode is None:
        return
    with mode:
        val = target(*args, **kwargs) if target is not None else run_target(node, args, kwargs)
    node.meta["example_value"] = val
