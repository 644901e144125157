"""Finding adapter sites in an FX graph: a frozen linear plus adapter terms that read only its input.

A *site* is found structurally and stays a candidate until a pass verifies it numerically:

    y   = linear(x, W, b)                       # the base linear, W a parameter
    out = y + t_1 + ... + t_n                   # a chain of adds (n >= 1)

where every term ``t_i`` is computed from ``x``, parameters and at most a routing decision made
elsewhere (its backward slice has no other activation as a leaf). That covers how MoLE projects
write adapters (stacked experts gathered by index, per-expert loops with masks, dense gates, a
shared A, routing weights on the input or the output, static LoRA) without a pattern per
project: what the slice computes is
established later by probing it (:mod:`.canonical`). A term that reads another tensor (a router
on a different input, the base output itself) is not a site, and the reason is recorded.

A *decision made elsewhere* is how pre-gated models look (AdaFuse: one gate on the token
embedding, its ``(idx, g)`` read by every adapted linear): a term may read up to two tensors
computed without ``x`` from other activations, an integer one and a float one of one shape
``[..., k]`` with one row per token of ``x`` (or a float one alone, a dense gate). They become
the site's :attr:`Site.externals`; whether they really are the decision is again established
by probing.

Works on Dynamo graphs (parameters are placeholders whose example inputs are ``nn.Parameter``)
and on ``symbolic_trace`` graphs (parameters are ``get_attr`` nodes).
"""

from __future__ import annotations

import dataclasses
import operator
import re

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["REWRITTEN_META", "VIEW_OPS", "Site", "Rejected", "ancestors", "find_sites", "has_routing", "is_inplace", "is_linear", "is_write", "needs_gradients",
           "node_value_meta", "op_name", "parameter_values", "run_target", "size_values", "writers"]

_LINEAR_TARGETS = (torch._C._nn.linear, F.linear)
# node.meta key of the nodes a pass already rewrote into a batched form (the module path): they
# are no candidate sites of their own.
REWRITTEN_META = "adafuse_rewritten"
_ADD_TARGETS = (operator.add, operator.iadd, torch.add)


@dataclasses.dataclass
class Site:
    """One adapted linear: ``out = linear(x, weight, bias) + terms``, not yet verified."""

    out: fx.Node
    x: fx.Node
    base: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    terms: list[fx.Node]
    nodes: list[fx.Node]  # every node computing ``out`` from x and parameters, in graph order
    params: list[fx.Node]  # parameter leaves of the adapter terms (not weight/bias)
    path: str  # module path of the site, from the base weight's name
    externals: list[fx.Node] = dataclasses.field(default_factory=list)  # a decision made elsewhere

    @property
    def name(self) -> str:
        return self.path or "<root>"


@dataclasses.dataclass
class Rejected:
    """A linear with extra terms that is not a site, and why."""

    path: str
    reason: str


def node_value_meta(node: fx.Node):
    """The example tensor (Dynamo, AOT) or TensorMetadata (ShapeProp) recorded on ``node``."""
    for key in ("example_value", "val", "tensor_meta"):
        val = node.meta.get(key)
        if isinstance(val, torch.Tensor) or hasattr(val, "shape") and hasattr(val, "dtype"):
            return val
    return None


def ancestors(node: fx.Node, stop=frozenset()) -> set[fx.Node]:
    """Every node ``node`` is computed from, not looking past (nor including) ``stop``."""
    found, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in stop and n not in found:
            found.add(n)
            stack.extend(n.all_input_nodes)
    return found


def needs_gradients(site: Site, params: dict[fx.Node, torch.Tensor]) -> bool:
    """Whether autograd would need this site's parameters or input (the fused op has no backward)."""
    if not torch.is_grad_enabled():
        return False
    x = site.x.meta.get("example_value", site.x.meta.get("val"))
    return (isinstance(x, torch.Tensor) and x.requires_grad) or any(
        params[p].requires_grad for p in (site.weight, *site.params))


