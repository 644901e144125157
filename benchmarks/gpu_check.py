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
the fastest backbone. Every configuration's logits are compared with its eager model's, and its
compile's rewrites say how many sites fused on the device. Before that, one adapted linear is
timed against its base linear alone under CUDA-graph replay (``time_sites``), and ``--profile``
lists each named configuration's kernels per step. Compiles stop after ``--budget`` seconds
(then what compiled is timed), so the whole run fits in the device time a session has.
Everything lands in ``DIR/gpu_check.json``, also on failure, step by step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adafuse_compile  # noqa: E402, F401  (registers the backend)
from adafuse_compile.backend import backend_with_mode, capture_rewrites  # noqa: E402
from adafuse_compile.kernels import lora_moe_linear, lora_moe_linear_lists, routed_lora_moe_linear  # noqa: E402
from adafuse_compile.kernels.lora_moe_linear import lora_moe_linear_torch  # noqa: E402
from adafuse_compile.kernels.reference import lora_moe_linear_ref, topk_route  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from adafuse_compile.models import add_lora_moe, add_pregated_lora_moe, tiny_llama  # noqa: E402

WIDE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
            vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=4, vocab_size=512)
# (name, model, compile): None = eager; "inductor"; or the adafuse options (+ "cudagraphs": mode="reduce-overhead",
# "one_kernel_max_tokens": ONE_KERNEL_MAX_TOKENS of the Triton kernels while the configuration compiles).
# In the order they compile, the yardstick of issue 13 first: the compile budget may stop the
# rest (on the H200 the MoLE configurations took 15-30 s each per batch size).
PLAN = [
    ("base-inductor-cg", "base", "inductor-cg"), ("mole-adafuse-cg", "mole", {"cudagraphs": True}),
    ("pregated-adafuse-cg", "pregated", {"cudagraphs": True}),
    # the adapter as one Triton kernel up to 8 tokens (ONE_KERNEL_MAX_TOKENS; off by default until measured)
    ("pregated-adafuse-cg-1k", "pregated", {"cudagraphs": True, "one_kernel_max_tokens": 8}),
    ("mole-adafuse-cg-1k", "mole", {"cudagraphs": True, "one_kernel_max_tokens": 8}),
    ("mole-adafuse-freeze-cg", "mole", {"freeze": True, "cudagraphs": True}),  # routers sharing an input hoisted
    ("mole-inductor-cg", "mole", "inductor-cg"),
    ("base-eager", "base", None), ("mole-eager", "mole", None), ("pregated-eager", "pregated", None),
    ("base-inductor", "base", "inductor"), ("mole-inductor", "mole", "inductor"), ("mole-adafuse", "mole", {}),
    ("pregated-adafuse", "pregated", {}),
    ("pregated-adafuse-merge", "pregated", {"strategy": "merge", "freeze": True}),
    # on CUDA a merging strategy fuses under CUDA graphs (the backend warns): kept to show it runs
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


@contextlib.contextmanager
def _one_kernel_max_tokens(tokens: int | None):
    """``ONE_KERNEL_MAX_TOKENS`` of the Triton kernels set to ``tokens`` meanwhile (None: as is).
    The compiled graphs keep the path chosen while they were traced; the compile caches are off
    meanwhile (their keys do not include the setting: a hit would bring back the other path)."""
    if tokens is None:
        yield
        return
    import torch._functorch.config as functorch_config

    from adafuse_compile.kernels import lora_moe_linear_triton as lml

    before, lml.ONE_KERNEL_MAX_TOKENS = lml.ONE_KERNEL_MAX_TOKENS, tokens
    try:
        with torch._inductor.config.patch(fx_graph_cache=False), \
                functorch_config.patch(enable_autograd_cache=False):
            yield
    finally:
        lml.ONE_KERNEL_MAX_TOKENS = before


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
        on = [t.to(device=device, dtype=dtype) for t in (x, W, A, B)]
        idx_d, g_d = idx.to(device), g.to(device, dtype)
        ref = lora_moe_linear_ref(*(t.double().cpu() for t in (on[0], on[1])), None,
                                  *(t.double().cpu() for t in (on[2], on[3])), idx, g_d.double().cpu(), 2.0)
        runs = {"op": lambda: lora_moe_linear(on[0], on[1], None, on[2], on[3], idx_d, g_d, 2.0)}
        if device == "cuda":  # the op compiled graphs call on CUDA (its kernels seen by Inductor)
            from adafuse_compile.kernels.lora_moe_linear_triton import lora_moe_linear_cuda, lora_moe_linear_triton

            runs["cuda-op"] = lambda: lora_moe_linear_cuda(on[0], on[1], None, on[2], on[3], idx_d, g_d, 2.0)
            runs["one-kernel"] = lambda: lora_moe_linear_triton(on[0], on[1], None, on[2], on[3], idx_d, g_d, 2.0,
                                                                adapter="one-kernel")
            runs["cuda-op-inductor"] = lambda: torch.compile(lora_moe_linear_cuda)(
                on[0], on[1], None, on[2], on[3], idx_d, g_d, 2.0)
        for name, run in runs.items():
            err = ((run().double().cpu() - ref).abs().max() / ref.abs().max()).item()
            rows.append({"T": T, "in": d_in, "out": d_out, "E": E, "k": k, "r": r, "path": name, "max_rel_err": err})
            print(f"kernel {name} T={T} {d_in}x{d_out} E={E} k={k} r={r}: max error {err:.2e} of max |y|", flush=True)
    return rows


# (in, out, r) of the site timing: Llama-2-7B's projections (attention, MLP up/gate, MLP down)
SITE_SHAPES = [(4096, 4096, 8), (4096, 11008, 8), (11008, 4096, 8), (4096, 4096, 64)]


def time_sites(device, dtype, smoke: bool, tokens=(1, 8, 256)) -> list[dict]:
    """One adapted linear against its base linear alone, us per call (issue 13: a fused site
    within 10% of the base linear at decode, and at prefill (T=256) no slower than the gathered
    pure-torch path, ``torch-gathered``). ``graph_us``: on CUDA, 32 calls captured in one
    CUDA graph, cycling through 8 weight sets (more bytes than the L2, as in a model), replayed:
    the kernels' time without launch cost. ``eager_us``: wall time per call, uncaptured.

    ``fused``/``fused-lists``: ``adafuse::lora_moe_linear`` with a given decision (stacked or
    per-expert experts); on CUDA ``fused-inductor``: ``adafuse::lora_moe_linear_cuda`` compiled
    by Inductor (its host time per call is ``eager_us``), and ``fused-one-kernel``: the adapter
    as one Triton kernel instead of the shrink and the expand (``ONE_KERNEL_MAX_TOKENS`` decides
    which a model gets); ``torch-gathered``: the op's pure-torch
    path (gathered experts, two ``bmm``, or every expert dense once the batch covers them);
    ``route``: the top-k router alone (:func:`topk_route`'s ATen calls);
    ``routed``: ``adafuse::routed_lora_moe_linear``, router included (per-layer-routed sites).
    """
    shapes = [(40, 72, 4)] if smoke else SITE_SHAPES
    tokens = (1, 8) if smoke else tokens
    E, k, sets = 8, 2, 2 if smoke else 8
    if device == "cuda":
        from adafuse_compile.kernels.lora_moe_linear_triton import lora_moe_linear_cuda, lora_moe_linear_triton

        compiled_site = torch.compile(lora_moe_linear_cuda, dynamic=False)
    rows = []
    for in_f, out_f, r in shapes:
        for T in tokens:
            def mk(*shape, s=1.0):
                return (torch.randn(*shape, device=device) * s).to(dtype)
            ws = [dict(W=mk(out_f, in_f, s=in_f ** -0.5), A=mk(E, r, in_f, s=in_f ** -0.5),
                       B=mk(E, out_f, r, s=r ** -0.5), R=mk(E, in_f, s=in_f ** -0.5)) for _ in range(sets)]
            for w in ws:
                w["As"], w["Bs"] = list(w["A"].unbind(0)), list(w["B"].unbind(0))
            x = mk(T, in_f)
            idx = torch.stack([torch.randperm(E, device=device)[:k] for _ in range(T)])
            g = torch.softmax(torch.randn(T, k, device=device), -1).to(dtype)
            fns = {
                "linear": lambda w: F.linear(x, w["W"]),
                "fused": lambda w: lora_moe_linear(x, w["W"], None, w["A"], w["B"], idx, g, 2.0),
                "fused-lists": lambda w: lora_moe_linear_lists(x, w["W"], None, w["As"], w["Bs"], idx, g, 2.0),
                "torch-gathered": lambda w: lora_moe_linear_torch(x, w["W"], None, w["A"], w["B"], idx, g, 2.0),
                **({"fused-inductor": lambda w: compiled_site(x, w["W"], None, w["A"], w["B"], idx, g, 2.0),
                    # the adapter as one kernel (off by default until this measures it)
                    "fused-one-kernel": lambda w: lora_moe_linear_triton(x, w["W"], None, w["A"], w["B"], idx, g, 2.0,
                                                                         adapter="one-kernel")}
                   if device == "cuda" else {}),
                "route": lambda w: topk_route(x, w["R"], None, k=k, softmax_first=True, renorm=True),
                "routed": lambda w: routed_lora_moe_linear(x, w["W"], None, x, w["R"], None, w["As"], w["Bs"], k=k,
                                                           softmax_first=True, renorm=True, scale=2.0),
            }
            row = {"T": T, "in": in_f, "out": out_f, "E": E, "k": k, "r": r}
            for name, fn in fns.items():
                try:
                    row[name] = {"graph_us": _graph_us(fn, ws, device), "eager_us": _eager_us(fn, ws, device)}
                except Exception as e:
                    row[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(row)
            base = row["linear"].get("graph_us") or row["linear"].get("eager_us")
            print(f"site T={T} {in_f}x{out_f} r={r}: " + ", ".join(
                f"{n} {v['graph_us'] or v['eager_us']:.1f} us ({(v['graph_us'] or v['eager_us']) / base:.2f}x, "
                f"eager {v['eager_us']:.1f})" if "error" not in v else f"{n} ERROR {v['error']}"
                for n, v in row.items() if isinstance(v, dict)), flush=True)
    return rows


def _graph_us(fn, ws, device: str, calls: int = 32, replays: int = 10) -> float | None:
    if device != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles, cuBLAS handles) outside the capture
        for w in ws:
            fn(w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(ws[i % len(ws)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls)


def _eager_us(fn, ws, device: str, calls: int = 64) -> float:
    for w in ws:
        fn(w)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(calls):
        fn(ws[i % len(ws)])
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / calls


def profile_steps(fns: dict, ids, device: str, steps: int = 3, top: int = 12) -> dict:
    """Per configuration: device kernels per step, their summed time, and the ``top`` kernels."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    out = {}
    for name, fn in fns.items():
        with torch.inference_mode():
            fn(ids)
            with profile(activities=acts) as prof:
                for _ in range(steps):
                    fn(ids)
                if device == "cuda":
                    torch.cuda.synchronize()
        kernels: dict[str, list[float]] = {}
        for e in prof.events():
            if device == "cpu" or e.device_type == torch.autograd.DeviceType.CUDA:
                kernels.setdefault(e.name, []).append(e.time_range.elapsed_us())
        total = {n: sum(v) / steps for n, v in kernels.items()}
        out[name] = {"kernels_per_step": sum(map(len, kernels.values())) / steps,
                     "kernel_us_per_step": round(sum(total.values()), 1),
                     "top": [(n[:90], len(kernels[n]) / steps, round(t, 1))
                             for n, t in sorted(total.items(), key=lambda kv: -kv[1])[:top]]}
        print(f"profile {name}: {out[name]['kernels_per_step']:.0f} events/step, "
              f"{out[name]['kernel_us_per_step']} us/step; top {out[name]['top'][:6]}", flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, adafuse with inner eager")
    parser.add_argument("--out", default="/tmp")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--budget", type=float, default=300, help="seconds of compiling, then time what compiled")
    parser.add_argument("--configs", default="", help="comma-separated subset of the plan's names")
    parser.add_argument("--parts", default="kernels,sites,decode", help="which of kernels,sites,decode to run")
    parser.add_argument("--profile", default="", help="comma-separated configurations to profile after timing")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = dict(TINY if args.smoke else WIDE, num_hidden_layers=2 if args.smoke else args.layers)
    out = Path(args.out) / "gpu_check.json"
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "size": size, "dtype": str(dtype), "kernels": [], "rows": {}, "check": {}, "compile_s": {}, "sites": {},
           "cudagraph_skips": {}, "site_timing": [], "profile": {}, "errors": {}}
    save = lambda: out.write_text(json.dumps(res, indent=1))  # noqa: E731
    start = time.time()
    print(res["device"], torch.__version__, size, dtype, flush=True)
    parts = set(args.parts.split(","))
    for part, key, run in (("kernels", "kernels", check_kernels), ("sites", "site_timing", time_sites)):
        if part in parts:
            try:
                res[key] = run(device, dtype, args.smoke)
            except Exception as e:
                res["errors"][part] = f"{type(e).__name__}: {e}"
                traceback.print_exc(limit=3)
            save()
    if "decode" not in parts:
        return res
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
    if device == "cuda":
        torch._logging.set_logs(cudagraphs=True)  # Inductor's "skipping cudagraphs" reasons reach the handler
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
                options = {k: v for k, v in how.items() if k not in ("cudagraphs", "one_kernel_max_tokens")}
                if args.smoke:
                    options["inner"] = "eager"
                mode = "reduce-overhead" if how.get("cudagraphs") else None
                fn = torch.compile(step, backend=backend_with_mode(mode), options=options or None)
            skipped = counters["inductor"]["cudagraph_skips"]
            one_kernel = how.get("one_kernel_max_tokens") if isinstance(how, dict) and device == "cuda" else None
            for b in batches:
                t0 = time.time()
                with torch.inference_mode(), capture_rewrites() as rewrites, _one_kernel_max_tokens(one_kernel):
                    got = [fn(ids[b]) for _ in range(3)][-1].float()
                    ref = step(ids[b]).float()
                if isinstance(how, dict):  # the sites of this compile, as the passes left them
                    sites = [s for rw in rewrites for s in rw.sites]
                    res["sites"][f"{name}/b{b}"] = {
                        "fused": sum(s.status == "fused" for s in sites), "left": sum(s.status == "left" for s in sites),
                        "reasons left": sorted({s.reason for s in sites if s.status == "left"})[:3]}
                if device == "cuda":
                    torch.cuda.synchronize()
                res["compile_s"][f"{name}/b{b}"] = round(time.time() - t0, 1)
                res["check"][f"{name}/b{b}"] = {"max_abs_dlogit": (got - ref).abs().max().item(),
                                                 "argmax_agree": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}
            res["cudagraph_skips"][name] = {"count": counters["inductor"]["cudagraph_skips"] - skipped,
                                            "messages": list(skips.messages)}
            fns[name] = fn
            print(f"{name}: compile {[res['compile_s'][f'{name}/b{b}'] for b in batches]} s, "
                  f"check {[res['check'][f'{name}/b{b}'] for b in batches]}, "
                  f"sites {[res['sites'].get(f'{name}/b{b}') for b in batches]}, "
                  f"cudagraph skips {res['cudagraph_skips'][name]}", flush=True)
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
    if args.profile:
        res["profile"] = profile_steps({n: fns[n] for n in args.profile.split(",") if n in fns}, ids[batches[0]], device)
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
