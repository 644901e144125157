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


def test_settling_calls_precede_each_timed_call_untimed():
    calls = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                              rounds=2, reps=1, warmup=0, settle=1)
    assert calls == ["a", "a", "b", "b"] * 2 and all(len(v) == 2 for v in times.values())


def test_paired_ratio_cancels_a_slow_round():
    # Round 2 runs 3x slower for both: the paired ratio stays 1.5, a ratio of medians would not.
    per_round = {"base": [1.0, 3.0, 1.0, 3.0, 3.0], "x": [1.5, 4.5, 1.5, 4.5, 4.5]}
    assert paired_ratio(per_round, "x", "base") == pytest.approx(1.5)
    drifting = {"base": [1.0, 1.0, 1.0, 3.0, 3.0], "x": [1.5, 4.5, 4.5, 4.5, 4.5]}
    assert paired_ratio(drifting, "x", "base") == pytest.approx(1.5)
    with pytest.raises(ValueError):
        paired_ratio({"base": [1.0], "x": [1.0, 2.0]}, "x", "base")


def test_speed_targets_pair_rounds():
    from adafuse_compile.bench.report import speed_targets

    def row(config, model, backend, rounds):
        return {"config": config, "name": config, "model": model, "backend": backend, "batch": 1, "compile_s": 0.0,
                "ms_per_token": sorted(rounds)[len(rounds) // 2], "round_ms_per_token": rounds}

    # The second round ran 2x slower for everyone: paired, adafuse is 1.05x the backbone.
    results = [row("backbone-inductor", "backbone", "inductor", [10.0, 20.0, 10.0]),
               row("mole-eager", "mole", None, [20.0, 40.0, 20.0]),
               row("mole-fused", "mole", "adafuse", [10.5, 21.0, 12.0])]
    got = {t["target"]: t["value"] for t in speed_targets(results)}
    assert got["adafuse / backbone inductor"] == pytest.approx(1.05)
    assert got["overhead recovered"] == pytest.approx(0.95)
