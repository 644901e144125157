"""What a candidate site computes, established by probing it in float64.

For a site ``out = linear(x, W, b) + terms`` (:mod:`.sites`) this module looks for a canonical
form ``out = lora_moe_linear_ref(x, W, b, A, B, idx, g, scale)`` (definition in
:mod:`adafuse_compile.kernels.reference`):

- the *decision* ``(idx, g)`` is taken from nodes the site already computes (the indices of a
  ``topk``, and a float tensor of the same shape derived from its values; or a softmax over
  all experts for a dense gate). Reusing the model's own routing nodes keeps routing bitwise
  identical to eager (same ops, same dtypes), including near-ties;
- the *experts* ``A [E or 1, r, in]``, ``B [E, out, r]`` come from the site's parameters: one
  stacked tensor each, or one matrix per expert (ordered by module name), or a shared A;
- the *scale* is a constant of the code (``alpha / r``), fitted by least squares on a probe.

Each combination is accepted only if it is *proved* (:mod:`.verify`): the adapter is linear in
``x`` once the decision is fixed, and the canonical form equals the site on random draws of every
parameter, input and decision. Otherwise the site is left unchanged and the reason says why.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading

import torch
import torch.fx as fx

from .graph_ops import canonical_A, canonical_B
from .sites import Site, ancestors, node_value_meta
from .verify import (ROUTING_LEAK, DecisionDraws, canonical_delta, draw_probes, identity_holds, linearity_violation,
                     op_name, replay_failure, replay_random)

__all__ = ["FORMS", "Canonical", "SiteForms", "canonicalize", "stack_experts"]


@dataclasses.dataclass
class Canonical:
    """A verified canonical form of a site. Node fields are graph nodes (or node lists to stack)."""

    idx: fx.Node | None  # None: every expert (dense gate, or the single static adapter)
    g: fx.Node | None  # None: static LoRA, weight 1
    A: fx.Node | list[fx.Node]
    B: fx.Node | list[fx.Node]
    A_layout: str  # "eri" ([E, r, in]), "eir" ([E, in, r]), "ri" (one shared [r, in]) or "list"
    B_layout: str  # "eor" ([E, out, r]), "ero" ([E, r, out]) or "list"
    experts: int
    rank: int
    k: int
    scale: float
    gate: str  # see _gate_variant: softmax_topk, topk_softmax, top_p, topk, dense or static


def _shape(node: fx.Node):
    val = node_value_meta(node)
    return tuple(val.shape) if val is not None else None


def _natural_key(node: fx.Node):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(node.target))]


def _decision_candidates(site: Site, values: dict):
    """``(idx_node or None, g_node, k, gate, source)`` the site computes, most specific first.

    ``source`` is the ``topk`` or ``softmax`` node the decision comes from: what it is computed
    from is the router, never an expert.
    """
    out = []
    for node in site.nodes:
        is_topk = (node.op == "call_function" and node.target is torch.topk) or (
            node.op == "call_method" and node.target == "topk")
        if is_topk:
            getters = {u.args[1]: u for u in node.users if u.op == "call_function" and len(u.args) == 2}
            idx, vals = getters.get(1), getters.get(0)
            if idx is None or vals is None:
                continue
            k_shape = tuple(values[idx].shape)
            # g: any float tensor of the decision's shape computed from the top-k values.
            derived = _descendants(vals, site.nodes)
            for g in reversed(derived):
                v = values.get(g)
                if isinstance(v, torch.Tensor) and v.is_floating_point() and tuple(v.shape) == k_shape:
                    out.append((idx, g, k_shape[-1], "top-k", node))
    for node in site.nodes:  # dense gates: a probability vector over all experts
        v = values.get(node)
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 1:
            if node.op == "call_function" and node.target in (torch.softmax, torch.nn.functional.softmax):
                out.append((None, node, v.shape[-1], "dense", node))
            elif node.op == "call_method" and node.target == "softmax":
                out.append((None, node, v.shape[-1], "dense", node))
    return out


_SOFTMAX = ("softmax", "_softmax")
_MASKING = ("where", "masked_fill", "mul")


def _descendants(node: fx.Node, within: list[fx.Node]) -> list[fx.Node]:
    """``node`` and the nodes of ``within`` (in graph order) computed from it, in that order."""
    members = set(within)
    found, stack = {node}, [node]
    while stack:
        for user in stack.pop().users:
            if user in members and user not in found:
                found.add(user)
                stack.append(user)
    return [n for n in within if n in found]


def _gate_variant(kind: str, source: fx.Node | None, g: fx.Node | None) -> str:
    """The gate variant (the names of the README's glossary: softmax_topk, topk_softmax, dense, top_p) from the nodes between the router and ``g``.

    Only a label for reports: the rewrite reuses the model's own routing nodes whatever it is.
    """
    if kind != "top-k":
        return kind
    between = (ancestors(g) | {g}) - ancestors(source) - {source}
    before = ancestors(source)
    if any(op_name(n) in _SOFTMAX for n in between):
        return "topk_softmax"
    if any(op_name(n) in _SOFTMAX for n in before):
        if any(op_name(n) in ("truediv", "div", "itruediv") for n in between):
            return "softmax_topk"
        if any(op_name(n) in _MASKING for n in between):
            return "top_p"
        return "softmax_topk (not renormalized)"
    return "topk"


def _expert_candidates(site: Site, params: dict[fx.Node, torch.Tensor], in_f: int, out_f: int, routing: set):
    """``(A, A_layout, B, B_layout, E, r)`` from the adapter's parameters, plausible layouts first.

    ``routing`` holds the nodes the decision is computed from: the router's weight is among
    them and is never taken for an expert (with r == E it has the shape of an A).
    """
    shapes = {p: tuple(params[p].shape) for p in site.params if p not in routing}
    found = []
    three_d = [p for p, s in shapes.items() if len(s) == 3]
    for a in three_d:
        for b in three_d:
            if a is b:
                continue
            sa, sb = shapes[a], shapes[b]
            for a_layout, (E_a, r_a) in (("eri", (sa[0], sa[1])), ("eir", (sa[0], sa[2]))):
                if (a_layout == "eri" and sa[2] != in_f) or (a_layout == "eir" and sa[1] != in_f):
                    continue
                for b_layout, (E_b, r_b) in (("eor", (sb[0], sb[2])), ("ero", (sb[0], sb[1]))):
                    if (b_layout == "eor" and sb[1] != out_f) or (b_layout == "ero" and sb[2] != out_f):
                        continue
                    if r_a == r_b and E_a in (1, E_b):
                        found.append((a, a_layout, b, b_layout, E_b, r_a))
    two_d = [p for p, s in shapes.items() if len(s) == 2]
    for r in sorted({s[1] for p, s in shapes.items() if len(s) == 2 and s[0] == out_f}):
        b_list = sorted((p for p in two_d if shapes[p] == (out_f, r)), key=_natural_key)
        a_list = sorted((p for p in two_d if shapes[p] == (r, in_f) and p not in b_list), key=_natural_key)
        if not a_list:
            continue
        if len(a_list) == len(b_list):
            found.append((a_list, "list", b_list, "list", len(b_list), r))
        for a in a_list if len(a_list) != len(b_list) else ():  # a shared A (HydraLoRA)
            found.append((a, "ri", b_list, "list", len(b_list), r))
    return found


def stack_experts(A, A_layout, B, B_layout, values):
    """Canonical ``A`` and ``B`` tensors for expert nodes (or node lists), from ``values``."""
    get = lambda n: [values[m] for m in n] if isinstance(n, list) else values[n]  # noqa: E731
    return canonical_A(get(A), A_layout), canonical_B(get(B), B_layout)


def _concrete(shape):
    """A shape with symbolic sizes replaced by this example's values (their hints)."""
    out = []
    for d in shape:
        if isinstance(d, torch.SymInt):
            hint = d.node.hint
            if hint is None:
                return None
            d = int(hint)
        out.append(int(d))
    return tuple(out)


def canonicalize(gm: fx.GraphModule, site: Site, params: dict[fx.Node, torch.Tensor],
                 sizes: dict[fx.Node, int] | None = None) -> tuple[Canonical | None, str]:
    """A proved canonical form of ``site``, or ``(None, reason)``.

    ``sizes`` binds symbolic-size placeholders (dynamic shapes) to this example's sizes; the
    proof then also covers other token counts the graph can serve. Only the *shapes* of
    ``params`` are read, never their values.

    The outcome is a property of the site's structure (its ops, constants, shapes and dtypes,
    and which leaf each op reads), not of its nodes: a site isomorphic to one already proved
    (the same projection in another layer, the same graph recompiled) reuses that proof instead
    of probing again (:class:`SiteForms`).
    """
    key = FORMS.key(site, params, sizes or {})
    if key is not None:
        hit = FORMS.get(key, site, params)
        if hit is not None:
            return hit
    canon, reason = _canonicalize(gm, site, params, sizes)
    if key is not None:
        FORMS.put(key, site, params, canon, reason)
    return canon, reason


def _canonicalize(gm: fx.GraphModule, site: Site, params: dict[fx.Node, torch.Tensor],
                  sizes: dict[fx.Node, int] | None = None) -> tuple[Canonical | None, str]:
    x_shape = _shape(site.x)
    if x_shape is None or _shape(site.out) is None:
        return None, "no example value for the site's input or output"
    x_shape = _concrete(x_shape)
    if x_shape is None:
        return None, "the input's shape has a data-dependent size with no example value"
    integral = [p.name for p in site.params if not params[p].is_floating_point()]
    if integral:
        return None, (f"an adapter term reads the integer tensor(s) {', '.join(integral)}: a table whose "
                      "values would be baked into the rewrite")
    out_f, in_f = params[site.weight].shape
    shapes = _token_shapes(site, sizes or {}, x_shape)
    if site.externals:
        decisions = _external_decisions(site)
    else:
        try:  # one replay on random values, for the shapes and dtypes of what the site computes
            _, values = replay_random(gm, site, params, *shapes[0], torch.Generator().manual_seed(0))
        except Exception as e:  # model code: anything can raise
            return None, replay_failure(e)
        decisions = _decision_candidates(site, values)
    routing = set().union(*(ancestors(source) for *_, source in decisions if source is not None))
    if not site.externals:
        decisions.append((None, None, 1, "static", None))  # one adapter, no router (PEFT's LoRA)
    experts = _expert_candidates(site, params, in_f, out_f, routing)
    if not experts:
        return None, "no expert parameters of LoRA shape ([E, r, in] / [E, out, r] or per-expert [r, in] / [out, r])"
    reasons = []
    for idx, g, k, gate, source in decisions:
        fixed = {n for n in (idx, g) if n is not None}
        violation = linearity_violation(gm, site, fixed)
        if violation is not None:
            reasons.append(violation)
            continue
        width = _router_width(source) if gate == "top-k" else None
        for E in sorted({c[4] for c in experts}):
            if (gate == "static" and E != 1) or (idx is None and gate != "static" and k != E) or k > E:
                continue
            if width is not None and width != E:  # the router chooses among `width`: draws must too
                reasons.append(f"the router chooses among {width} experts, but the adapter's parameters hold "
                               f"{E} (a duplicated or unused expert table)")
                continue
            probes = draw_probes(gm, site, params, shapes, _decision_override(site, idx, g, E))
            if isinstance(probes, str):
                reasons.append(probes)
                continue
            for A, A_layout, B, B_layout, E_c, r in experts:
                if E_c != E:
                    continue
                scale = identity_holds(probes, _canonical_fn(site, (A, A_layout, B, B_layout), idx, g, E, in_f))
                if scale is not None:
                    variant = _gate_variant(gate, source, g) if not site.externals else gate
                    return (Canonical(idx, g, A, B, A_layout, B_layout, E, r, k, scale, variant),
                            _proof(len(probes), [s for s, _ in shapes], gate))
    if reasons:  # the most specific decision's, unless it only blames the routing (a wrong candidate)
        return None, sorted(reasons, key=lambda r: r.startswith(ROUTING_LEAK))[0]
    if len(decisions) == 1 and not site.externals:
        return None, "no routing decision found (a top-k, or a softmax over the experts), and not a static LoRA"
    if site.externals:
        names = ", ".join(e.name for e in site.externals)
        return None, (f"the adapter reads {names}, computed elsewhere, but no canonical form with it as the "
                      f"decision equals the site for random weights, inputs and decisions ({len(experts)} expert "
                      "layouts tried)")
    return None, (f"no canonical form equals the site for random weights, inputs and decisions ({len(experts)} "
                  f"expert layouts x {len(decisions)} routing decisions tried)")


class SiteForms:
    """Proof outcomes by site structure, process-wide: ``key(site)`` encodes every node of the
    site (op, target, constant arguments, the shape and dtype of its value) with each reference
    to another node as its role: a node of the site (by position), the input, the base weight or
    bias, a parameter (by its rank in the natural order of the parameter names, which orders
    per-expert lists), a decision read from elsewhere, or a size binding. Two sites with one key
    are the same computation on differently named tensors, so the outcome of one holds for the
    other. Sites with a node this encoding cannot name (a submodule call) are not cached."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._forms: dict = {}
        self._lock = threading.Lock()
        self.hits = 0

    def key(self, site: Site, params, sizes: dict):
        order = {n: i for i, n in enumerate(site.nodes)}
        ranked = {p: i for i, p in enumerate(sorted(site.params, key=_natural_key))}
        roles = {site.x: ("x",), site.weight: ("W",), **({site.bias: ("b",)} if site.bias is not None else {}),
                 **{p: ("p", ranked[p]) for p in site.params}, **{e: ("e", i) for i, e in enumerate(site.externals)}}

        def ref(a):
            if isinstance(a, fx.Node):
                if a in order:
                    return ("n", order[a])
                if a in roles:
                    return (*roles[a], _meta_key(a, params))
                if a in sizes:
                    return ("s", sizes[a])
                raise _Uncacheable
            if isinstance(a, (tuple, list)):
                return (type(a).__name__, *map(ref, a))
            if isinstance(a, dict):
                return ("dict", *((k, ref(v)) for k, v in sorted(a.items())))
            if isinstance(a, slice):
                return ("slice", ref(a.start), ref(a.stop), ref(a.step))
            if a is None or isinstance(a, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format,
                                           torch.layout)) or a is Ellipsis:
                return (type(a).__name__, repr(a))
            raise _Uncacheable

        try:
            nodes = tuple((n.op, _target_key(n), ref(n.args), ref(n.kwargs), _meta_key(n, params),
                           n is site.out, n is site.base) for n in site.nodes)
            leaves = tuple(ref(n) for n in (site.x, site.weight, site.bias, *site.params, *site.externals))
        except _Uncacheable:
            return None
        return nodes, leaves, torch.is_grad_enabled()

    def get(self, key, site: Site, params):
        with self._lock:
            found = self._forms.get(key)
        if found is None:
            return None
        form, reason = found
        self.hits += 1
        if form is None:
            return None, reason
        nodes = self._local(site, params)
        pick = lambda r: [nodes[i] for i in r] if isinstance(r, list) else (None if r is None else nodes[r])  # noqa: E731
        return dataclasses.replace(form, idx=pick(form.idx), g=pick(form.g), A=pick(form.A), B=pick(form.B)), reason

    def put(self, key, site: Site, params, canon: Canonical | None, reason: str) -> None:
        form = None
        if canon is not None:
            index = {n: i for i, n in enumerate(self._local(site, params))}
            local = lambda r: [index[n] for n in r] if isinstance(r, list) else (None if r is None else index[r])  # noqa: E731
            form = dataclasses.replace(canon, idx=local(canon.idx), g=local(canon.g), A=local(canon.A), B=local(canon.B))
        with self._lock:
            if len(self._forms) >= self.LIMIT:
                self._forms.pop(next(iter(self._forms)))
            self._forms[key] = (form, reason)

    @staticmethod
    def _local(site: Site, params) -> list[fx.Node]:
        """The site's nodes and leaves in the order the key names them."""
        return [*site.nodes, site.x, site.weight, site.bias, *sorted(site.params, key=_natural_key), *site.externals]

    def __len__(self) -> int:
        return len(self._forms)

    def clear(self) -> None:
        with self._lock:
            self._forms.clear()
            self.hits = 0


class _Uncacheable(Exception):
    pass


def _target_key(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', repr(t))}"


def _meta_key(node: fx.Node, params):
    val = params.get(node) if node in params else node_value_meta(node)
    if val is None:
        raw = node.meta.get("example_value", node.meta.get("val"))
        return ("value", type(raw).__name__, repr(raw) if isinstance(raw, (int, float, bool)) else None)
    return (tuple(str(d) for d in val.shape), str(val.dtype))


FORMS = SiteForms()


def _router_width(topk: fx.Node) -> int | None:
    """How many experts a ``topk`` chooses among (the last size of what it ranks)."""
    val = node_value_meta(topk.args[0]) if topk.args and isinstance(topk.args[0], fx.Node) else None
    shape = _concrete(val.shape) if val is not None else None
    return shape[-1] if shape else None


def _proof(probes: int, shapes: list[tuple], gate: str) -> str:
    tokens = ", ".join(str(math.prod(s[:-1])) for s in shapes)
    drawn = "every expert drawn" if gate not in ("static", "dense", "pre-gated dense") else "every expert weighted"
    return f"proved: linear for a fixed decision; equal on {probes} random draws at T={tokens}; {drawn}"


def _token_shapes(site: Site, sizes: dict[fx.Node, int], x_shape: tuple) -> list[tuple[tuple, dict]]:
    """``(x shape, size bindings)`` to probe at: this example's, and in a graph whose token count is
    symbolic, two more it can serve (Dynamo specializes sizes 0 and 1, so symbolic ones are >= 2).

    Other size symbols with the same value in this example vary with it: they are the same size
    seen through another tensor (a mask's batch, a cache's length) as far as the graph can tell.
    """
    out = [(x_shape, dict(sizes))]
    val = node_value_meta(site.x)
    by_expr = {v.node.expr: n for n in sizes for v in (n.meta.get("example_value"),)
               if isinstance(v, torch.SymInt)}
    for dim, d in enumerate(val.shape[:-1] if val is not None else ()):
        node = by_expr.get(d.node.expr) if isinstance(d, torch.SymInt) else None
        if node is None:
            continue
        same = [n for n, v in sizes.items() if v == sizes[node]]
        for t in sorted({2, x_shape[dim] + 3} - {x_shape[dim]}):
            shape = tuple(t if s == x_shape[dim] and isinstance(e, torch.SymInt) and e.node.expr == d.node.expr
                          else s for s, e in zip(x_shape, val.shape))
            out.append((shape, {**sizes, **{n: t for n in same}}))
        break  # one symbolic token dimension varied: the others keep this example's sizes
    return out


def _decision_override(site: Site, idx, g, E: int):
    """For :func:`~.verify.draw_probes`: per token count, ``(seed, override, covered)``: random
    decisions (experts distinct per row) put in place of the site's own (``override``, as a node
    is computed) or of a decision read from elsewhere (``seed``, before the replay), and whether
    every expert was drawn yet."""

    def make(gen):
        draws, seen = DecisionDraws(E, gen), set()

        def draw(node, value):
            if node is idx:
                value = draws.indices(tuple(value.shape), value.dtype)
                seen.update(value.reshape(-1).tolist())
            elif node is g:
                value = draws.weights(tuple(value.shape))
            return value

        def seed(env):
            for node in site.externals:
                shape = _external_shape(node, tuple(env[site.x].shape))
                env[node] = draw(node, torch.empty(shape, dtype=_dtype_of(node) or torch.int64))

        return seed, (None if site.externals else draw), lambda: idx is None or len(seen) >= E

    return make


def _external_shape(node: fx.Node, x_shape: tuple) -> tuple:
    """The shape of a decision ``[..., k]`` read from elsewhere, for an input of ``x_shape``."""
    shape = _concrete(_shape(node))
    k = shape[-1]
    if len(shape) == len(x_shape):
        return (*x_shape[:-1], k)
    return (math.prod(x_shape[:-1]), k)


def _external_decisions(site: Site):
    idx = next((e for e in site.externals if not _is_float(e)), None)
    g = next(e for e in site.externals if _is_float(e))
    k = _concrete(_shape(g))[-1]
    return [(idx, g, k, "pre-gated" if idx is not None else "pre-gated dense", None)]


def _canonical_fn(site: Site, experts, idx_node, g_node, E: int, in_f: int):
    """The canonical adapter (scale 1) of one probe, in float64."""
    A, A_layout, B, B_layout = experts

    def canonical(probe):
        A_t, B_t = stack_experts(A, A_layout, B, B_layout, probe.values)
        x = probe.x.reshape(-1, in_f)
        if g_node is None:  # static LoRA: the one adapter, weight 1, for every token
            g = torch.ones(x.shape[0], 1, dtype=torch.float64)
            idx = torch.zeros_like(g, dtype=torch.int64)
        else:
            g = probe.values[g_node].reshape(-1, probe.values[g_node].shape[-1])
            idx = torch.arange(E).expand(g.shape[0], E) if idx_node is None else \
                probe.values[idx_node].reshape(-1, g.shape[-1])
        if B_t.shape[0] != E or g.shape[0] != x.shape[0]:
            return torch.full((0,), float("nan"))
        return canonical_delta(x, A_t, B_t, idx, g)

    return canonical


def _is_float(node: fx.Node) -> bool:
    val = node_value_meta(node)
    return val is not None and val.dtype.is_floating_point


def _dtype_of(node: fx.Node):
    val = node_value_meta(node)
    return getattr(val, "dtype", None)
