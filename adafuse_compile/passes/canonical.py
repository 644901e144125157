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
- the *scale* is fitted by least squares on a probe.

Each combination is accepted only if the canonical form reproduces the site's output on fresh
random probes in float64 (relative error below ``_TOLERANCE``); otherwise the site is left
unchanged and the reason says what did not match.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from ..kernels.reference import lora_moe_linear_ref
from ..testing import tolerance
from .sites import Site, ancestors

__all__ = ["Canonical", "canonicalize"]

# The site's own routing may run in float32 (routers cast to float32 inside float64 probes), so
# agreement is judged at float32 level; a wrong expert order, layout or scale is off by O(1).
_TOLERANCE = 1e-4
_PROBE_TOKENS = 8


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


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DOWNCAST_METHODS = ("float", "half", "bfloat16")


def _promote(value, dtype):
    """``value`` (args or kwargs) with every floating dtype replaced by ``dtype``."""
    if isinstance(value, torch.dtype):
        return dtype if value in _FLOAT_DTYPES else value
    if isinstance(value, (tuple, list)):
        return type(value)(_promote(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _promote(v, dtype) for k, v in value.items()}
    return value


def _as_probe_value(v, dtype):
    if not isinstance(v, torch.Tensor):
        return v  # a size
    v = v.detach()
    return v.to(dtype) if dtype is not None and v.is_floating_point() else v


class _Evaluator:
    """Runs a site's nodes on probe values (float64 copies of the parameters)."""

    def __init__(self, gm: fx.GraphModule, site: Site, params: dict[fx.Node, torch.Tensor], dtype=None):
        self.gm, self.site, self.dtype = gm, site, dtype
        # Only what the site reads: converting every parameter of the graph (embeddings, lm_head)
        # for each site took 70% of a small model's compile (24 of 35 s).
        read = {m for n in site.nodes for m in n.all_input_nodes}
        self.params = {n: _as_probe_value(v, dtype) for n, v in params.items() if n in read}

    def run(self, x: torch.Tensor, externals: dict | None = None) -> dict[fx.Node, object]:
        env: dict[fx.Node, object] = {self.site.x: x, **self.params, **(externals or {})}
        for node in self.site.nodes:
            args = map_arg(node.args, env.__getitem__)
            kwargs = map_arg(node.kwargs, env.__getitem__)
            target = node.target
            if self.dtype is not None:  # replay the math, not the roundings: casts go to dtype
                args, kwargs = _promote(args, self.dtype), _promote(kwargs, self.dtype)
                if node.op == "call_method" and target in _DOWNCAST_METHODS:
                    target = "to"
                    args = (args[0], self.dtype)
            if node.op == "call_function":
                env[node] = target(*args, **kwargs)
            elif node.op == "call_method":
                env[node] = getattr(args[0], target)(*args[1:], **kwargs)
            elif node.op == "call_module":
                env[node] = self.gm.get_submodule(node.target)(*args, **kwargs)
            else:
                raise NotImplementedError(f"cannot probe {node.op} node {node.name}")
        return env


def node_value_meta(node: fx.Node):
    """The example tensor (Dynamo, AOT) or TensorMetadata (ShapeProp) recorded on ``node``."""
    for key in ("example_value", "val", "tensor_meta"):
        val = node.meta.get(key)
        if isinstance(val, torch.Tensor) or hasattr(val, "shape") and hasattr(val, "dtype"):
            return val
    return None


def _shape(node: fx.Node):
    val = node_value_meta(node)
    return tuple(val.shape) if val is not None else None


def _natural_key(node: fx.Node):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(node.target))]


