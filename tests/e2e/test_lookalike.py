"""Look-alike generator: random sites that resemble a MoLE adapter, some of which are not one.

Each example draws a site (stacked or per-expert experts, three gates) with random mutations: a
nonlinearity between A and B, a learnable scalar or per-expert scale, a permuted or duplicated
expert table, tiny or zero B or identical experts at compile time, an extra nonlinear term,
dropout in training mode, adapters in another dtype than the base. It compiles the site at its
compile-time weights, then redraws every parameter (through ``p.data.copy_``, then ``p.copy_``
under no_grad) and feeds new inputs. Property: compiled == eager, whatever the passes decided.

Examples: ``ADAFUSE_LOOKALIKE_EXAMPLES`` (default 15, about 10 s on 2 cores; each example compiles
once), or 10000 under ``HYPOTHESIS_PROFILE=dev``.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from e2e_models import (
    BETWEEN,
    GATES,
    LAYOUTS,
    SCALES,
    MoLESite,
    SiteSpec,
    assert_matches_eager,
    compile_eager_inner,
    degenerate_,
    inputs,
    randomize_,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_DEFAULT_EXAMPLES = 10_000 if os.environ.get("HYPOTHESIS_PROFILE") == "dev" else 15
EXAMPLES = int(os.environ.get("ADAFUSE_LOOKALIKE_EXAMPLES", _DEFAULT_EXAMPLES))


@dataclasses.dataclass(frozen=True)
class Case:
    spec: SiteSpec
    init: str  # compile-time experts: "random", or a degenerate_ init
    tokens: int  # token count of the compile-time example
    dynamic: bool  # compiled with dynamic=True: also checked at other token counts
    seed: int


MUTATIONS = ("between", "scale", "table", "init", "extra", "dropout", "adapter_dtype")


@st.composite
def cases(draw) -> Case:
    """A site with up to two mutations (more would nearly always make it plainly non-canonical)."""
    experts = draw(st.integers(2, 6))
    mutations = draw(st.sets(st.sampled_from(MUTATIONS), max_size=2))
    perm = None
    if "table" in mutations:
        if draw(st.booleans()):  # permuted
            perm = tuple(draw(st.permutations(range(experts)).filter(lambda p: p != sorted(p))))
        else:  # duplicated: expert i uses expert j's B too
            i, j = draw(st.lists(st.integers(0, experts - 1), min_size=2, max_size=2, unique=True))
            perm = tuple(j if e == i else e for e in range(experts))
    spec = SiteSpec(
        d_in=draw(st.sampled_from([8, 16, 24])),
        d_out=draw(st.sampled_from([8, 20])),
        experts=experts,
        rank=draw(st.integers(2, 4)),
        top_k=draw(st.integers(1, experts)),
        layout=draw(st.sampled_from(LAYOUTS)),
        gate=draw(st.sampled_from(GATES)),
        between=draw(st.sampled_from(BETWEEN[1:])) if "between" in mutations else "none",
        clamp=draw(st.sampled_from([0.5, 5.0])),
        scale=draw(st.sampled_from(SCALES[1:])) if "scale" in mutations else "float",
        scale_value=draw(st.sampled_from([0.5, 2.0])),
        perm=perm,
        extra="extra" in mutations,
        dropout=0.1 if "dropout" in mutations else 0.0,
        adapter_dtype=torch.bfloat16 if "adapter_dtype" in mutations else None,
    )
    init = draw(st.sampled_from(["tiny", "zeros", "identical"])) if "init" in mutations else "random"
    return Case(spec, init=init, tokens=draw(st.sampled_from([1, 3])), dynamic=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def _check(fast, model, x, rel: float, msg: str) -> None:
    """Compiled vs eager on ``x``, each from the same RNG state (dropout draws the same masks)."""
    torch.manual_seed(0)
    expected = model(x)
    torch.manual_seed(0)
    assert_matches_eager(fast(x), expected, rel=rel, msg=msg)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_lookalike_sites_compile_to_eager_after_every_parameter_changes(case: Case):
    torch._dynamo.reset()
    spec = case.spec
    model = MoLESite(spec, seed=case.seed).train(spec.dropout > 0)
    if case.init != "random":
        degenerate_(model, case.init)
    rel = 2e-2 if spec.adapter_dtype is not None else 1e-4
    fast = compile_eager_inner(model, dynamic=case.dynamic)
    token_counts = [case.tokens, 2, 5] if case.dynamic else [case.tokens]
    try:
        with torch.no_grad():
            _check(fast, model, inputs(spec, case.tokens, seed=case.seed), rel, "at compile-time weights")
            for step, via_data in enumerate((True, False), start=1):
                randomize_(model, seed=case.seed + step, via_data=via_data)
                for T in token_counts:
                    x = inputs(spec, T, seed=case.seed + 10 * step + T)
                    how = "p.data.copy_" if via_data else "p.copy_ under no_grad"
                    _check(fast, model, x, rel, f"after every parameter was redrawn through {how}, T={T}")
    finally:
        torch._dynamo.reset()
