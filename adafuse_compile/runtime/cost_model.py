"""When does merging the chosen experts into the weights beat the fused unmerged op?

A group is N sites driven by one decision per token (pre-gating). Per step it can

- **fused**: run each site's base linear plus its chosen experts (``lora_moe_linear``), or
- **merge**: when one decision covers the whole step (a single token, or all tokens agreeing),
  keep that decision merged into copies of the weights and run plain linears; a new decision
  first costs a *switch* (read and write every weight of the group, plus a rank ``m*r`` update
  per site, ``m <= 2k`` changed experts).

Both are written as sympy expressions of the symbolic shapes: ``T`` tokens in the step, ``S_w``
(sum of ``in*out`` over the sites), ``S_a`` (sum of ``r*(in+out)``, one expert of every site),
``r``, ``k``, ``E``, ``b`` bytes per element, ``p`` the probability that the decision changed
since the last step, and the machine's bandwidth ``beta`` and flop rate ``phi``. The estimated
time of a step is the roofline max(bytes / beta, flops / phi). Merging pays when

    p * switch  <  (what the fused op adds to the plain linears)(T)

whose right side grows with ``T``: the guard is ``T >= T*(p)`` on the runtime token count,
evaluated at every step from a lambdified expression, so a new ``T`` or a new ``p`` never
recompiles. ``p`` is observed at run time (:class:`adafuse_compile.runtime.merge_state.SwitchedGroup`).

Machine constants for this project's 2-core CPU (shared/MEASUREMENTS.md, beside the repository):
~18 GB/s effective for the memory-bound backbone, and ~100 GFLOP/s for the fp32 rank-``m*r`` updates of a switch. A switch
of the medium model's 56 sites (405 MB fp32, k=2, so up to 4 changed experts) is estimated at
65 ms; measured 38-70 ms for 1-4 changed experts (benchmarks/bench_merge.py).

One bandwidth prices both strategies' reads of W. On CPU that no longer holds for decode: the
fused op's own base linear (float32, AVX-512, up to 32 tokens on Intel's CPUs, 1024 on others)
streams W faster than the MKL linears a merged step runs (56 medium-model sites, 8 tokens: 0.69
of their time on the Intel VM; a third of it at one token on the AMD VM), so ``GAIN``
overstates what merging wins there (measured, medium pre-gated model, batch 8: fused 0.77 of
the backbone, merge 0.85, auto 0.87). Not refitted: that needs a per-strategy bandwidth
measured per device.
"""

from __future__ import annotations

import dataclasses
import functools

import sympy

__all__ = ["GroupShape", "CostModel", "CPU_BANDWIDTH", "CPU_FLOPS"]

CPU_BANDWIDTH = 18e9  # bytes/s, shared/MEASUREMENTS.md: the backbone's effective bandwidth here
CPU_FLOPS = 100e9  # flop/s, fp32 GEMM on 2 cores (AVX-512 FMA); fits the measured switch times

T, p = sympy.symbols("T p", positive=True)
S_w, S_a, r, k, E, b, beta, phi = sympy.symbols("S_w S_a r k E b beta phi", positive=True)


def _time(bytes_moved, flops):
    """Roofline: a step is bound by whichever of memory and compute takes longer."""
    return sympy.Max(bytes_moved / beta, flops / phi)


# Expert bytes read by the fused op: each distinct chosen expert once, at most E of them.
FUSED = _time(b * (S_w + sympy.Min(T * k, E) * S_a), 2 * T * (S_w + k * S_a))
PLAIN = _time(b * S_w, 2 * T * S_w)
SWITCH = _time(2 * b * S_w, 2 * (2 * k) * r * S_w)  # read + write W; rank-2k*r update (worst case)
MERGED = PLAIN + p * SWITCH
GAIN = FUSED - MERGED  # > 0: merging is faster on average


@dataclasses.dataclass(frozen=True)
class GroupShape:
    """The sizes the cost of a group depends on (one entry per site for in/out)."""

    in_features: tuple[int, ...]
    out_features: tuple[int, ...]
    rank: int
    k: int
    experts: int
    bytes_per_element: int

    def values(self, bandwidth: float = CPU_BANDWIDTH, flops: float = CPU_FLOPS) -> dict:
        return {
            S_w: sum(i * o for i, o in zip(self.in_features, self.out_features)),
            S_a: sum(self.rank * (i + o) for i, o in zip(self.in_features, self.out_features)),
            r: self.rank, k: self.k, E: self.experts, b: self.bytes_per_element, beta: bandwidth, phi: flops,
        }


class CostModel:
    """The expressions above bound to one group's sizes; ``merge_pays(T, p)`` is the runtime guard."""

    def __init__(self, shape: GroupShape, bandwidth: float = CPU_BANDWIDTH, flops: float = CPU_FLOPS) -> None:
        self.shape = shape
        values = shape.values(bandwidth, flops)
        self.fused = FUSED.subs(values)
        self.merged = MERGED.subs(values)
        self.switch = SWITCH.subs(values)
        self._gain = sympy.lambdify((T, p), GAIN.subs(values), "math")

    def merge_pays(self, tokens: int, switch_rate: float) -> bool:
        """Whether merging beats the fused op for a step of ``tokens`` tokens under one decision."""
        return tokens > 0 and self._gain(tokens, switch_rate) > 0

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one model per group, a few rates
    def threshold(self, switch_rate: float = 1.0, limit: int = 1 << 24) -> int | None:
        """The least token count at which merging pays (the gain grows with ``T``), or ``None``
        if it does not pay below ``limit``."""
        if self.merge_pays(1, switch_rate):
            return 1
        if not self.merge_pays(limit, switch_rate):
            return None
        lo, hi = 1, limit  # merge_pays(lo) is False, merge_pays(hi) is True
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.merge_pays(mid, switch_rate) else (mid, hi)
        return hi

    def estimate(self, tokens: int, switch_rate: float = 1.0) -> dict[str, float]:
        """Estimated seconds per step of each strategy (for ``explain``)."""
        return {
            "fused": float(self.fused.subs(T, tokens)),
            "merge": float(self.merged.subs({T: tokens, p: switch_rate})),
            "switch": float(self.switch),
        }

    def describe(self) -> str:
        """One line: the estimates at T=1 and the guard's thresholds."""
        est = self.estimate(1, 1.0)
        t1, t0 = self.threshold(1.0), self.threshold(0.01)
        fmt = lambda t: "never" if t is None else f"T >= {t}"  # noqa: E731
        return (f"T=1: fused {est['fused'] * 1e3:.3g} ms, merge {est['merge'] * 1e3:.3g} ms "
                f"(switch {est['switch'] * 1e3:.3g} ms); merge when one decision covers the step and "
                f"{fmt(t1)} (decision changes every step) or {fmt(t0)} (1 in 100)")
