"""Timing configurations side by side, the way this noisy machine needs (shared/MEASUREMENTS.md,
beside the repository).

Separate processes drift 5-10% and single repeats stall 2-30x: configurations therefore run
round-robin in one process, and each reports the median over rounds of its per-round median.
A ratio of two configurations is the median over rounds of their per-round ratio
(:func:`paired_ratio`): a drift that slows a whole round (clock, a neighbour's load) cancels in
it, where it only partly cancels in a ratio of two medians.

``settle`` untimed calls precede each timed one in a round. Without them the order favours
whoever follows a configuration of the same model: the weights another model ran over in
between are partly out of the cache (this VM's L3 is shared). Measured, small model, batch 1,
one compiled model timed twice per round after the backbone, the pair's order alternating:
the second of the pair ran at 0.83 of the first's time in one order and 1.20 in the other;
with one settling call each, 1.05 and 1.00.
"""

from __future__ import annotations

import operator
import statistics
import time
from collections.abc import Callable, Mapping

__all__ = ["interleaved_medians", "interleaved_times", "paired", "paired_ratio"]


def interleaved_medians(fns: Mapping[str, Callable[[], object]], *, rounds: int, reps: int,
                        warmup: int = 3, settle: int = 0) -> dict[str, float]:
    """Seconds per call of each function: median over ``rounds`` of the median of ``reps`` calls."""
    per_round = interleaved_times(fns, rounds=rounds, reps=reps, warmup=warmup, settle=settle)
    return {name: statistics.median(v) for name, v in per_round.items()}


def interleaved_times(fns: Mapping[str, Callable[[], object]], *, rounds: int, reps: int,
                      warmup: int = 3, settle: int = 0) -> dict[str, list[float]]:
    """Seconds per call of each function in each of ``rounds`` rounds (the median of ``reps`` calls).

    Each round calls every function ``settle`` times untimed, then ``reps`` times timed, in turn,
    so drift hits all of them alike.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per_round: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(settle):
                fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            per_round[name].append(statistics.median(times))
    return per_round


def paired(fn: Callable[..., float], *series: list[float]) -> float:
    """Median over rounds of ``fn`` of the series' values in the same round."""
    return statistics.median(fn(*values) for values in zip(*series, strict=True))


def paired_ratio(per_round: Mapping[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of ``name``'s time divided by ``base``'s time in the same round."""
    return paired(operator.truediv, per_round[name], per_round[base])
