"""The GPU check of issue 13, as one prepared script: kernels against float64 at real sizes, and
the one-token decode-step table (backbone with and without CUDA graphs; MoLE and pre-gated under
eager, Inductor and adafuse, fused and merged, with and without CUDA graphs).

    python benchmarks/gpu_check.py [--out DIR] [--layers 4] [--batches 1,8] [--budget 300]
    python benchmarks/gpu_check.py --smoke          # tiny sizes on the CPU (CI runs this)

Runs from a checkout (the repository root is put on ``sys.path``; nothing to install), on the
first CUDA device when there is one: a Llama-2-7B-wide model (hidden 4096, intermediate 11008,
32 heads, vocab 32000) cut to ``--layers`` layers, bf16, MoLE on all 7 projections (E=8, k=2,
r=8). The step is ``model(ids [batch, 1], use_cache=False)`` under ``torch.inference_mode()``;
configurations run round-robin (CUDA-event timing), each the median of its rounds; ratios are to
the fastest backbone. Every configuration's logits are compared with its eager model's, and
``explain`` says how many sites fused on the device. Compiles stop after ``--budget`` seconds
(then what compiled is timed), so the whole run fits in the device time a session has.
Everything lands in ``DIR/gpu_check.json``, also on failure, step by step.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adafuse_compile  # noqa: E402  (registers the backend)
from adafuse_compile.backend import backend_with_mode  # noqa: E402
from adafuse_compile.kernels import lora_moe_linear  # noqa: E402
from adafuse_compile.kernels.reference import lora_moe_linear_ref  # noqa: E402
from adafuse_compile.models import add_lora_moe, add_pregated_lora_moe, tiny_llama  # noqa: E402

WIDE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
            vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=4, vocab_size=512)
# (name, model, compile): None = eager; "inductor"; or the adafuse options (+ "cudagraphs": mode="reduce-overhead")
PLAN = [
    ("base-eager", "base", None), ("mole-eager", "mole", None), ("pregated-eager", "pregated", None),
    ("base-inductor", "base", "inductor"), ("base-inductor-cg", "base", "inductor-cg"),
    ("mole-inductor", "mole", "inductor"), ("mole-adafuse", "mole", {}),
    ("mole-adafuse-cg", "mole", {"cudagraphs": True}), ("pregated-adafuse", "pregated", {}),
    ("pregated-adafuse-cg", "pregated", {"cudagraphs": True}),
    ("pregated-adafuse-merge", "pregated", {"strategy": "merge", "freeze": True}),
    ("pregated-adafuse-merge-cg", "pregated", {"strategy": "merge", "freeze": True, "cudagraphs": True}),
]


class _Skips(logging.Handler):
    """Inductor's "skipping cudagraphs" reasons, per configuration."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record) -> None:
        msg = record.getMessage()
        if "skipping cudagraphs" in msg:
            self.messages.append(msg.splitlines()[0][:300])


