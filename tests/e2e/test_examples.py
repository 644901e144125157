"""The examples and the benchmark command run as scripts (the README's `make demo` runs
quickstart.py). CI-sized: the tiny model, the adafuse passes followed by ``inner="eager"``
(seconds instead of Inductor's tens of seconds per graph), a few tokens."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _run(*argv, timeout=300):
    out = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_quickstart_generates_the_eager_tokens_and_explains():
    out = _run(EXAMPLES / "quickstart.py", "--size", "tiny", "--new", "6", "--inner", "eager")
    assert "tokens identical to eager: True" in out
    assert "generate: eager" in out
    assert "adafuse: 14 site(s)" in out and "fused 14" in out


@pytest.mark.parametrize("tracer", [[], ["--dynamo"]], ids=["symbolic_trace", "dynamo"])
def test_passes_on_fx_fuses_both_sites_and_keeps_the_output(tracer):
    out = _run(EXAMPLES / "passes_on_fx.py", *tracer)
    assert out.count(": fused (E=4, k=2, r=4") == 2
    assert "fused_site" in out.split("after NormalizeLinearsPass and FuseMoLEPass")[1]
    assert "max |output diff| after the passes" in out


def test_pregated_model_compiles_every_strategy():
    out = _run(EXAMPLES / "pregated_model.py", "--size", "tiny", "--new", "3", "--repeats", "1", "--inner", "eager")
    for strategy in ("fused", "merge", "auto"):
        assert f"strategy='{strategy}': compiled" in out
    assert "strategy='fused': compiled" in out and "tokens equal to eager: True" in out.split("strategy='merge'")[0]
    assert "decode step:" in out


def test_bench_cli_writes_table_json_and_plot(tmp_path):
    """Two configurations, two batch sizes: the table, the output check, every figure in JSON."""
    plot = importlib.util.find_spec("matplotlib") is not None
    argv = ["-m", "adafuse_compile.bench", "--size", "tiny", "--batch", "1,2", "--new", "3", "--repeats", "2",
            "--configs", "mole-eager,mole-fused", "--inner", "eager", "--json", tmp_path / "out.json"]
    out = _run(*argv, *(["--plot", tmp_path / "out.png"] if plot else []))
    assert "MoLE adafuse fused" in out and "tokens equal" in out
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["machine"]["threads"] >= 1 and data["machine"]["torch"]
    rows = {(r["config"], r["batch"]): r for r in data["results"]}
    assert set(rows) == {(c, b) for c in ("mole-eager", "mole-fused") for b in (1, 2)}
    fused = rows["mole-fused", 2]
    assert fused["check"]["tokens_equal"] and fused["reference"] == "mole-eager"
    assert fused["sites"]["fused"] == 14 and fused["ms_per_token"] > 0 and fused["options"] == {"strategy": "fused"}
    if plot:
        assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_cli_other_dtype_and_cuda_graph_configurations(tmp_path):
    """--dtype bfloat16 and a "+ CUDA graphs" configuration (mode="reduce-overhead" reaches the
    backend with its options; on a CPU Inductor skips the graphs): tokens compared, not required."""
    argv = ["-m", "adafuse_compile.bench", "--size", "tiny", "--batch", "1", "--new", "2", "--repeats", "1",
            "--dtype", "bfloat16", "--configs", "pregated-eager,pregated-merge-cg", "--inner", "eager",
            "--json", tmp_path / "out.json"]
    out = _run(*argv)
    assert "bfloat16" in out and "pre-gated adafuse merge + CUDA graphs" in out
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["settings"]["dtype"] == "bfloat16" and data["settings"]["device"] == "cpu"
    (row,) = [r for r in data["results"] if r["config"] == "pregated-merge-cg"]
    assert row["sites"]["group"] == 1 and row["check"]["exact_required"] is False


def test_bench_rejects_unknown_configurations():
    out = subprocess.run([sys.executable, "-m", "adafuse_compile.bench", "--configs", "nope*"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0 and "match no configuration" in out.stderr and "mole-fused" in out.stderr


def test_bench_ops_times_a_model_step_site_by_site():
    """bench_ops.py --model: every adapted linear of the small model's step (28), one row per T."""
    out = _run(ROOT / "benchmarks" / "bench_ops.py", "--model", "small", "--tokens", "1,2", "--rounds", "1", "--reps", "1")
    assert "the 28 adapted linears of the small model's step" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [row[0] for row in rows] == ["1", "2"] and all(len(row) == 7 for row in rows)
    assert all(float(v) > 0 for row in rows for v in row[1:4])


def test_bench_step_split_reports_inside_and_around_the_graph():
    """bench_step_split.py: the step split into the compiled graph and the work around it."""
    out = _run(ROOT / "benchmarks" / "bench_step_split.py", "--size", "tiny", "--rounds", "1", "--new", "2")
    rows = {line[:28].strip(): line[28:].split() for line in out.splitlines()
            if line.startswith(("backbone, Inductor", "MoLE (mola), adafuse"))}
    assert set(rows) == {"backbone, Inductor", "MoLE (mola), adafuse"}
    for total, inside, around, inputs, ratio in rows.values():
        assert float(inside) > 0 and float(total) == pytest.approx(float(inside) + float(around), abs=0.02)
    # One expert nn.Linear per expert: many more tensors reach the graph than the backbone's.
    assert int(rows["MoLE (mola), adafuse"][3]) > 4 * int(rows["backbone, Inductor"][3])