def _probe(x_shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(x_shape, generator=gen, dtype=torch.float64)


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


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


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
    """The gate variant (MISSION.md's names) from the nodes between the router and ``g``.

    Only a label for reports: the rewrite reuses the model's own routing nodes whatever it is.
    """
    if kind != "top-k":
        return kind
    between = (ancestors(g) | {g}) - ancestors(source) - {source}
    before = ancestors(source)
    if any(_name(n) in _SOFTMAX for n in between):
        return "topk_softmax"
    if any(_name(n) in _SOFTMAX for n in before):
        if any(_name(n) in ("truediv", "div", "itruediv") for n in between):
            return "softmax_topk"
        if any(_name(n) in _MASKING for n in between):
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


def canonical_A(A, layout: str) -> torch.Tensor:
    """``A [E or 1, r, in]`` from a site's tensor(s) in ``layout`` (see :class:`Canonical`)."""
    if layout == "list":
        return torch.stack(A)
    if layout == "ri":
        return A.unsqueeze(0)
    return A.transpose(1, 2) if layout == "eir" else A


def canonical_B(B, layout: str) -> torch.Tensor:
    """``B [E, out, r]`` from a site's tensor(s) in ``layout``."""
    if layout == "list":
        return torch.stack(B)
    return B.transpose(1, 2) if layout == "ero" else B


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
    """A verified canonical form of ``site``, or ``(None, reason)``.

    ``sizes`` binds symbolic-size placeholders (dynamic shapes) to this example's sizes: the
    probes then have this example's shape, and the rewrite itself is shape-agnostic.
    """
    x_shape = _shape(site.x)
    if x_shape is None or _shape(site.out) is None:
        return None, "no example value for the site's input or output"
    x_shape = _concrete(x_shape)
    if x_shape is None:
        return None, "the input's shape has a data-dependent size with no example value"
    W = params[site.weight]
    out_f, in_f = W.shape
    if site.externals:
        return _canonicalize_external(gm, site, {**params, **(sizes or {})}, x_shape, in_f, out_f)
    runs, ev, tolerance, why = _probe_runs(gm, site, {**params, **(sizes or {})}, x_shape)
    if runs is None:
        return None, why
    decisions = _decision_candidates(site, runs[0])
    routing = set().union(*(ancestors(source) for *_, source in decisions))
    decisions.append((None, None, 1, "static", None))  # one adapter, no router (PEFT's LoRA)
    experts = _expert_candidates(site, params, in_f, out_f, routing)
    if not experts:
        return None, "no expert parameters of LoRA shape ([E, r, in] / [E, out, r] or per-expert [r, in] / [out, r])"
    b = ev.params[site.bias].double() if site.bias is not None else None
    for A, A_layout, B, B_layout, E, r in experts:
        for idx, g, k, gate, source in decisions:
            if (gate == "dense" and k != E) or (gate == "static" and E != 1):
                continue
            verdict = _fit_and_verify(ev.params, site, runs, ev.params[site.weight].double(), b,
                                      (A, A_layout, B, B_layout), idx, g, E, tolerance)
            if verdict is not None:
                variant = _gate_variant(gate, source, g)
                return Canonical(idx, g, A, B, A_layout, B_layout, E, r, k, verdict, variant), "verified"
    if len(decisions) == 1:
        return None, "no routing decision found (a top-k, or a softmax over the experts), and not a static LoRA"
    return None, (f"no canonical form reproduced the site on probes ({len(experts)} expert layouts x "
                  f"{len(decisions)} routing decisions tried)")


def _canonicalize_external(gm, site, params, x_shape, in_f: int, out_f: int):
    """A site whose decision is made elsewhere (pre-gating): probed with random decisions.

    The decision tensors are leaves of the site, so the probes feed them random experts and
    weights: a form that matches proves the site equals the fused op for *any* decision, which
    is what lets one decision drive a group of sites (and lets it be merged).
    """
    idx = next((e for e in site.externals if not _is_float(e)), None)
    g = next(e for e in site.externals if _is_float(e))
    g_shape = _concrete(_shape(g))
    if g_shape is None:
        return None, "the decision's shape has a data-dependent size with no example value"
    k = g_shape[-1]
    experts = _expert_candidates(site, {n: v for n, v in params.items() if isinstance(v, torch.Tensor)},
                                 in_f, out_f, set())
    if not experts:
        return None, "no expert parameters of LoRA shape ([E, r, in] / [E, out, r] or per-expert [r, in] / [out, r])"
    for E in sorted({c[4] for c in experts}):
        if (idx is None and k != E) or k > E:
            continue

        def decision(seed, E=E):
            gen = torch.Generator().manual_seed(1000 + seed)
            values = {g: torch.rand(g_shape, generator=gen, dtype=torch.float64) + 0.1}
            if idx is not None:
                values[idx] = torch.randint(0, E, g_shape, generator=gen).to(_dtype_of(idx) or torch.int64)
            return values

        runs, ev, tolerance, why = _probe_runs(gm, site, params, x_shape, decision)
        if runs is None:
            return None, why
        b = ev.params[site.bias].double() if site.bias is not None else None
        for A, A_layout, B, B_layout, E_c, r in experts:
            if E_c != E:
                continue
            scale = _fit_and_verify(ev.params, site, runs, ev.params[site.weight].double(), b,
                                    (A, A_layout, B, B_layout), idx, g, E, tolerance)
            if scale is not None:
                gate = "pre-gated" if idx is not None else "pre-gated dense"
                return Canonical(idx, g, A, B, A_layout, B_layout, E, r, k, scale, gate), "verified"
    names = ", ".join(e.name for e in site.externals)
    return None, (f"the adapter reads {names}, computed elsewhere, but no canonical form with it as the "
                  f"decision reproduced the site on probes with random decisions ({len(experts)} expert layouts tried)")


def _is_float(node: fx.Node) -> bool:
    val = node_value_meta(node)
    return val is not None and val.dtype.is_floating_point


def _probe_runs(gm, site, params, x_shape, externals=None):
    """Three probe runs of the site: ``(runs, evaluator, tolerance, reason)``.

    Float64 first, with the graph's casts (``.to(bfloat16)``, ``.float()``, ``dtype=``) redirected
    to float64 so the replay computes the site's math without its roundings. If that replay
    fails, the probes run in the model's own dtypes, judged at that dtype's tolerance.
    """
    errors = []
    for dtype in (torch.float64, None):
        ev = _Evaluator(gm, site, params, dtype)
        x_dtype = dtype or _dtype_of(site.x) or torch.float32
        try:
            runs = [ev.run(_probe(x_shape, seed).to(x_dtype), externals and externals(seed)) for seed in (0, 1, 2)]
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
            continue
        return runs, ev, _TOLERANCE if dtype is not None else 50 * tolerance(x_dtype), None
    return None, None, None, f"could not probe the site ({errors[-1]})"


def _dtype_of(node: fx.Node):
    val = node_value_meta(node)
    return getattr(val, "dtype", None)


def _fit_and_verify(pvals, site, runs, W, b, experts, idx_node, g_node, E, tol) -> float | None:
    """The scale if the canonical form matches every run (fitted on the first), else None."""
    A_t, B_t = (t.double() for t in stack_experts(*experts, pvals))
    if B_t.shape[0] != E:
        return None
    scale = None
    for vals in runs:
        x = vals[site.x].double().reshape(-1, W.shape[1])
        if g_node is None:  # static LoRA: the one adapter, weight 1, for every token
            g = torch.ones(x.shape[0], 1, dtype=torch.float64)
        else:
            g = vals[g_node].reshape(-1, vals[g_node].shape[-1]).double()
        if idx_node is None:
            idx = torch.arange(E).expand(g.shape[0], E)
        else:
            idx = vals[idx_node].reshape(-1, g.shape[-1]).long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= E):
            return None
        y = vals[site.out].reshape(-1, W.shape[0]).double()
        base = x @ W.T if b is None else x @ W.T + b
        unit = lora_moe_linear_ref(x, W, b, A_t, B_t, idx, g, 1.0) - base
        if scale is None:  # least squares for s in y - base = s * unit
            denom = (unit * unit).sum()
            if denom == 0:
                return None
            scale = float(((y - base) * unit).sum() / denom)
        err = (y - base - scale * unit).abs().max()
        if not err <= tol * max(1.0, y.abs().max().item()):
            return None
    return scale
