"""Throughput of vLLM serving a MoLE Llama: the adafuse backend against vLLM's default compile.

    .venv-vllm/bin/python benchmarks/bench_vllm.py [--size small] [--requests 8] [--tokens 64] [--tp 1]

One checkpoint (``tiny_llama(size)`` + ``add_lora_moe``: a router per site, E=8, k=2, r=8, fp32,
written by ``save_mole_checkpoint``), then one engine per configuration, each in its own process
(``tests/vllm/serve_case.py --bench``): a warm-up, then ``--requests`` concurrent greedy requests of
``--tokens`` tokens each, timed end to end (prefill included), reported as generated tokens per
second. Configurations: ``adafuse`` (``compilation_config={"mode": 2, "backend": "adafuse"}``),
``inductor-mode2`` (the same mode with vLLM's Inductor) and ``default`` (no compilation_config:
what vLLM picks on this platform). Run them one at a time: on a 2-core machine each engine
takes both cores. Each configuration's greedy tokens on the fixed prompts are compared with the
adafuse ones (they must be equal).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {"adafuse": ["--mode", "2", "--backend", "adafuse"], "inductor-mode2": ["--mode", "2", "--backend", ""],
           "default": ["--mode", "-1", "--backend", ""]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=["tiny", "small", "medium"])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--configs", default="adafuse,inductor-mode2,default")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    from adafuse_compile.integrations.vllm import save_mole_checkpoint
    from adafuse_compile.models import add_lora_moe, tiny_llama

    shape = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2) \
        if args.size == "tiny" else {}  # vLLM's CPU attention needs head size >= 32
    work = pathlib.Path(tempfile.mkdtemp(prefix="adafuse-bench-vllm-"))
    save_mole_checkpoint(add_lora_moe(tiny_llama(args.size, **shape), experts=8, top_k=2, rank=8).eval(),
                         work / "model")
    results = {}
    for name in args.configs.split(","):
        out = work / f"{name}.json"
        env = {**os.environ, "VLLM_CACHE_ROOT": str(work / f"cache-{name}")}
        cmd = [sys.executable, str(ROOT / "tests/vllm/serve_case.py"), "--model", str(work / "model"),
               "--tp", str(args.tp), "--out", str(out), "--bench", str(args.requests),
               "--bench-tokens", str(args.tokens), *CONFIGS[name]]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[name] = json.loads(out.read_text())
        b = results[name]["bench"]
        print(f"{name:15s} {b['tokens_per_s']:8.1f} tokens/s  ({b['tokens']} tokens in {b['seconds']:.2f} s; "
              f"engine start {results[name]['startup_s']:.0f} s)", flush=True)
    ref = results.get("adafuse", next(iter(results.values())))["tokens"]
    same = {n: r["tokens"] == ref for n, r in results.items()}
    print("greedy tokens equal to adafuse's:", same)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
