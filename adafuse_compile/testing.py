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
