"""Decode-step benchmark: one new token with a static KV cache, MoLE Llama vs its backbone.

Configurations run interleaved in one process (round-robin, median of per-round medians), as
MEASUREMENTS.md prescribes; times are reported as ratios to the backbone under Inductor. The
full benchmark command with tables, JSON and plots is a later milestone (adafuse-bench); this
is the measurement behind the README's "what to expect".

    python benchmarks/bench_decode.py [--size small|medium] [--batch 1] [--style ours|mola|...]
"""

from __future__ import annotations

import argparse
import time

import torch

from adafuse_compile.models import DEFAULT_TARGETS, add_lora_moe, tiny_llama
from adafuse_compile.models.styles import STYLES
from adafuse_compile.timing import interleaved_medians


def add_adapters(model, style: str):
    """MoLE adapters (E=8, k=2, r=8) on all seven projections, written in ``style``."""
    if style == "ours":
        return add_lora_moe(model, experts=8, top_k=2, rank=8)
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in DEFAULT_TARGETS and isinstance(module, torch.nn.Linear):
            parent, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            setattr(parent, attr, STYLES[style](module, experts=8, rank=8, top_k=2))
    return model


def decode_step(model, backend, batch: int, prompt: int = 32, cache_len: int = 128, options=None):
    """A function running one decode step (cache position cycling) on a prefilled static cache."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    forward = model.forward if backend is None else torch.compile(
        model.forward, backend=backend, dynamic=False, options=options)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt))
    with torch.inference_mode():
        model(ids, past_key_values=cache, cache_position=torch.arange(prompt), use_cache=True)
    token = torch.randint(0, model.config.vocab_size, (batch, 1))
    position = [prompt]

    def step():
        p = position[0] if position[0] < cache_len - 1 else prompt
        forward(token, past_key_values=cache, cache_position=torch.tensor([p]), use_cache=True)
        position[0] = p + 1

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="medium", choices=["tiny", "small", "medium"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--style", default="ours", choices=["ours", *STYLES],
                    help="how the adapters are written: our LoRAMoELinear, or a project's style")
    a = ap.parse_args()
    torch.manual_seed(0)
    backbone = tiny_llama(a.size)
    mole = add_adapters(tiny_llama(a.size), a.style)
    configs = {
        "backbone eager": (backbone, None),
        "backbone inductor": (backbone, "inductor"),
        "MoLE eager": (mole, None),
        "MoLE inductor": (mole, "inductor"),
        "MoLE adafuse": (mole, "adafuse"),
        "MoLE adafuse, op": (mole, "adafuse", {"lowering": "op"}),  # the custom op under Inductor
    }
    print(f"{a.size} Llama, batch {a.batch}, {a.style}-style MoLE on all 7 projections (E=8, k=2, r=8), fp32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    steps, compile_s = {}, {}
    with torch.inference_mode():
        for name, (model, backend, *options) in configs.items():
            t0 = time.perf_counter()
            steps[name] = decode_step(model, backend, a.batch, options=options[0] if options else None)
            for _ in range(3):  # the first call compiles
                steps[name]()
            compile_s[name] = time.perf_counter() - t0
            print(f"  ready: {name} ({compile_s[name]:.1f} s incl. compile)", flush=True)
        medians = interleaved_medians(steps, rounds=a.rounds, reps=a.reps, warmup=0)  # warmed above
    base = medians["backbone inductor"]
    print(f"{'configuration':<20} {'ms/token':>9} {'vs backbone inductor':>21}")
    for name, t in medians.items():
        print(f"{name:<20} {t * 1e3:>9.2f} {t / base:>21.2f}")


if __name__ == "__main__":
    main()
