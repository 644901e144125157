"""Helpers to check rewritten code against a float64 reference, for our tests and for users'.

Tolerances follow the unit roundoff of each dtype, grown with the square root of the reduction
length (rounding errors of a length-``n`` dot product add up like a random walk).
"""

from __future__ import annotations

import math

import torch

__all__ = ["tolerance", "assert_close_to_reference"]

# Absolute/relative tolerance per dtype for a short reduction (n <= 256) with O(1) operands.
_BASE_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1.6e-2,
}


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
    from .backend import compile_rewritten, rewrite
    from .options import AdafuseOptions

    graphs = []
    opts = AdafuseOptions.from_dict({"inner": "eager", **(options or {})})

    def capture(gm, example_inputs):
        rewritten = rewrite(gm, example_inputs, opts)
        graphs.append(rewritten)
        return compile_rewritten(rewritten, example_inputs, opts)

    torch._dynamo.reset()
    try:
        out = torch.compile(model, backend=capture)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return out, graphs


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
    import copy

    with torch.no_grad():
        expected = _first_tensor(model(*args, **kwargs))
        out, graphs = compile_and_capture(model, *args, options=options, **kwargs)
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
    return graphs


def count_calls(gm: torch.fx.GraphModule, *targets) -> int:
    """How many nodes of ``gm`` call one of ``targets`` (functions, or method names)."""
    return sum(
        1 for n in gm.graph.nodes
        if n.op in ("call_function", "call_method") and (n.target in targets)
    )
