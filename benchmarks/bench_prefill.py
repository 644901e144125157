"""Prefill on CPU: one forward of a ``T``-token prompt (no KV cache), backbone against MoLE.

Issue 14 asks that prefill (T >= 256) not get slower than plain Inductor. At these token counts
the fused op runs every expert through GEMMs (``use_gemms`` in the C++ kernel), not the decode
loops. Configurations: the backbone under Inductor, the MoLE model eager, under Inductor and
under adafuse, each compiled with static shapes, timed round-robin in one process (median over
rounds of each one's ratio to the backbone in the same round); the outputs are compared with
eager's.

    python benchmarks/bench_prefill.py [--size small] [--style mola] [--batch 1] [--tokens 256]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from adafuse_compile.backend import capture_rewrites
from adafuse_compile.bench.cli import build_model
from adafuse_compile.bench.timing import interleaved_times, paired_ratio

CONFIGS = [("backbone, Inductor", "backbone", "inductor"), ("MoLE, eager", "mole", None),
           ("MoLE, Inductor", "mole", "inductor"), ("MoLE, adafuse", "mole", "adafuse")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small", choices=["tiny", "small", "medium"])
    ap.add_argument("--style", default="mola", help="ours, or a models.styles key (mola, stacked, ...)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8)

    runs, outputs, sites = {}, {}, {}
    for name, kind, backend in CONFIGS:
        model = build_model(kind, args.size, None, args.style)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens),
                            generator=torch.Generator().manual_seed(0))

        def forward(i, model=model):
            return model(i, use_cache=False).logits

        fn = torch.compile(forward, backend=backend, dynamic=False) if backend else forward
        with torch.inference_mode(), capture_rewrites() as rewrites:
            outputs[name] = fn(ids)  # compiles
        sites[name] = ", ".join(f"{n} {s}" for rw in rewrites for s, n in rw.counts().items()) or "-"
        runs[name] = lambda fn=fn, ids=ids: fn(ids)
    with torch.inference_mode():
        per_round = interleaved_times(runs, rounds=args.rounds, reps=1, warmup=1)
    base = CONFIGS[0][0]
    print(f"{args.size} Llama, MoLE written as {args.style!r}, prefill of {args.batch} x {args.tokens} tokens, "
          f"{args.rounds} interleaved rounds, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'configuration':22s} {'ms':>9s} {'vs backbone':>12s} {'max |d| vs eager':>17s}  sites")
    for name, kind, _ in CONFIGS:
        diff = (outputs[name].float() - outputs["MoLE, eager"].float()).abs().max().item() if kind == "mole" else 0.0
        print(f"{name:22s} {statistics.median(per_round[name]) * 1e3:9.2f} {paired_ratio(per_round, name, base):12.3f} "
              f"{diff:17.1e}  {sites[name]}")


if __name__ == "__main__":
    main()
