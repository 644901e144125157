"""benchmarks/gpu_check.py (the prepared GPU run of issue 13) works end to end: tiny sizes on the CPU."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke_runs_and_records_kernels_checks_and_sites(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    try:
        res = gpu_check.main(["--smoke", "--out", str(tmp_path), "--batches", "1,3",
                              "--configs", "base-eager,mole-eager,mole-adafuse,pregated-adafuse-merge",
                              "--profile", "mole-adafuse"])
    finally:
        torch._dynamo.reset()
    assert json.loads((tmp_path / "gpu_check.json").read_text())["rows"].keys() == {"1", "3"}
    assert not res["errors"], res["errors"]
    assert res["kernels"] and all(k["max_rel_err"] < 1e-5 for k in res["kernels"])
    assert all(c["max_abs_dlogit"] < 1e-4 and c["argmax_agree"] == 1.0 for c in res["check"].values())
    assert {name: s["fused"] for name, s in res["sites"].items()} == {
        f"{name}/b{b}": 14 for name in ("mole-adafuse", "pregated-adafuse-merge") for b in (1, 3)}
    for row in res["site_timing"]:  # every form of one site timed against its base linear
        assert {"linear", "fused", "fused-lists", "route", "routed"} <= set(row), row
        assert all("error" not in v for v in row.values() if isinstance(v, dict)), row
    assert res["profile"]["mole-adafuse"]["kernels_per_step"] > 0
    assert set(res["rows"][1]) == {"base-eager", "mole-eager", "mole-adafuse", "pregated-adafuse-merge"}