def has_routing(site: Site) -> bool:
    """Whether the site computes a routing decision (a ``topk`` or ``softmax``): not a static LoRA."""
    return any(getattr(n.target, "__name__", n.target) in ("topk", "softmax") for n in site.nodes
               if n.op in ("call_function", "call_method"))


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _LINEAR_TARGETS


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_TARGETS:
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def size_values(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, int]:
    """Symbolic-size placeholders (dynamic shapes) with the sizes of this example."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sizes = {}
    for n, v in zip(placeholders, example_inputs or ()):
        if _is_size(n):
            hint = v.node.hint if isinstance(v, torch.SymInt) else v
            if hint is not None:
                sizes[n] = int(hint)
    return sizes


def parameter_values(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, torch.Tensor]:
    """Nodes that hold parameters (or buffers) of the model, with their current values."""
    values: dict[fx.Node, torch.Tensor] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if example_inputs is not None:
        for node, value in zip(placeholders, example_inputs):
            source = _source_name(getattr(node.meta.get("grapharg"), "source", None))
            is_param = isinstance(value, torch.nn.Parameter) or "_parameters[" in source
            # A module buffer the graph never writes is a weight too (PEFT Arrow's router
            # prototypes): read at every call, like a parameter, and drawn at random when probing.
            is_buffer = "_buffers[" in source and not writers(node)
            if (is_param or is_buffer) and isinstance(value, torch.Tensor):
                values[node] = value
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _get_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                values[node] = value
    return values


VIEW_OPS = ("getitem", "view", "reshape", "transpose", "permute", "select", "narrow", "unsqueeze", "squeeze",
          "expand", "as_strided", "t", "flatten", "unflatten", "split", "chunk")


def writers(node: fx.Node) -> list[fx.Node]:
    """The nodes that write ``node`` in place, directly or through a view of it (a KV cache)."""
    stack, seen, found = [node], set(), []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if u.args and u.args[0] is n and is_write(u):
                found.append(u)
            elif getattr(u.target, "__name__", u.target) in VIEW_OPS:
                stack.append(u)
    return found


def _get_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _source_name(source) -> str:
    if source is None:
        return ""
    name = source.name
    return name() if callable(name) else str(name)


def module_path(node: fx.Node) -> str:
    """``layers.0.q_proj`` from a weight node (Dynamo source or get_attr target), dropping ``.weight``."""
    if node.op == "get_attr":
        parts = node.target.split(".")
    else:
        # L['self']._modules['model'].layers_[0].wq_._parameters['weight'] (modules, plain
        # attributes, lists and dicts: MoE-PEFT keeps its layers in lists and objects)
        src = _source_name(getattr(node.meta.get("grapharg"), "source", None))
        src = re.sub(r"^[LG]\['[^']*'\]", "", src)
        parts = [next(p for p in m if p) for m in re.findall(
            r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]|\['([^']+)'\]", src)]
        parts = [p for p in parts if p not in ("__dict__", "_modules", "_parameters", "_buffers")]
        if not parts:
            return node.name
    parts = parts[:-1]  # the parameter's own name
    if parts and parts[-1] in ("base_layer", "base_layer_"):  # PEFT's, MoE-PEFT's and our naming: the wrapper
        parts = parts[:-1]
    return ".".join(parts)


def op_name(node: fx.Node) -> str:
    """The bare name of what ``node`` calls (``add_`` for ``x.add_``, ``iadd`` for ``+=``)."""
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", str(node.target))


def run_target(node: fx.Node, args, kwargs, gm: fx.GraphModule | None = None):
    """What ``node`` computes from the values ``args``/``kwargs`` of its arguments: its function,
    its method on ``args[0]``, or (with ``gm``) its submodule, called."""
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module" and gm is not None:
        return gm.get_submodule(node.target)(*args, **kwargs)
    raise NotImplementedError(f"cannot run {node.op} node {node.name}")


_INPLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow)


def is_inplace(node: fx.Node) -> bool:
    """Whether ``node`` mutates its first argument (``x.scatter_(...)``, ``a += b``)."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("_"))
    return False


