"""Proving that a site equals its canonical form for every weight and input.

A site's adapter is rewritten only after two checks, both needed:

1. **Structure** (:func:`linearity_violation`): with the routing decision ``D = (idx, g)`` held
   fixed, every adapter term is a *linear* function of the site's input ``x``, built only from
   ops that are polynomial in their operands (matmul, products with parameters or decision-derived
   values, sums, views, casts, gathers and scatters indexed by the decision, ...). Any other op on
   a path from ``x`` to the output (a clamp, an activation, dropout in training, a comparison on
   ``x``), any random op anywhere in the site, and any sum with a value that does not depend on
   ``x`` (affine, not linear) leaves the site, naming the op. The decision's own computation
   (router, softmax, top-k) may be anything: it is cut at ``D``, and the rewrite reuses the
   model's own routing nodes, so routing stays bitwise eager's.

2. **Identity testing with random parameters** (:func:`identity_holds`): the site is replayed
   in float64 with *every* parameter it reads, its input, and the decision drawn at random
   (nothing of today's weights is used, so nothing of them can be baked in), at several token
   counts, with decisions that between them choose every expert, and compared with the canonical
   form, judged relative to the adapter term alone.

Why this is a proof, not a sample. Given (1), for a fixed choice of experts the difference
``site - canonical`` is a polynomial (a rational function when a term divides by a parameter) in
the entries of ``x``, the parameters and ``g``, of total degree at most ``d`` (at most the
number of ops in the site, under 100 for real adapters). By the Schwartz-Zippel lemma a nonzero
such polynomial vanishes at a point drawn uniformly from a finite set ``S`` per coordinate with
probability at most ``d / |S|``; float64 Gaussian draws make ``|S|`` effectively 2^52, so one
draw wrongly accepts with probability below ``100 / 2^52 ~ 2e-14``, and every site is checked on
at least :data:`MIN_PROBES` independent draws per token count. Which experts are chosen is
discrete: the draws are among the experts the router ranks (an expert table of another size is
left), they cover every expert (each at least once in every token count), and a site
whose code treats *combinations* of experts specially would still need such a combination to
be drawn: that is the one thing sampled, stated in ``explain``'s reasons as "every expert
drawn". The float64 replay redirects the site's casts to float64, so the check is of the math;
the rounding of the rewritten site is that of its dtype (see :mod:`adafuse_compile.testing`).

Probing never touches the global RNG (explicit generators, and random ops are rejected before any
replay) and runs on the CPU whatever device the model is on: only the *shapes* of the
parameters are read.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from ..kernels.reference import lora_moe_delta_ref
from .sites import Site, ancestors, is_write, node_value_meta, op_name, run_target

__all__ = ["MIN_PROBES", "RELATIVE_TOLERANCE", "ROUTING_LEAK", "DecisionDraws", "Probe", "canonical_delta",
           "draw_parameters", "draw_probes", "identity_holds", "linearity_violation", "op_name", "random_op", "replay",
           "replay_failure", "replay_random", "site_reads"]

# float64 replay of the site against float64 canonical math: both compute the same sums in other
# orders, so they agree to ~1e-15 relative; any structural difference (a wrong expert, layout,
# scale or term) is O(1) relative to the adapter.
RELATIVE_TOLERANCE = 1e-9
MIN_PROBES = 3
# Prefix of a reason blaming the routing computation: the adapter reads a routing value other
# than the decision tried (usually a sign that another candidate decision is the right one).
ROUTING_LEAK = "an adapter term reads a routing value other than the decision"

_LIN, _ZERO, _CONST, _NONLIN = "linear", "zero", "constant", "nonlinear:"

_RANDOM = frozenset({"rand", "randn", "rand_like", "randn_like", "randint", "randint_like", "randperm", "bernoulli",
                     "multinomial", "normal", "uniform_", "normal_", "bernoulli_", "exponential_", "poisson",
                     "native_dropout", "random_", "cauchy_", "log_normal_", "geometric_"})
_DROPOUTS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "alpha_dropout",
                       "feature_alpha_dropout"})
# Ops whose value is their first operand's, rearranged, reduced by a sum, or cast: linear in it.
_LINEAR_UNARY = frozenset({"view", "reshape", "permute", "transpose", "t", "unsqueeze", "squeeze", "flatten",
                           "unflatten", "expand", "expand_as", "contiguous", "clone", "narrow", "select", "movedim",
                           "moveaxis", "split", "chunk", "unbind", "tensor_split", "diagonal", "flip", "roll", "repeat",
                           "detach", "getitem", "index_select", "gather", "take_along_dim", "sum", "mean", "cumsum",
                           "neg", "negative", "view_as", "reshape_as", "_unsafe_view", "swapaxes", "swapdims",
                           "squeeze_", "unsqueeze_", "transpose_", "t_", "neg_", "to", "type", "type_as", "float",
                           "double", "half", "bfloat16"})
# Of those, the ones whose result may share memory with the operand: an in-place write through
# them changes the operand too.
_ALIASING = frozenset({"view", "reshape", "permute", "transpose", "t", "unsqueeze", "squeeze", "flatten", "unflatten",
                       "expand", "expand_as", "narrow", "select", "movedim", "moveaxis", "split", "chunk", "unbind",
                       "tensor_split", "diagonal", "detach", "getitem", "view_as", "reshape_as", "_unsafe_view",
                       "swapaxes", "swapdims", "contiguous"})
_SHAPE_ONLY_OPERANDS = frozenset({"expand_as", "view_as", "reshape_as", "type_as"})  # later operands: shape, dtype
_CASTS = frozenset({"to", "type", "float", "double", "half", "bfloat16"})
_ZERO_MAKERS = frozenset({"zeros", "zeros_like", "new_zeros", "empty", "empty_like", "new_empty"})
_EMPTY_MAKERS = frozenset({"empty", "empty_like", "new_empty"})
_SHAPE_QUERIES = frozenset({"size", "dim", "numel", "ones_like", "new_ones", "full_like", "new_full", "stride",
                            "is_contiguous", "get_device", "sym_size", "sym_numel"})
_SUMS = frozenset({"add", "sub", "iadd", "isub", "add_", "sub_"})
_PRODUCTS = frozenset({"mul", "imul", "mul_", "multiply"})
_QUOTIENTS = frozenset({"truediv", "div", "itruediv", "div_", "divide"})
_MATMULS = frozenset({"matmul", "mm", "bmm", "einsum", "linear", "tensordot", "inner", "mv"})
_SCATTERS = frozenset({"index_add", "index_add_", "index_copy", "index_copy_", "index_put", "index_put_", "scatter",
                       "scatter_", "scatter_add", "scatter_add_", "masked_scatter", "masked_scatter_", "setitem",
                       "index_fill", "index_fill_"})
_CONCATS = frozenset({"cat", "stack", "concat", "concatenate", "hstack", "vstack"})


def random_op(node: fx.Node, gm: fx.GraphModule | None = None) -> str | None:
    """The name of the random op ``node`` runs, if it is one (dropout only when active)."""
    if node.op == "call_module" and gm is not None:
        mod = gm.get_submodule(node.target)
        if isinstance(mod, torch.nn.modules.dropout._DropoutNd) and mod.training and mod.p > 0:
            return f"{type(mod).__name__} in training mode"
        return None
    name = op_name(node)
    if name in _RANDOM:
        return name
    if name in _DROPOUTS and _dropout_active(node):
        return f"{name} in training mode"
    return None


def _dropout_active(node: fx.Node) -> bool:
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    return bool(training) and p != 0


def _operands(node: fx.Node) -> list:
    """Every argument of ``node``, flattened out of lists, tuples and dicts, in order."""
    flat: list = []

    def walk(v):
        if isinstance(v, (list, tuple)):
            for w in v:
                walk(w)
        elif isinstance(v, dict):
            for w in v.values():
                walk(w)
        else:
            flat.append(v)

    walk(node.args)
    walk(node.kwargs)
    return flat


def _is_integral(node: fx.Node) -> bool:
    val = node.meta.get("example_value", node.meta.get("val"))
    return isinstance(val, torch.Tensor) and not val.is_floating_point()


class _Classifier:
    """Forward pass over a site's nodes: each value is linear in ``x``, zero, constant (does not
    depend on ``x`` once the decision is fixed), or not linear (with the op to blame)."""

    def __init__(self, gm: fx.GraphModule | None, site: Site, decision: set[fx.Node]) -> None:
        self.gm, self.site, self.decision = gm, site, decision
        # What the decision is computed from (router, softmax, top-k): nonlinear by nature.
        self.routing = set().union(*(ancestors(d) for d in decision)) if decision else set()
        self.state: dict[fx.Node, str] = {site.x: _LIN}

    def of(self, v) -> str:
        return self.state.get(v, _CONST) if isinstance(v, fx.Node) else _CONST

    def run(self) -> str | None:
        for node in self.site.nodes:
            if node in self.decision or node is self.site.base:
                self.state[node] = _CONST  # the base linear is exact by construction: not an adapter
                continue
            rnd = random_op(node, self.gm)
            if rnd is not None:
                return f"the site runs the random op {rnd}"
            verdict = self.classify(node)
            if verdict not in (_LIN, _ZERO, _CONST) and not verdict.startswith(_NONLIN):
                if node in self.routing:
                    verdict = f"{ROUTING_LEAK}: {verdict}"
                verdict = _NONLIN + verdict
            if is_write(node):
                # The write changes the target and every view it was taken through.
                chain = _view_chain(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else []
                # A nonlinear write into (a view of) an input-dependent value: whatever else
                # aliases it changed too. Into a zero tensor (a routing mask built with
                # ``zeros_like(...).scatter_``) it only makes that tensor nonlinear.
                if verdict.startswith(_NONLIN) and any(self.of(t) == _LIN for t in chain):
                    return verdict.removeprefix(_NONLIN)
                for t in chain:
                    if self.of(t) == _CONST or verdict != _CONST:
                        self.state[t] = verdict
            self.state[node] = verdict
        for term in self.site.terms:
            s = self.of(term)
            if s == _CONST:
                return f"an adapter term ({term.name}) does not depend on the input once the decision is fixed"
            if s not in (_LIN, _ZERO):
                return s.removeprefix(_NONLIN)
        return None

    def classify(self, node: fx.Node) -> str:
        name = op_name(node)
        operands = _operands(node)
        states = [self.of(v) for v in operands]
        if name in _ZERO_MAKERS:
            return _ZERO
        if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
            return self.of(node.args[0]) if node.args[1] in ("T", "mT", "H", "mH", "real") else _CONST
        if name in _SHAPE_QUERIES:
            return _CONST
        bad = next((s for s in states if s.startswith(_NONLIN)), None)
        if bad is not None:
            return bad
        if all(s == _CONST for s in states):
            return _CONST
        # A zero tensor counts as input-dependent (an in-place write may have filled it through a
        # view): a product of two such values is rejected even if one is "only" zeros.
        lin = [s in (_LIN, _ZERO) for s in states]
        head = states[0] if states else _CONST
        if node.op == "call_module":
            return self._module(node)
        if name in _DROPOUTS:  # inactive (active dropout is a random op)
            return head if not any(lin[1:]) else f"{name} of an input-dependent probability"
        if name in _LINEAR_UNARY:
            if name in _CASTS and any(isinstance(v, torch.dtype) and not v.is_floating_point for v in operands):
                return f"a cast of an input-dependent value to an integer type ({name})"
            if name not in _SHAPE_ONLY_OPERANDS and any(lin[1:]):
                return f"{name} indexed or shaped by an input-dependent value"
            return head
        if name in _SUMS:
            if any(s == _CONST and not _is_zero(v) for s, v in zip(states, operands) if not _is_alpha(node, v)):
                return (f"{name} of an input-dependent value and one that does not depend on the input "
                        "(affine, not linear)")
            return _LIN
        if name in _PRODUCTS:
            return _LIN if sum(lin) == 1 else f"{name} of two input-dependent values"
        if name in _QUOTIENTS:
            if node.kwargs.get("rounding_mode") is not None:
                return f"{name} with rounding"
            return head if not any(lin[1:]) else f"{name} by an input-dependent value"
        if name in _MATMULS:
            bias = node.kwargs.get("bias", node.args[2] if name == "linear" and len(node.args) > 2 else None)
            if bias is not None and self.of(bias) != _ZERO:
                return "a linear with a bias inside an adapter term (affine, not linear)"
            return _LIN if sum(lin) == 1 else f"{name} of two input-dependent values"
        if name == "where":
            cond = node.args[0] if node.args else node.kwargs.get("condition")
            if self.of(cond) != _CONST:
                return "where() on a condition computed from the input"
            if any(s == _CONST and not _is_zero(v) for s, v in zip(states[1:], operands[1:])):
                return "where() choosing between the input and a nonzero constant (affine)"
            return _LIN
        if name in ("masked_fill", "masked_fill_"):
            if any(lin[1:]) or not _is_zero(operands[-1]):
                return f"{name} with a nonzero value or an input-dependent mask"
            return head
        if name in _SCATTERS:
            for v, s in zip(operands, states):
                if isinstance(v, fx.Node) and _is_integral(v) and s != _CONST:
                    return f"{name} with indices or a mask computed from the input"
                if not (isinstance(v, fx.Node) and _is_integral(v)) and s == _CONST and not _is_index_arg(v) \
                        and not _is_zero(v):
                    return f"{name} writes a value that does not depend on the input (affine)"
            return _LIN
        if name in _CONCATS:
            return _LIN if all(s in (_LIN, _ZERO) for s, v in zip(states, operands) if isinstance(v, fx.Node)) \
                else f"{name} of input-dependent and constant values (affine)"
        return f"{name} of an input-dependent value (not linear in the input)"

    def _module(self, node: fx.Node) -> str:
        mod = self.gm.get_submodule(node.target) if self.gm is not None else None
        if isinstance(mod, torch.nn.modules.dropout._DropoutNd) or isinstance(mod, torch.nn.Identity):
            return self.of(node.args[0])
        return type(mod).__name__ if mod is not None else str(node.target)


def _view_chain(node: fx.Node) -> list[fx.Node]:
    """``node`` and the tensors it is a view of (``out.view(...)[rows]`` -> the view, ``out``)."""
    chain = [node]
    while op_name(node) in _ALIASING and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
        chain.append(node)
    return chain


def _is_zero(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0


def _is_alpha(node: fx.Node, v) -> bool:
    return "alpha" in node.kwargs and v is node.kwargs["alpha"]


def _is_index_arg(v) -> bool:
    """Non-tensor operands of scatters (dims, index lists of ints, ``accumulate``, ``reduce``)."""
    return not isinstance(v, fx.Node) and not isinstance(v, float)


def linearity_violation(gm: fx.GraphModule | None, site: Site, decision: set[fx.Node]) -> str | None:
    """None if the site's adapter terms are linear in ``x`` once ``decision`` is fixed; otherwise
    the op (or the pattern) that is not, as a reason for the report."""
    if any(site.weight in n.all_input_nodes or (site.bias is not None and site.bias in n.all_input_nodes)
           for n in site.nodes if n is not site.base):
        return "an adapter term reads the base linear's weight or bias (not a LoRA of the frozen weight)"
    return _Classifier(gm, site, decision).run()


# --------------------------------------------------------------------------------------------
# Identity testing
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Probe:
    """One replay of a site on random values: its input, output and the decision it used."""

    x: torch.Tensor
    adapter: torch.Tensor  # [T, out]: the site's output minus its base linear
    values: dict  # node -> value of the replay (the decision nodes among them)


def _random_like(shape, gen) -> torch.Tensor:
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    return t / math.sqrt(shape[-1]) if len(shape) >= 2 else t


def site_reads(site: Site) -> set[fx.Node]:
    """The values the adapter's replay reads (not the base linear's weight and bias)."""
    return {m for n in site.nodes if n is not site.base for m in n.all_input_nodes}


def draw_parameters(params: dict[fx.Node, torch.Tensor], read: set[fx.Node], gen) -> dict[fx.Node, torch.Tensor]:
    """Random float64 CPU tensors of the shapes of the parameters the site reads (never their values)."""
    return {n: _random_like(tuple(v.shape), gen) for n, v in params.items()
            if n in read and isinstance(v, torch.Tensor)}


class DecisionDraws:
    """Random decisions ``idx [..., k]`` (distinct experts per row, as top-k gives) that between
    them choose every expert: rows are consecutive chunks of a stream of random permutations."""

    def __init__(self, experts: int, gen: torch.Generator) -> None:
        self.E, self.gen, self.stream = experts, gen, torch.empty(0, dtype=torch.int64)

    def indices(self, shape, dtype) -> torch.Tensor:
        k = shape[-1]
        rows = math.prod(shape[:-1])
        out = torch.empty(rows, k, dtype=torch.int64)
        for r in range(rows):
            while self.stream.numel() < k:
                self.stream = torch.cat([self.stream, torch.randperm(self.E, generator=self.gen)])
            row, self.stream = self.stream[:k], self.stream[k:]
            if row.unique().numel() < k:  # a chunk straddling two permutations repeated an expert
                row = torch.randperm(self.E, generator=self.gen)[:k]
            out[r] = row
        return out.reshape(shape).to(dtype)

    def weights(self, shape) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen, dtype=torch.float64) + 0.1


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DOWNCAST_METHODS = ("float", "half", "bfloat16")


def _promote(value):
    """``value`` (args or kwargs) with every floating dtype replaced by float64, devices by the CPU."""
    if isinstance(value, torch.dtype):
        return torch.float64 if value in _FLOAT_DTYPES else value
    if isinstance(value, torch.device):
        return torch.device("cpu")
    if isinstance(value, (tuple, list)):
        return type(value)(_promote(v) for v in value)
    if isinstance(value, dict):
        return {k: _promote(v) for k, v in value.items()}
    return value


def replay(gm: fx.GraphModule | None, site: Site, env: dict, override: Callable | None = None) -> dict:
    """Run the site's nodes in float64 on the CPU from ``env`` (its leaves' values); ``override``
    may replace a node's value after it is computed (the decision). Empty tensors are filled with
    NaN, so a value read before anything wrote it cannot pass for zero. The base linear is exact
    by construction and is not run: its value is zeros, so the replay computes the adapter alone
    (and the base weight, often the largest tensor, is never drawn)."""
    out_features = node_value_meta(site.base).shape[-1]
    for node in site.nodes:
        if node is site.base:
            x = env[site.x]
            env[node] = torch.zeros(*x.shape[:-1], int(out_features), dtype=torch.float64)
            continue
        args, kwargs = _promote(map_arg(node.args, env.__getitem__)), _promote(map_arg(node.kwargs, env.__getitem__))
        if node.op == "call_method" and node.target in _DOWNCAST_METHODS:
            value = args[0].to(torch.float64, **kwargs)
        else:
            value = run_target(node, args, kwargs, gm)
        if op_name(node) in _EMPTY_MAKERS and isinstance(value, torch.Tensor) and value.is_floating_point():
            value.fill_(float("nan"))
        if override is not None:
            value = override(node, value)
        env[node] = value
    return env


def identity_holds(probes: list[Probe], canonical: Callable[[Probe], torch.Tensor]) -> float | None:
    """The scale ``s`` with ``adapter == s * canonical(probe)`` on every probe (fitted by least
    squares on the first), or None. Judged relative to the adapter term alone."""
    scale = None
    for p in probes:
        unit = canonical(p)
        if unit.shape != p.adapter.shape:
            return None
        if scale is None:
            denom = float((unit * unit).sum())
            if not denom > 0:
                return None
            scale = float((p.adapter * unit).sum()) / denom
        err = float((p.adapter - scale * unit).abs().max()) if unit.numel() else 0.0
        size = max(float(p.adapter.abs().max()), float((scale * unit).abs().max())) if unit.numel() else 0.0
        if not err <= RELATIVE_TOLERANCE * size:  # NaN (an unwritten empty) fails too
            return None
    return scale


def canonical_delta(x2, A, B, idx, g) -> torch.Tensor:
    """``sum_k g_k (x A_{idx_k}^T) B_{idx_k}^T`` in float64, the canonical adapter with scale 1."""
    return lora_moe_delta_ref(x2, A.double(), B.double(), idx.long(), g.double())


def draw_probes(gm, site: Site, params: dict, shapes: list[tuple[tuple, dict]], decision: Callable,
                seed: int = 0) -> list[Probe] | str:
    """Replays of ``site`` on random parameters, inputs and decisions: for every ``(x shape, size
    bindings)`` in ``shapes``, probes until every expert was drawn (at least :data:`MIN_PROBES`).

    ``decision(gen) -> (seed, override, covered)`` draws the decisions of one token count:
    ``seed(env)`` sets decisions read from elsewhere, ``override`` replaces the site's own as they
    are computed, ``covered()`` says whether every expert was drawn. Returns the probes, or a
    reason if the site cannot be replayed.
    """
    gen = torch.Generator().manual_seed(seed)
    probes: list[Probe] = []
    for shape, sizes in shapes:
        seed_decision, override, covered = decision(gen)
        n = 0
        while n < MIN_PROBES or not covered():
            n += 1
            if n > 64 * MIN_PROBES:
                return "could not draw decisions that choose every expert"
            try:
                x, values = replay_random(gm, site, params, shape, sizes, gen, seed_decision, override)
            except Exception as e:  # model code: anything can raise
                return replay_failure(e)
            out = values[site.out]
            probes.append(Probe(x, out.reshape(-1, out.shape[-1]), values))
    return probes


def replay_random(gm, site: Site, params: dict, shape: tuple, sizes: dict, gen, seed_decision=None,
                  override=None) -> tuple[torch.Tensor, dict]:
    """One replay of ``site`` on a random input of ``shape`` and random parameters:
    ``(x, values)``. ``seed_decision(env)`` may set decisions read from elsewhere first."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    env = {**draw_parameters(params, site_reads(site), gen), **sizes, site.x: x}
    if seed_decision is not None:
        seed_decision(env)
    with torch.random.fork_rng(devices=[]):
        return x, replay(gm, site, env, override)


def replay_failure(e: Exception) -> str:
    """The reason a site is left when its replay raised."""
    return f"could not replay the site in float64 ({type(e).__name__}: {e})"
