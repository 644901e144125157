"""One-token step of real third-party MoLE code: eager vs plain Inductor vs adafuse, interleaved.

    python benchmarks/bench_real_speed.py [--rounds 5] [--reps 10] [--batch 1]

Models (random weights, fp32, hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 4000):
MoE-PEFT 2.0.2 MixLoRA (E=4, top-2, r=4, on the MLP) through its own Llama, PEFT X-LoRA
(3 LoRA adapters r=8 on all seven projections, dense scalings from its classifier), and
eulerforge 0.1.0 ``MixtureLoRALinear`` (E=4, top-2, r=4, on the MLP of a transformers Llama;
its expert loop skips empty experts, which breaks plain ``torch.compile``'s graph). The step is
``model(input_ids [batch, 1])`` without KV cache under ``torch.no_grad()``; "inductor" is
``torch.compile(model)`` as a user writes it, "adafuse" is ``adafuse_compile.compile(model)``
(Inductor inside). Configurations run round-robin in one process; each reports the median over
rounds of its per-round median (``adafuse_compile.bench.timing``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import adafuse_compile
from adafuse_compile.bench.timing import interleaved_medians

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
import real_packages as R  # noqa: E402

SIZE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, vocab_size=4000)


def _sized(batch: int) -> None:
    R.HIDDEN, R.INTERMEDIATE, R.LAYERS, R.HEADS, R.VOCAB = (SIZE[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"))
    R.BATCH, R.SEQ = batch, 1


def _moe_peft_mixlora(batch: int):
    _sized(batch)
    built = R.moe_peft_model("mixlora")
    return built.model, built.inputs


def _eulerforge(batch: int):
    _sized(batch)
    built = R.eulerforge_model()
    return built.model, built.inputs


def _xlora(batch: int):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    size = dict(SIZE, num_key_value_heads=SIZE["num_attention_heads"], max_position_embeddings=64)
    paths = R.save_lora_adapters(tempfile.mkdtemp(), 3, rank=8, targets=targets, **size)
    return R.xlora_model(paths, **size), {"input_ids": torch.randint(0, SIZE["vocab_size"], (batch, 1))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    print(f"$ python benchmarks/bench_real_speed.py --rounds {args.rounds} --reps {args.reps} --batch {args.batch}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, sizes {SIZE}, batch {args.batch}, one token")
    print("| real code | eager ms | inductor ms | adafuse ms | adafuse / inductor | adafuse / eager | compile s "
          "(inductor, adafuse) |")
    print("|---|---|---|---|---|---|---|")
    for name, build in (("MoE-PEFT MixLoRA", _moe_peft_mixlora), ("PEFT X-LoRA", _xlora),
                        ("eulerforge MixtureLoRALinear", _eulerforge)):
        model, inputs = build(args.batch)
        torch._dynamo.reset()
        with torch.no_grad():
            fns, compile_s = {"eager": lambda m=model: m(**inputs)}, {}
            for label, compiled in (("inductor", torch.compile(model)), ("adafuse", adafuse_compile.compile(model))):
                t0 = time.perf_counter()
                compiled(**inputs)
                compile_s[label] = time.perf_counter() - t0
                fns[label] = lambda c=compiled: c(**inputs)
            t = interleaved_medians(fns, rounds=args.rounds, reps=args.reps, settle=1)
        ms = {k: v * 1e3 for k, v in t.items()}
        print(f"| {name} | {ms['eager']:.2f} | {ms['inductor']:.2f} | {ms['adafuse']:.2f} | "
              f"{t['adafuse'] / t['inductor']:.2f} | {t['adafuse'] / t['eager']:.2f} | "
              f"{compile_s['inductor']:.0f}, {compile_s['adafuse']:.0f} |", flush=True)
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