def is_write(node: fx.Node) -> bool:
    """Whether ``node`` writes into its first argument: an in-place op or ``x[i] = v``."""
    return is_inplace(node) or (node.op == "call_function" and node.target is operator.setitem)


def _why_not_a_leaf(node: fx.Node) -> str:
    if _is_float_scalar(node):
        return (f"an adapter term reads the scalar input {node.name}: a Python float that Dynamo "
                "passes as an input (dynamic=True); a scale that can change is not baked into a "
                "rewrite (compile without dynamic=True, or with automatic dynamic shapes)")
    return f"an adapter term reads the graph input {node.name} besides the linear's input and parameters"


def _why_not_a_decision(externals: list[fx.Node], params) -> str:
    sources = {n for e in externals for n in (ancestors(e) | {e}) if n.op == "placeholder" and n not in params}
    names = ", ".join(sorted(n.name for n in sources))
    return (f"an adapter term reads {', '.join(e.name for e in externals)}, computed from {names} (not the "
            "linear's input), and that is not a routing decision (an integer and a float tensor [..., k], "
            "one row per token)")


def _is_size(node: fx.Node) -> bool:
    return isinstance(node.meta.get("example_value"), (torch.SymInt, int))


class _Dependence:
    """Which nodes are computed from activations (graph inputs that are not parameters or sizes),
    memoized over one graph: the values a site may take from outside as its decision."""

    def __init__(self, params: dict[fx.Node, torch.Tensor]) -> None:
        self.params, self.memo = params, {}

    def on_activations(self, node: fx.Node) -> bool:
        if node not in self.memo:
            stack = [node]
            while stack:  # iterative post-order: graphs are thousands of nodes deep
                n = stack[-1]
                pending = [m for m in n.all_input_nodes if m not in self.memo]
                if pending:
                    stack.extend(pending)
                    continue
                stack.pop()
                if n in self.memo:
                    continue
                if n in self.params or (n.op == "placeholder" and _is_size(n)):
                    self.memo[n] = False
                elif n.op in ("placeholder", "get_attr"):
                    self.memo[n] = True
                else:
                    self.memo[n] = any(self.memo[m] for m in n.all_input_nodes)
        return self.memo[node]


def _descendants_of(x: fx.Node) -> set[fx.Node]:
    """Every node computed from ``x``, a tensor that an in-place op writes ``x``-derived values
    into (``out.index_add_(0, tokens, expert_out)``) included."""
    found, stack = set(), [x]
    while stack:
        n = stack.pop()
        written = [n.args[0]] if is_inplace(n) and n.args and isinstance(n.args[0], fx.Node) else []
        for u in [*n.users, *written]:
            if u not in found and u is not x:
                found.add(u)
                stack.append(u)
    return found


def _slice(term: fx.Node, x: fx.Node, params: dict[fx.Node, torch.Tensor], from_x: set[fx.Node],
           dependence: _Dependence):
    """Backward slice of ``term`` stopping at ``x``, parameters and values computed elsewhere:
    ``(nodes, param_leaves, externals, bad_leaf)``.

    A value not computed from ``x`` but from other activations is an *external* leaf (a decision
    made elsewhere, or a router on another tensor: telling them apart is the probes' job).
    In-place ops that mutate a value of the slice (``mask.scatter_(...)`` has no users, yet
    changes ``mask``) belong to it too: without them a replay of the slice computes something
    else.
    """
    seen: set[fx.Node] = set()
    nodes, leaves, externals = [], [], []
    stack = [term]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is x:
            continue
        if n in params:
            leaves.append(n)
            continue
        if n.op == "placeholder" and _is_size(n):
            continue  # a symbolic size (dynamic shapes): bound to its example value when probing
        if n.op == "placeholder" and _is_float_scalar(n):
            return None, None, None, n
        if (n not in from_x and dependence.on_activations(n) and not _adapts_decision(n, params)
                and not _selects_from_decision(n, x)):
            externals.append(n)
            continue
        if n.op in ("placeholder", "get_attr"):
            return None, None, None, n
        nodes.append(n)
        stack.extend(n.all_input_nodes)
        stack.extend(u for u in n.users if is_inplace(u) and u.args and u.args[0] is n)
    return nodes, leaves, externals, None


