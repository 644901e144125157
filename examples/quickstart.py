"""Quick start: generate with a MoLE Llama compiled by ``backend="adafuse"``, and ask what it did.

Builds a random Llama from a transformers config (seeded, no downloads), puts LoRA-MoE adapters
(E=8 experts, top-2, rank 8, a router per site) on all seven projections, then:

1. generates greedily with ``model.generate()`` eagerly, then with the forward compiled by the
   adafuse backend (``generate`` calls ``model.forward``, so that is what gets compiled), checks
   the tokens are identical and times both, interleaved;
2. prints what the passes did to each adapter site (``adafuse_compile.explain``).

    python examples/quickstart.py [--size tiny|small|medium] [--new 24] [--inner inductor|eager]
"""

from __future__ import annotations

import argparse
import time

import torch

import adafuse_compile
from adafuse_compile.models import adapter_sites, add_lora_moe, tiny_llama
from adafuse_compile.bench.timing import interleaved_medians


def generate(model, ids, new_tokens):
    """Greedy, with a static KV cache: the prompt and the one-token step are the only two graphs.
    ``disable_compile``: transformers would otherwise torch.compile a static-cache generate
    itself, with Inductor, around our forward."""
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          cache_implementation="static", disable_compile=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="MoLE Llama: model.generate() eager vs backend='adafuse'")
    ap.add_argument("--size", default="small", choices=["tiny", "small", "medium"])
    ap.add_argument("--prompt", type=int, default=8, help="prompt tokens (batch 1)")
    ap.add_argument("--new", type=int, default=24, help="tokens to generate")
    ap.add_argument("--inner", default="inductor", choices=["inductor", "eager"],
                    help="compiler after the adafuse passes (eager: seconds instead of a minute)")
    args = ap.parse_args()

    model = add_lora_moe(tiny_llama(args.size), experts=8, top_k=2, rank=8).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    print(f"{args.size} Llama, {len(adapter_sites(model))} MoLE sites (E=8, k=2, r=8), prompt {args.prompt}, "
          f"{args.new} new tokens, torch {torch.__version__}, {torch.get_num_threads()} threads")

    eager_forward = model.forward
    compiled_forward = torch.compile(model.forward, backend="adafuse", options={"inner": args.inner})

    def run(forward):
        model.forward = forward  # generate() calls model.forward
        return generate(model, ids, args.new)

    with torch.inference_mode():
        expected = run(eager_forward)
        t0 = time.perf_counter()
        got = run(compiled_forward)  # the first call compiles
        print(f"compiled in {time.perf_counter() - t0:.1f} s (backend='adafuse', inner={args.inner!r})")
        print(f"generated: {got[0, args.prompt:].tolist()}")
        same = torch.equal(got, expected)
        print(f"tokens identical to eager: {same}")
        times = interleaved_medians({"eager": lambda: run(eager_forward), "adafuse": lambda: run(compiled_forward)},
                                    rounds=3, reps=1, warmup=1)
    eager_ms, fast_ms = (times[k] * 1e3 / args.new for k in ("eager", "adafuse"))
    print(f"generate: eager {eager_ms:.1f} ms/token, adafuse {fast_ms:.1f} ms/token ({eager_ms / fast_ms:.2f}x)")

    del model.forward
    with torch.no_grad():
        print(adafuse_compile.explain(model, ids))
    if not same:
        raise SystemExit("compiled generate() chose other tokens than eager")


if __name__ == "__main__":
    main()
