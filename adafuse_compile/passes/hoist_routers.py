"""HoistRoutersPass: routers that read the same tensor run as one batched matmul.

Per-layer routing (MixLoRA, MoLA) gives q/k/v one router each on the same normed hidden state,
and gate/up likewise. Before::

    logits_q = linear(x.float(), R_q); logits_k = linear(x.float(), R_k); logits_v = linear(x.float(), R_v)

After::

    logits = matmul(x.float()[None], stack(R_q, R_k, R_v).mT)    # [3, T, E], stacked once
    logits_q, logits_k, logits_v = logits[0], logits[1], logits[2]

A decision can only change if the logits do, and top-k flips experts on near-ties when logits
differ in the last bit. No BLAS promises the same rounding for two GEMM calls of different
shapes, so equality is *checked*, not assumed: a group is hoisted only in a graph whose token
count is static, and only if the batched matmul gives bitwise the logits of the separate
linears on random probes at that token count (what varies between GEMM code paths is the shape
and the thread count, not the values). A graph with a symbolic token count would serve counts
never checked (measured: with 2 threads and E=16 the batched logits differ at T = 5-7 and 9-11),
so its routers are left as they are.
Measured on this CPU (torch 2.13, MKL): the batched matmul matches at every shape of the
tested models (hidden >= 512, E = 8) and 852 of 936 shapes overall (ATen runs small
matrices, ``in*T*E < 400``, through its own loop for ``bmm``, and MKL blocks a few other small
shapes differently); a matmul on the *concatenated* weights ``cat(R_q, R_k, R_v)`` differs
from T=8 on at 120 of 180 shapes, so it is not used. tests/passes/test_hoist_routers.py
routes 100k random tokens: 0 flipped experts. Routers with a bias are left (a fused
``addmm`` rounds differently from a matmul plus an add).

The selection after the logits (softmax, top-k, renormalization: each router's row-wise ops)
runs once on the stacked logits too, when every router of the group runs the same ops, and each
router reads its rows of the results::

    probs = softmax(logits.float(), -1); g, idx = topk(probs, k); g = g / g.sum(-1, keepdim=True)
    g_q, idx_q = g[0], idx[0]; g_k, idx_k = g[1], idx[1]; ...

Again checked, not assumed: on probes at the graph's token count, on the routers' device, with
two experts tied in half the rows (top-k's tie order), each router's rows of the batched results
must equal its own call's bitwise. Per-router selection was 28 softmax/top-k pairs per decode
step of the 4-layer model on the H200 (profile), ~8 us each; batched, 16.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.fx as fx

from .derived import StackedTensors, add_derived_input
from .graph_ops import hoisted_logits, router_logits
from .manager import DERIVED_INPUTS, GraphPass
from .sites import is_linear, node_value_meta, parameter_values, run_target
from .verify import op_name

log = logging.getLogger("adafuse_compile")

__all__ = ["HoistRoutersPass", "HoistedGroup"]

_MAX_ROUTER_OUT = 256  # a router has one output per expert; base linears are far wider
_SELECTIONS = ("topk", "softmax", "_softmax")
_CASTS = ("to", "float", "half", "bfloat16", "type")


@dataclasses.dataclass
class HoistedGroup:
    """Routers (weight names) batched into one matmul, and the token count their bitwise
    equality with the separate linears was checked at (the graph's only one). ``selection``:
    the ops of each router's selection (softmax, top-k, ...) now run once for the group."""

    routers: list[str]
    tokens: int
    selection: int = 0


# Ops that act on each row (the last dim) alone, so that running them on the routers' stacked
# logits [S, T, E] computes each router's rows as its own call would: casts, elementwise
# arithmetic, and softmax / top-k / sum / max over dim -1 (checked below: an explicit dim must
# be -1). Whether they also *round* each row the same way is checked on probes, not assumed.
_ROW_OPS = {"float", "to", "half", "bfloat16", "type", "softmax", "log_softmax", "topk", "sum", "amax",
            "truediv", "mul", "add", "sub", "div", "getitem", "neg", "exp", "sigmoid"}
_LAST_DIM_OPS = {"softmax": 1, "log_softmax": 1, "topk": 2, "sum": 1, "amax": 1}  # positional index of dim


def _feeds_selection(node: fx.Node, depth: int = 6) -> bool:
    """Whether a top-k or softmax is computed from ``node`` within ``depth`` ops: a router."""
    frontier = [node]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users]
        if any(op_name(u) in _SELECTIONS for u in frontier):
            return True
    return False