_LAYOUT_METHODS = ("view", "reshape", "unsqueeze", "squeeze", "flatten", "expand", "contiguous", "to", "type",
                   "float", "half", "bfloat16", "long", "int")
_LAYOUT_FUNCTIONS = (torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten)


def _adapts_decision(node: fx.Node, params) -> bool:
    """Whether a value computed elsewhere is still the site's own use of the decision: a reshape
    or cast of it, or experts gathered by it (``A[idx]``). The slice goes on through these, so
    that the external leaves are the decision tensors themselves."""
    if node.op == "call_method":
        return node.target in _LAYOUT_METHODS
    if node.op == "call_function":
        if node.target in _LAYOUT_FUNCTIONS:
            return True
        if node.target in (operator.getitem, torch.index_select, F.embedding):
            source = node.args[1] if node.target is F.embedding else node.args[0]
            return source in params
    return False


_SELECT_METHODS = ("select", "narrow", "unsqueeze", "squeeze", "view", "reshape")


def _selects_from_decision(node: fx.Node, x: fx.Node) -> bool:
    """Whether ``node`` takes a fixed part of a tensor that already has one row per token of ``x``
    (``scalings[:, :, e]``, a column of a dense decision): the slice goes on to that tensor, so
    that the columns a site reads one per expert become one decision ``[..., E]``."""
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if any(isinstance(i, fx.Node) or not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in index):
            return False
    elif not (node.op == "call_method" and node.target in _SELECT_METHODS):
        return False
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    shape, x_shape = _rows(source) if source is not None else None, _rows(x)
    dims = (node_value_meta(source).dim(), node_value_meta(x).dim()) if shape and x_shape else None
    return bool(dims) and not _differ(shape[0], x_shape[0]) and (dims[0] == dims[1] or dims[0] == 2)


def _is_float_scalar(node: fx.Node) -> bool:
    val = node.meta.get("example_value")
    return isinstance(val, torch.Tensor) and val.dim() == 0 and val.is_floating_point()


def _rows(node: fx.Node):
    """``(rows, last, is_float)`` of a tensor node's example value (rows: product of leading sizes)."""
    val = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    rows = 1
    for d in val.shape[:-1]:
        rows = rows * d
    return rows, val.shape[-1], val.is_floating_point()


def _decision_shaped(externals: list[fx.Node], x: fx.Node) -> bool:
    """Whether ``externals`` can be a decision for ``x``: an integer and a float tensor of one
    shape ``[..., k]``, or one float tensor, with one row per token of ``x``."""
    shapes = [_rows(e) for e in externals]
    x_rows = _rows(x)
    if x_rows is None or any(s is None for s in shapes) or any(_differ(s[0], x_rows[0]) for s in shapes):
        return False
    if len(shapes) == 1:
        return shapes[0][2]
    return (len(shapes) == 2 and shapes[0][2] != shapes[1][2] and not _differ(shapes[0][1], shapes[1][1]))


def _differ(a, b) -> bool:
    """Sizes known to differ (symbolic sizes compare by their hints)."""
    hint = lambda d: d.node.hint if isinstance(d, torch.SymInt) else d  # noqa: E731
    return hint(a) != hint(b)


# What tensor parallelism (torch.distributed.tensor.parallel) puts around a sharded linear: the
# input made a DTensor (``from_local``) and the output made local again (``redistribute`` to the
# output layout, ``to_local``, the wait of an asynchronous collective).
_TP_INPUT = ("from_local",)
_TP_OUTPUT = ("redistribute", "to_local", "wait", "wait_tensor", "full_tensor")


