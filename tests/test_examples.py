"""The examples run as scripts (the README's `make demo` runs quickstart.py)."""

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_quickstart_runs_and_matches_eager():
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "--size", "tiny", "--tokens", "8"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "max |logits diff| adafuse vs eager" in out.stdout
    assert "forward: eager" in out.stdout
    assert "explain: 14 of 14 sites fused" in out.stdout