def _cast_chain(node: fx.Node):
    """``(root, casts)``: the tensor a router reads, seen through dtype casts (equal chains: equal values)."""
    casts = []
    while node.op == "call_method" and node.target in _CASTS and len(node.all_input_nodes) == 1:
        casts.append((node.target, node.args[1:], tuple(sorted(node.kwargs.items()))))
        node = node.args[0]
    return node, tuple(reversed(casts))


def _tokens(inp: fx.Node) -> int | None:
    """Rows of the router input, if static (None when a size is symbolic or unknown)."""
    lead = node_value_meta(inp).shape[:-1]
    if any(not isinstance(d, int) for d in lead):
        return None
    return math.prod(lead)


def _bitwise_equal(weights: list[torch.Tensor], tokens: int) -> bool:
    """Whether the batched matmul gives bitwise the separate linears' logits at this token count."""
    gen = torch.Generator().manual_seed(0)
    stacked = torch.stack([torch.randn(w.shape, generator=gen).to(w.dtype) for w in weights]).to(weights[0].device)
    x = torch.randn(max(tokens, 1), stacked.shape[-1], generator=gen).to(stacked.dtype).to(stacked.device)
    batched = hoisted_logits(x, stacked)
    return all(torch.equal(torch.nn.functional.linear(x, w), batched[s]) for s, w in enumerate(stacked))


def _parameter(node: fx.Node, params) -> fx.Node | None:
    """The parameter ``node`` is, or is a no-op cast of (``R.to(float32)`` on a float32 ``R``)."""
    root, casts = _cast_chain(node)
    if root not in params:
        return None
    val = node_value_meta(node)
    if casts and (val is None or val.dtype != params[root].dtype):
        return None
    return root


