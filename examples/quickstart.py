"""Quick start: a MoLE Llama, eager vs ``torch.compile(backend="adafuse")``.

Builds a small random Llama from a transformers config (seeded, no downloads), puts LoRA-MoE
adapters (E=8 experts, top-2, rank 8) on all seven projections, then checks that the compiled
model gives the eager logits, times both (interleaved in one process), and says what the
passes did to each adapter site.

    python examples/quickstart.py [--size tiny|small|medium] [--tokens 16] [--explain]
"""

from __future__ import annotations

import argparse
import time

import torch

import adafuse_compile
from adafuse_compile.models import adapter_sites, add_lora_moe, tiny_llama
from adafuse_compile.timing import interleaved_medians


def main() -> None:
    ap = argparse.ArgumentParser(description="MoLE Llama: eager vs backend='adafuse'")
    ap.add_argument("--size", default="small", choices=["tiny", "small", "medium"])
    ap.add_argument("--tokens", type=int, default=16, help="tokens per forward (batch 1)")
    ap.add_argument("--explain", action="store_true", help="print the per-site table of explain()")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = add_lora_moe(tiny_llama(args.size), experts=8, top_k=2, rank=8).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens))
    print(f"{args.size} Llama, {len(adapter_sites(model))} MoLE sites (E=8, k=2, r=8), "
          f"{args.tokens} tokens, torch {torch.__version__}, {torch.get_num_threads()} threads")

    fast = torch.compile(model, backend="adafuse")
    with torch.inference_mode():
        eager_logits = model(ids).logits
        t0 = time.perf_counter()
        fast_logits = fast(ids).logits  # first call compiles
        compile_s = time.perf_counter() - t0
        diff = (fast_logits - eager_logits).abs().max().item()
        print(f"max |logits diff| adafuse vs eager: {diff:.2e}  (compile {compile_s:.1f} s)")
        times = interleaved_medians({"eager": lambda: model(ids), "adafuse": lambda: fast(ids)},
                                    rounds=7, reps=3, warmup=1)
        eager_ms, fast_ms = times["eager"] * 1e3, times["adafuse"] * 1e3
    print(f"forward: eager {eager_ms:.1f} ms, adafuse {fast_ms:.1f} ms ({eager_ms / fast_ms:.2f}x)")
    with torch.no_grad():
        report = adafuse_compile.explain(model, ids)
    print(f"explain: {report.count('fused')} of {len(report.sites)} sites fused, "
          f"{report.count('left')} left" + ("" if args.explain else "  (--explain prints the table)"))
    if args.explain:
        print(report)
    if not diff < 1e-3:
        raise SystemExit(f"compiled logits differ from eager by {diff}")


if __name__ == "__main__":
    main()
