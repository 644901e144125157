"""Helpers to check rewritten code against a float64 reference, for our tests and for users'.

Tolerances follow the unit roundoff of each dtype, grown with the square root of the reduction
length (rounding errors of a length-``n`` dot product add up like a random walk).
"""

from __future__ import annotations

import math

import torch

from .passes.graph_ops import fused_site, routed_site

__all__ = ["FUSED_SITES", "assert_close_to_reference", "assert_equivalent", "assert_rewrite", "check_pass",
           "compile_and_capture", "compile_and_capture_rewrites", "count_calls", "count_fused", "tolerance"]

# Absolute/relative tolerance per dtype for a short reduction (n <= 256) with O(1) operands.
_BASE_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1.6e-2,
}


FUSED_SITES = (fused_site, routed_site)
"""What a fused site becomes in a rewritten graph: its op with the decision as an input, or,
when its own top-k router moved into it (CPU), with the router's input and weight."""


def tolerance(dtype: torch.dtype, reduction: int = 1) -> float:
    """Tolerance for a result of ``dtype`` computed with dot products of length ``reduction``."""
    if dtype not in _BASE_TOL:
        raise ValueError(f"no tolerance defined for {dtype}; known: {list(_BASE_TOL)}")
    return _BASE_TOL[dtype] * max(1.0, math.sqrt(reduction / 256))


def assert_close_to_reference(
    actual: torch.Tensor, reference: torch.Tensor, *, reduction: int = 1, msg: str = ""
) -> None:
    """Assert ``actual`` (any dtype) matches a higher-precision ``reference`` within its dtype's tolerance.

    Absolute and relative parts are both the dtype tolerance, scaled by the reference's magnitude
    (max |reference|, at least 1), so well-scaled O(1) data is compared at unit-roundoff level.
    """
    tol = tolerance(actual.dtype, reduction)
    mag = max(1.0, reference.abs().max().item()) if reference.numel() else 1.0
    torch.testing.assert_close(
        actual.to(device=reference.device, dtype=reference.dtype),
        reference,
        atol=tol * mag,
        rtol=tol,
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )


def compile_and_capture(model, *args, options=None, **kwargs):
    """Run ``model`` compiled with the adafuse backend; return ``(output, rewritten_graphs)``.

    The graphs are the GraphModules after the adafuse passes, in capture order, so tests can
    assert which ops remain. ``options`` are the backend's (``inner`` defaults to ``"eager"``:
    the passes, not Inductor, are under test).
    """
    out, rewrites = compile_and_capture_rewrites(model, *args, options=options, **kwargs)
    return out, [rw.graph for rw in rewrites]


def compile_and_capture_rewrites(model, *args, options=None, **kwargs):
    """Like :func:`compile_and_capture`, with the whole :class:`~adafuse_compile.backend.Rewrite`
    of each graph (the graph Dynamo captured, the rewritten one, the passes' reports)."""
    import functools

    from .backend import adafuse_backend, capture_rewrites

    backend = functools.partial(adafuse_backend, options={"inner": "eager", **(options or {})})
    torch._dynamo.reset()
    try:
        with capture_rewrites() as rewrites:
            out = torch.compile(model, backend=backend)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return out, rewrites


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    raise TypeError(f"cannot find a tensor in output of type {type(out).__name__}")


def assert_equivalent(model, *args, options=None, reduction: int = 256, **kwargs):
    """Assert the adafuse-compiled ``model`` gives eager's output within its dtype's tolerance.

    Where the model can run in float64 (a deep copy, floating inputs cast), both the compiled
    and the eager outputs are compared to that float64 reference; otherwise compiled is compared
    to eager. Returns the rewritten graphs (see :func:`compile_and_capture`).
    """
    return [rw.graph for rw in _equivalent_rewrites(model, args, kwargs, options, reduction)]


