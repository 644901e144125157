"""An AdaFuse-style pre-gated model: one token-level gate decides the experts of every layer.

``add_pregated_lora_moe`` puts one ``PreGate`` on the token embeddings; every adapted linear
reads its decision ("decide once, apply everywhere"). Because one decision drives all sites,
the compiler may either run the fused unmerged op at each site (``strategy="fused"``) or merge
the chosen experts into copies of the weights and run plain linears, switching only when the
decision changes (``strategy="merge"``); ``"auto"`` lets the cost model choose per step. This
compiles the model once per strategy, shows what each compile did to the sites, checks the
greedy tokens against eager and times one-token decode steps, interleaved.

    python examples/pregated_model.py [--size tiny|small|medium] [--new 16] [--inner inductor|eager]
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from adafuse_compile.backend import capture_rewrites
from adafuse_compile.bench.decoding import GreedyDecoder, compare_to_reference
from adafuse_compile.models import adapter_sites, add_pregated_lora_moe, find_pregate, tiny_llama
from adafuse_compile.bench.timing import interleaved_medians

STRATEGIES = ("fused", "merge", "auto")


def main() -> None:
    ap = argparse.ArgumentParser(description="pre-gated MoLE Llama: merge-switch vs fused under backend='adafuse'")
    ap.add_argument("--size", default="small", choices=["tiny", "small", "medium"])
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (merging needs one decision per step)")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=16, help="decode steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", default="inductor", choices=["inductor", "eager"])
    args = ap.parse_args()

    model = add_pregated_lora_moe(tiny_llama(args.size), experts=8, top_k=2, rank=8).eval()
    gate = find_pregate(model)
    print(f"{args.size} Llama, {len(adapter_sites(model))} sites driven by one PreGate "
          f"(E={gate.experts}, k={gate.top_k}, gate={gate.gate}); batch {args.batch}, prompt {args.prompt}, "
          f"{args.new} decode steps, inner={args.inner!r}, torch {torch.__version__}")
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt),
                           generator=torch.Generator().manual_seed(0))
    eager = GreedyDecoder(model, model.forward, prompt, args.new)
    reference = eager.decode(keep_logits=True)
    decoders = {"eager": eager}
    for strategy in STRATEGIES:
        forward = torch.compile(model.forward, backend="adafuse", dynamic=False,
                                options={"strategy": strategy, "inner": args.inner, "freeze": strategy != "fused"})
        decoders[strategy] = GreedyDecoder(model, forward, prompt, args.new)
        with capture_rewrites() as rewrites:  # what the backend did to each graph, as data
            t0 = time.perf_counter()
            result = decoders[strategy].decode(teacher=reference.tokens, keep_logits=True)
        check = compare_to_reference(result, reference)
        statuses = collections.Counter(s.status for rw in rewrites for s in rw.sites)
        done = ", ".join(f"{status} {n}" for status, n in sorted(statuses.items()))
        print(f"strategy={strategy!r}: compiled in {time.perf_counter() - t0:.1f} s; sites: {done or 'none logged'}; "
              f"tokens equal to eager: {check['tokens_equal']}, max |dlogit| {check['max_logit_diff']:.1e}")
        for group in (g for rw in rewrites for g in rw.groups):  # a decision, its sites, strategy, estimate
            print(f"  group on ({group.decision}): {len(group.sites)} site(s), strategy {group.strategy}; "
                  f"{group.estimate}")
        if strategy == "fused" and not check["tokens_equal"]:
            raise SystemExit(f"fused strategy chose other tokens than eager: {check['first_mismatch']}")

    times = interleaved_medians({k: d.decode for k, d in decoders.items()}, rounds=args.repeats, reps=1, warmup=1)
    base = times["fused"]
    print("decode step:  " + ", ".join(f"{k} {t * 1e3 / args.new:.2f} ms ({t / base:.2f}x fused)"
                                       for k, t in times.items()))


if __name__ == "__main__":
    main()
