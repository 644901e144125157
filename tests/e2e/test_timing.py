"""The benchmark's timing helpers: round-robin order and paired ratios."""

import pytest

from adafuse_compile.bench.timing import interleaved_medians, interleaved_times, paired_ratio


def test_rounds_call_every_function_in_turn():
    calls = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                              rounds=3, reps=2, warmup=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert set(interleaved_medians({"a": lambda: None}, rounds=2, reps=1, warmup=0)) == {"a"}


def test_paired_ratio_cancels_a_slow_round():
    # Round 2 runs 3x slower for both: the paired ratio stays 1.5, a ratio of medians would not.
    per_round = {"base": [1.0, 3.0, 1.0, 3.0, 3.0], "x": [1.5, 4.5, 1.5, 4.5, 4.5]}
    assert paired_ratio(per_round, "x", "base") == pytest.approx(1.5)
    drifting = {"base": [1.0, 1.0, 1.0, 3.0, 3.0], "x": [1.5, 4.5, 4.5, 4.5, 4.5]}
    assert paired_ratio(drifting, "x", "base") == pytest.approx(1.5)
    with pytest.raises(ValueError):
        paired_ratio({"base": [1.0], "x": [1.0, 2.0]}, "x", "base")