class HoistRoutersPass(GraphPass):
    """Batch the routers that read the same tensor into one matmul (bitwise-equal logits)."""

    name = "hoist_routers"

    def __init__(self, freeze: bool = False) -> None:
        self.freeze = freeze
        self.hoisted: list[HoistedGroup] = []

    def __call__(self, gm: fx.GraphModule, example_inputs=None) -> None:
        self.hoisted = []
        params = parameter_values(gm, example_inputs)
        groups: dict[tuple, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            key = self._router_key(node, params)
            if key is not None:
                groups.setdefault(key, []).append(node)
        placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        for routers in groups.values():
            if len(routers) < 2:
                continue
            weights = [_parameter(r.args[1], params) for r in routers]
            if torch.is_grad_enabled() and any(params[w].requires_grad for w in weights):
                log.info("adafuse: routers %s not hoisted: their weights need gradients (the stacked copy "
                         "is outside autograd)", ", ".join(w.name for w in weights))
                continue
            tokens = _tokens(routers[0].args[0])
            if tokens is None:
                log.info("adafuse: routers %s not hoisted: the token count is symbolic, and bitwise-equal "
                         "logits can only be checked at a known count", ", ".join(w.name for w in weights))
                continue
            if not _bitwise_equal([params[w] for w in weights], tokens):
                log.info("adafuse: routers %s not hoisted: a batched matmul does not round like the separate "
                         "linears at this shape", ", ".join(w.name for w in weights))
                continue
            if self.freeze and example_inputs is not None and all(w in placeholders for w in weights):
                name = f"adafuse_stacked_routers_{len(gm.meta.get(DERIVED_INPUTS, []))}"
                stacked = add_derived_input(gm, StackedTensors(tuple(placeholders[w] for w in weights)), name)
            else:  # read at every call: no weight update is missed (a few KB per router)
                with gm.graph.inserting_before(routers[0]):
                    stacked = gm.graph.call_function(torch.stack, (weights,))
            logits, ones = self._rewrite(gm, routers, stacked)
            batched = _batch_selection(gm, logits, ones, tokens, params[weights[0]].device)
            self.hoisted.append(HoistedGroup([w.name for w in weights], tokens, batched))
            log.info("adafuse: hoisted %d routers into one batched matmul (%s)%s", len(routers),
                     ", ".join(w.name for w in weights),
                     f", their {batched} selection ops batched too" if batched else "")

    @staticmethod
    def _router_key(node: fx.Node, params):
        """What makes routers batchable together, or None if ``node`` is not a router."""
        param = _parameter(node.args[1], params) if is_linear(node) and len(node.args) >= 2 else None
        if param is None:
            return None
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        weight = params[param]
        if bias is not None or weight.dim() != 2 or weight.shape[0] > _MAX_ROUTER_OUT:
            return None
        inp = node.args[0]
        if not isinstance(inp, fx.Node) or node_value_meta(inp) is None or not _feeds_selection(node):
            return None
        return (*_cast_chain(inp), tuple(weight.shape), weight.dtype, weight.device)

    @staticmethod
    def _rewrite(gm: fx.GraphModule, routers: list[fx.Node], stacked: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
        inp = routers[0].args[0]  # the others read the same values (same root, same casts)
        with gm.graph.inserting_before(routers[0]):
            logits = gm.graph.call_function(hoisted_logits, (inp, stacked))
        ones = []
        for s, router in enumerate(routers):
            with gm.graph.inserting_before(router):
                one = gm.graph.call_function(router_logits, (logits,), dict(router=s, like=inp))
            one.meta.update(router.meta)
            ones.append(one)
            router.replace_all_uses_with(one)
            read = router.args[:2]
            gm.graph.erase_node(router)
            for cast in read:  # this router's own casts of its input and weight, now unused
                while not cast.users and cast.op == "call_method" and cast.target in _CASTS:
                    source = cast.args[0]
                    gm.graph.erase_node(cast)
                    cast = source
        return logits, ones


def _row_op(node: fx.Node) -> bool:
    """Whether ``node`` computes each row (last dim) of its tensor inputs on its own."""
    name = op_name(node)
    if node.op not in ("call_function", "call_method") or name not in _ROW_OPS:
        return False
    if name in _LAST_DIM_OPS:
        pos = _LAST_DIM_OPS[name]
        dim = node.kwargs.get("dim", node.args[pos] if len(node.args) > pos else None)
        if name == "topk" and dim is None:
            dim = -1  # topk's default
        if name in ("sum", "amax"):  # a reduction must keep the row's dim: each router's rows stay [..., 1]
            keepdim = node.kwargs.get("keepdim", node.args[pos + 1] if len(node.args) > pos + 1 else False)
            return dim == -1 and keepdim is True
        return dim == -1
    if name == "getitem":  # only an element of top-k's (values, indices): indexing a tensor is not row-wise
        return isinstance(node.args[1], int) and isinstance(node.args[0], fx.Node) and op_name(node.args[0]) == "topk"
    return True


def _chain(start: fx.Node) -> list[fx.Node]:
    """The row-wise ops computed from ``start`` alone, in graph order."""
    members, chain = {start}, []
    for node in start.graph.nodes:  # graph order is a topological order
        if node in members or not node.all_input_nodes or not _row_op(node):
            continue
        if all(n in members for n in node.all_input_nodes):
            members.add(node)
            chain.append(node)
    return chain


def _same_chains(chains: list[list[fx.Node]], starts: list[fx.Node]) -> bool:
    """Whether every router's chain is the first's op for op, reading its own nodes alike."""
    first = {n: i for i, n in enumerate([starts[0], *chains[0]])}

    def shape(node, index):
        mapped = fx.node.map_arg((node.args, node.kwargs), lambda a: ("node", index.get(a)))
        return op_name(node), node.op, repr(mapped)

    for start, chain in zip(starts[1:], chains[1:]):
        index = {n: i for i, n in enumerate([start, *chain])}
        if len(chain) != len(chains[0]) or any(shape(a, first) != shape(b, index) for a, b in zip(chains[0], chain)):
            return False
    return True


def _run_chain(chain: list[fx.Node], start: fx.Node, value: torch.Tensor) -> dict[fx.Node, object]:
    """Evaluate ``chain`` with ``start`` bound to ``value`` (what the probes check)."""
    env = {start: value}
    for node in chain:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: env[a])
        env[node] = run_target(node, args, kwargs)
    return env


def _bitwise_rows(chain: list[fx.Node], start: fx.Node, ends: list[fx.Node], routers: int, tokens: int,
                  experts: int, dtype: torch.dtype, device) -> bool:
    """Whether the chain on stacked logits [S, T, E] gives, for each router, bitwise its own
    call's results, on random probes with ties (two experts of equal logits in half the rows,
    where top-k's tie order shows) at this token count, on the device the model runs on."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(routers, max(tokens, 1), experts, generator=gen)
    logits[:, ::2, 1] = logits[:, ::2, 0]
    logits = logits.to(dtype).to(device)
    try:
        batched = _run_chain(chain, start, logits)
        for s in range(routers):
            alone = _run_chain(chain, start, logits[s])
            if not all(torch.equal(batched[e][s], alone[e]) for e in ends):
                return False
    except Exception:  # an op that does not take the stacked shape: left as it was
        return False
    return True


def _batch_selection(gm: fx.GraphModule, logits: fx.Node, ones: list[fx.Node], tokens: int, device) -> int:
    """Run the routers' selection (the row-wise ops after each router's logits) once on the
    stacked logits, where every router's is the same ops and the probes find each router's
    rows bitwise its own call's. Each router then reads its rows of the batched results (its
    decision unchanged); returns the ops per router now batched."""
    chains = [_chain(one) for one in ones]
    if not chains[0] or not _same_chains(chains, ones):
        return 0
    members = set(chains[0])
    ends = [n for n in chains[0] if any(u not in members for u in n.users)]
    if any(op_name(n) == "topk" for n in ends):  # a tuple leaves the chain: keep it whole
        return 0
    like = ones[0].kwargs["like"]
    val = node_value_meta(ones[0])  # one router's logits [..., E] (the hoisted node has no meta)
    if val is None or not _bitwise_rows(chains[0], ones[0], ends, len(ones), tokens, val.shape[-1], val.dtype,
                                        device):
        log.info("adafuse: the routers' selection ops not batched: stacked, they do not round each router's "
                 "rows as its own call does on this device, or do not take the stacked shape")
        return 0
    env = {ones[0]: logits}
    anchor = logits
    for node in chains[0]:  # the first router's chain, re-read from the stacked logits
        with gm.graph.inserting_after(anchor):
            new = gm.graph.node_copy(node, lambda a: env[a])
        new.meta = {}
        env[node] = anchor = new
    for one, chain in zip(ones, chains):
        s = one.kwargs["router"]
        for end in ends:
            mine = chain[chains[0].index(end)]
            with gm.graph.inserting_after(anchor):
                rows = gm.graph.call_function(router_logits, (env[end],), dict(router=s, like=like))
            rows.meta.update(mine.meta)
            anchor = rows
            mine.replace_all_uses_with(rows)
        for node in reversed(chain):
            if not node.users:
                gm.graph.erase_node(node)
        if not one.users:
            gm.graph.erase_node(one)
    return len(chains[0])