def _wrapper_subclass(value: torch.Tensor) -> str | None:
    """The class name of a tensor subclass that wraps other tensors (DTensor, a quantized weight), else None."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return type(value).__name__ if is_traceable_wrapper_subclass(value) else None


def _local_input(x: fx.Node) -> fx.Node:
    """``x0`` for ``x = DTensor.from_local(x0, ...)``, possibly redistributed (a row-parallel
    linear's input sharded on its last dimension): what the adapter terms read."""
    cur = x
    while (cur.op in ("call_function", "call_method") and op_name(cur) in _TP_INPUT + ("redistribute",)
           and isinstance(cur.args[0], fx.Node)):
        cur = cur.args[0]
    return cur


def _past_output_hooks(base: fx.Node) -> fx.Node:
    """The last of the single-user tensor-parallel output conversions after ``base`` (or ``base``)."""
    cur = base
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        if user.op not in ("call_function", "call_method") or op_name(user) not in _TP_OUTPUT:
            break
        cur = user
    return cur


def find_sites(gm: fx.GraphModule, example_inputs=None) -> tuple[list[Site], list[Rejected]]:
    """Candidate sites in graph order, and linears with extra terms that were rejected (with why).

    Reads the graph only. Linears are ``F.linear`` calls: a ``symbolic_trace`` graph's
    ``nn.Linear`` modules become those in :class:`~.normalize.NormalizeLinearsPass` first.
    """
    params = parameter_values(gm, example_inputs)
    dependence = _Dependence(params)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites: list[Site] = []
    rejected: list[Rejected] = []
    for base in gm.graph.nodes:
        if not is_linear(base) or len(base.args) < 2 or base.args[1] not in params or REWRITTEN_META in base.meta:
            continue
        x, weight = base.args[0], base.args[1]
        bias = base.args[2] if len(base.args) > 2 else base.kwargs.get("bias")
        if not isinstance(x, fx.Node) or (bias is not None and bias not in params):
            continue
        subclass = _wrapper_subclass(params[weight])
        if subclass is not None:  # tensor parallel: from_local(x) -> linear -> redistribute -> to_local
            x = _local_input(x)
        start = _past_output_hooks(base) if subclass is not None else base
        if any(is_inplace(u) and u.args[0] is x for u in x.users):
            rejected.append(Rejected(module_path(weight), "the linear's input is modified in place"))
            continue
        path = module_path(weight)
        from_x = _descendants_of(x)
        cur, terms, nodes, leaves, externals, reason = start, [], {base}, [], [], None
        while len(cur.users) == 1:
            user = next(iter(cur.users))
            if not _is_add(user):
                break
            term = user.args[1] if user.args[0] is cur else user.args[0]
            if not isinstance(term, fx.Node) or term not in from_x:
                break  # an adapter reads x; anything else (a residual) ends the chain
            term_nodes, term_leaves, term_externals, bad = _slice(term, x, params, from_x, dependence)
            if bad is not None:
                reason = _why_not_a_leaf(bad)
                break
            if base in term_nodes:
                reason = "an adapter term reads the base linear's output"
                break
            if not term_leaves:
                break  # e.g. a residual of x itself: not an adapter
            terms.append(term)
            nodes.update(term_nodes)
            nodes.add(user)
            leaves.extend(term_leaves)
            externals.extend(term_externals)
            cur = user
        externals = sorted(set(externals), key=order.__getitem__)
        if terms and subclass is not None:
            rejected.append(Rejected(path, (
                f"the base linear's weight is a {subclass} (a tensor-parallel shard or another wrapper subclass): the "
                "fused ops take plain local tensors, so the site is left as it is")))
        elif terms and externals and not _decision_shaped(externals, x):
            rejected.append(Rejected(path, _why_not_a_decision(externals, params)))
        elif terms:
            leaf_set = list(dict.fromkeys(p for p in leaves if p not in (weight, bias)))
            sites.append(Site(cur, x, base, weight, bias, terms, sorted(nodes, key=order.__getitem__), leaf_set,
                              path, externals))
        elif reason is not None:
            rejected.append(Rejected(path, reason))
    return sites, rejected