def check_kernels(device, dtype, smoke: bool) -> list[dict]:
    """``adafuse::lora_moe_linear`` against its float64 reference at decode and prefill sizes."""
    shapes = [(1, 64, 48, 4, 2, 4), (5, 40, 72, 3, 3, 8)] if smoke else [
        (1, 4096, 4096, 8, 2, 8), (8, 4096, 11008, 8, 2, 16), (8, 11008, 4096, 8, 2, 64), (256, 4096, 4096, 8, 2, 8)]
    rows = []
    gen = torch.Generator().manual_seed(0)
    for T, d_in, d_out, E, k, r in shapes:
        x = torch.randn(T, d_in, generator=gen)
        W = torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5
        A = torch.randn(E, r, d_in, generator=gen) / d_in ** 0.5
        B = torch.randn(E, d_out, r, generator=gen) / r ** 0.5
        idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
        g = torch.softmax(torch.randn(T, k, generator=gen), -1)
        ref = lora_moe_linear_ref(x.double(), W.double(), None, A.double(), B.double(), idx, g.double(), 2.0)
        on = [t.to(device=device, dtype=dtype) for t in (x, W, A, B)]
        got = lora_moe_linear(on[0], on[1], None, on[2], on[3], idx.to(device), g.to(device, dtype), 2.0)
        err = ((got.double().cpu() - ref).abs().max() / ref.abs().max()).item()
        rows.append({"T": T, "in": d_in, "out": d_out, "E": E, "k": k, "r": r, "max_rel_err": err})
        print(f"kernel T={T} {d_in}x{d_out} E={E} k={k} r={r}: max error {err:.2e} of max |y|", flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, adafuse with inner eager")
    parser.add_argument("--out", default="/tmp")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--budget", type=float, default=300, help="seconds of compiling, then time what compiled")
    parser.add_argument("--configs", default="", help="comma-separated subset of the plan's names")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = dict(TINY if args.smoke else WIDE, num_hidden_layers=2 if args.smoke else args.layers)
    out = Path(args.out) / "gpu_check.json"
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "size": size, "dtype": str(dtype), "kernels": [], "rows": {}, "check": {}, "compile_s": {}, "sites": {},
           "cudagraph_skips": {}, "errors": {}}
    save = lambda: out.write_text(json.dumps(res, indent=1))  # noqa: E731
    start = time.time()
    print(res["device"], torch.__version__, size, dtype, flush=True)
    try:
        res["kernels"] = check_kernels(device, dtype, args.smoke)
    except Exception as e:
        res["errors"]["kernels"] = f"{type(e).__name__}: {e}"
    save()
    base = tiny_llama("tiny", seed=0, **size).to(device)
    models = {"base": base.to(dtype).eval()}
    models["mole"] = add_lora_moe(copy.deepcopy(base), experts=8, top_k=2, rank=8).to(dtype).eval()
    models["pregated"] = add_pregated_lora_moe(copy.deepcopy(base), experts=8, top_k=2, rank=8).to(dtype).eval()
    batches = [int(b) for b in args.batches.split(",")]
    ids = {b: torch.randint(0, size["vocab_size"], (b, 1), generator=torch.Generator().manual_seed(b)).to(device)
           for b in batches}
    plan = [p for p in PLAN if not args.configs or p[0] in args.configs.split(",")]
    if device == "cpu":  # CUDA graphs need CUDA
        plan = [p for p in plan if not (p[2] == "inductor-cg" or isinstance(p[2], dict) and p[2].get("cudagraphs"))]
    # Every configuration compiles the same frames (the model's forward): each keeps its own cache
    # entries, all alive for the round-robin timing (a reset in between would recompile there).
    torch._dynamo.config.recompile_limit = torch._dynamo.config.cache_size_limit = 64
    skips = _Skips()
    logging.getLogger("torch._inductor").addHandler(skips)
    fns = {}
    for name, kind, how in plan:
        model = models[kind]
        step = lambda i, m=model: m(i, use_cache=False).logits  # noqa: E731
        skips.messages.clear()
        try:
            if how is None:
                fn = step
            elif how in ("inductor", "inductor-cg"):
                fn = torch.compile(step, mode="reduce-overhead" if how == "inductor-cg" else None)
            else:
                options = {k: v for k, v in how.items() if k != "cudagraphs"}
                if args.smoke:
                    options["inner"] = "eager"
                mode = "reduce-overhead" if how.get("cudagraphs") else None
                fn = torch.compile(step, backend=backend_with_mode(mode), options=options or None)
            for b in batches:
                t0 = time.time()
                with torch.inference_mode():
                    got = [fn(ids[b]) for _ in range(3)][-1].float()
                    ref = step(ids[b]).float()
                if device == "cuda":
                    torch.cuda.synchronize()
                res["compile_s"][f"{name}/b{b}"] = round(time.time() - t0, 1)
                res["check"][f"{name}/b{b}"] = {"max_abs_dlogit": (got - ref).abs().max().item(),
                                                 "argmax_agree": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}
            res["cudagraph_skips"][name] = list(skips.messages)
            fns[name] = fn
            print(f"{name}: compile {[res['compile_s'][f'{name}/b{b}'] for b in batches]} s, "
                  f"check {[res['check'][f'{name}/b{b}'] for b in batches]}, "
                  f"cudagraph skips {len(skips.messages)}", flush=True)
        except Exception as e:
            res["errors"][name] = f"{type(e).__name__}: {str(e)[:600]}"
            print(f"{name}: ERROR {res['errors'][name]}", flush=True)
            traceback.print_exc(limit=3)
        save()
        if time.time() - start > args.budget:
            print("compile budget spent: timing what compiled", flush=True)
            break
    rounds, reps = (1, 2) if args.smoke else (7, 30)
    for b in batches:
        per = {name: [] for name in fns}
        with torch.inference_mode():
            for _ in range(rounds):
                for name, fn in fns.items():
                    per[name].append(_time_ms(fn, ids[b], reps, device))
        med = {name: statistics.median(v) for name, v in per.items()}
        fastest = min((v for n, v in med.items() if n.startswith("base")), default=None)
        res["rows"][b] = {n: {"ms": round(v, 4), "vs_fastest_backbone": round(v / fastest, 3) if fastest else None}
                          for n, v in med.items()}
        print(f"batch {b}: fastest backbone {fastest} ms", flush=True)
        for n, v in med.items():
            print(f"  {n:28s} {v:9.3f} ms  {v / fastest if fastest else float('nan'):6.2f}x", flush=True)
        save()
    # explain resets Dynamo, so it runs after the timing: how many sites fused on the device
    for name, kind, how in plan:
        if isinstance(how, dict) and name in fns:
            options = {k: v for k, v in how.items() if k != "cudagraphs"}
            with torch.inference_mode():
                report = adafuse_compile.explain(models[kind], ids[batches[0]], options=options)
            res["sites"][name] = {"fused": report.count("fused"), "left": report.count("left"),
                                  "reasons left": sorted({s.reason for s in report.sites if s.status == "left"})[:3]}
            print(f"{name}: sites {res['sites'][name]}", flush=True)
    save()
    print(f"done in {time.time() - start:.0f} s; {out}", flush=True)
    return res


def _time_ms(fn, ids, reps: int, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn(ids)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(ids)
    return (time.perf_counter() - t0) * 1e3 / reps


if __name__ == "__main__":
    main()