def assert_rewrite(model, *args, before=(), after=(), options=None, reduction: int = 256, **kwargs):
    """:func:`assert_equivalent`, plus the ops the rewrite replaced and introduced (as vLLM's
    tests declare ``ops_in_model_before/after``): every target in ``before`` is called in some
    graph Dynamo captured and in no rewritten graph; every target in ``after`` is called in some
    rewritten graph. Targets are functions (``F.linear``, ``graph_ops.fused_site``) or method
    names, or tuples of them (any one of them). Returns the
    :class:`~adafuse_compile.backend.Rewrite` of each graph."""
    rewrites = _equivalent_rewrites(model, args, kwargs, options, reduction)
    def calls(gm, target) -> int:
        return count_calls(gm, *(target if isinstance(target, tuple) else (target,)))

    for target in before:
        assert any(calls(rw.original, target) for rw in rewrites), f"{target} not in the captured graph"
        assert not any(calls(rw.graph, target) for rw in rewrites), f"{target} still called after the rewrite"
    for target in after:
        assert any(calls(rw.graph, target) for rw in rewrites), f"{target} not called after the rewrite"
    return rewrites


def _equivalent_rewrites(model, args, kwargs, options, reduction):
    import copy

    with torch.no_grad():
        expected = _first_tensor(model(*args, **kwargs))
        out, rewrites = compile_and_capture_rewrites(model, *args, options=options, **kwargs)
        actual = _first_tensor(out)
        try:
            ref_model = copy.deepcopy(model).double()
            to64 = lambda a: a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a  # noqa: E731
            reference = _first_tensor(ref_model(*map(to64, args), **{k: to64(v) for k, v in kwargs.items()}))
        except Exception:
            reference = None
    if reference is None:
        assert_close_to_reference(actual, expected.double(), reduction=reduction, msg="adafuse vs eager")
    else:
        assert_close_to_reference(expected, reference, reduction=reduction, msg="eager vs float64")
        assert_close_to_reference(actual, reference, reduction=reduction, msg="adafuse vs float64")
    return rewrites


def count_fused(gm: torch.fx.GraphModule) -> int:
    """How many fused sites ``gm`` calls, in either form (:data:`FUSED_SITES`)."""
    return count_calls(gm, *FUSED_SITES)


def count_calls(gm: torch.fx.GraphModule, *targets) -> int:
    """How many nodes of ``gm`` call one of ``targets`` (functions, or method names)."""
    return sum(
        1 for n in gm.graph.nodes
        if n.op in ("call_function", "call_method") and (n.target in targets)
    )


def check_pass(graph_pass, gm: torch.fx.GraphModule, *inputs, example_inputs=None, reduction: int = 256):
    """Apply ``graph_pass`` to a copy of ``gm`` and assert it computes what ``gm`` computes.

    For property tests of one pass on any GraphModule (``symbolic_trace`` graphs need shapes:
    run ``torch.fx.passes.shape_prop.ShapeProp(gm).propagate(*inputs)`` first). Returns the
    rewritten copy so the caller can assert which ops remain.
    """
    from .passes.manager import copy_graph

    rewritten = torch.fx.GraphModule(gm, copy_graph(gm))
    with torch.no_grad():
        expected = _first_tensor(gm(*inputs))
        graph_pass(rewritten, example_inputs)
        rewritten.graph.lint()
        rewritten.recompile()
        actual = _first_tensor(rewritten(*inputs))
    assert_close_to_reference(actual, expected.double(), reduction=reduction, msg=f"{type(graph_pass).__name__}")
    return rewritten


def mole_configs():
    """Hypothesis strategy of MoLE layer configurations: sizes that are not powers of two,
    E 1..8, k <= E, r 1..16, every gate, shared A or not, token shapes including one token.

    Draws dicts with keys ``in_f, out_f, experts, top_k, rank, gate, shared_A, tokens``; build
    a layer with ``LoRAMoELinear(nn.Linear(in_f, out_f), experts=..., rank=..., top_k=..., ...)``.
    """
    from hypothesis import strategies as st

    from .models.layers import GATES

    @st.composite
    def configs(draw):
        experts = draw(st.integers(1, 8))
        return {
            "in_f": draw(st.integers(3, 72)),
            "out_f": draw(st.integers(1, 72)),
            "experts": experts,
            "top_k": draw(st.integers(1, experts)),
            "rank": draw(st.integers(1, 16)),
            "gate": draw(st.sampled_from(GATES)),
            "shared_A": draw(st.booleans()),
            "tokens": draw(st.sampled_from([(1,), (1, 1), (5,), (2, 3), (3, 17)])),
        }

    return configs()
