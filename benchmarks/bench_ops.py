"""Micro-benchmark of the fused adapter op on CPU against the eager per-expert loops.

One adapted linear (hidden 1024 -> 1024 by default, E=8, k=2, r=8, fp32), tokens T per call.
Configurations run interleaved in one process (round-robin, median of per-round medians), as
shared/MEASUREMENTS.md (beside the repository) prescribes for this noisy machine; ratios are to the plain base linear.

    python benchmarks/bench_ops.py [--tokens 1,8] [--hidden 1024] [--rounds 15]

One site called over and over keeps its experts in cache, which a model never does. With
``--model small|medium`` the fused op instead runs every adapted linear of that model's step in
turn (the seven projections of each layer, each with its own weights), so each site's weights
come from memory as they do in a decode step. Reported per step: the base linears alone
(``F.linear``, MKL), the op at scale 0 (the same call adding no adapter), the op, and per site
the op's cost over the base linears and over itself at scale 0 (the adapter's own cost). For
decode-sized calls (float32 on AVX-512, up to 32 tokens on Intel's CPUs and 1024 on others,
see fused_base in the kernel) the C++ kernel computes the base linear
itself, at scale 0 too, and that can be faster than MKL's: "op - base" can then be negative.

    python benchmarks/bench_ops.py --model small [--tokens 1,8]
"""

from __future__ import annotations

import argparse
import functools
import importlib

import torch
import torch.nn.functional as F

from adafuse_compile.kernels import lora_moe_linear
from adafuse_compile.kernels.cpu_extension import load_cpu_kernels
from adafuse_compile.bench.timing import interleaved_medians

# The module, not the function that adafuse_compile.kernels re-exports under the same name.
op_module = importlib.import_module("adafuse_compile.kernels.lora_moe_linear")


def eager_mixlora(x, W, b, A, B, idx, g, scale):
    """MixLoRA-style dispatch: per expert, find its tokens with torch.where, index_add_ the result."""
    y = F.linear(x, W, b)
    for e in range(B.shape[0]):
        tok, slot = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        ye = F.linear(F.linear(xe, A[e]), B[e]) * (g[tok, slot].unsqueeze(-1) * scale)
        y.index_add_(0, tok, ye)
    return y


def eager_mola(x, W, b, A, B, idx, g, scale):
    """MoLA-style masked loop: every expert runs on every token, weighted by its gate (0 if unchosen)."""
    y = F.linear(x, W, b)
    for e in range(B.shape[0]):
        w = (g * (idx == e)).sum(-1, keepdim=True)
        y = y + F.linear(F.linear(x, A[e]), B[e]) * w * scale
    return y


def _torch_path(threshold):
    """The pure-torch fallback with its gathered/dense switch forced (None: as shipped)."""

    def run(*args):
        saved = op_module._DENSE_MIN_PAIRS_PER_EXPERT
        if threshold is not None:
            op_module._DENSE_MIN_PAIRS_PER_EXPERT = threshold
        try:
            return op_module.lora_moe_linear_torch(*args)
        finally:
            op_module._DENSE_MIN_PAIRS_PER_EXPERT = saved

    return run


# (hidden, intermediate, layers) of adafuse-bench's model sizes; q, k, v, o are hidden x hidden
# here (no grouped-query attention), gate and up hidden -> intermediate, down the reverse.
MODEL_SITES = {"small": (512, 1376, 4), "medium": (1024, 2816, 8)}


def random_site(n_in: int, n_out: int, E: int, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [out, in], A [E, r, in], B [E, out, r], scaled so outputs stay O(1)."""
    return torch.randn(n_out, n_in) / n_in**0.5, torch.randn(E, r, n_in) / n_in**0.5, torch.randn(E, n_out, r) / r**0.5


def random_routing(T: int, E: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """idx [T, k] (k distinct experts per token) and gates g [T, k]."""
    return torch.argsort(torch.rand(T, E), 1)[:, :k].contiguous(), torch.softmax(torch.randn(T, k), -1)


def model_step_sites(size: str, E: int, r: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(W, A, B) of every adapted linear of one step of ``size``, in the model's order."""
    hidden, inter, layers = MODEL_SITES[size]
    shapes = [(hidden, hidden)] * 4 + [(hidden, inter)] * 2 + [(inter, hidden)]
    return [random_site(n_in, n_out, E, r) for _ in range(layers) for n_in, n_out in shapes]


def bench_model_step(a) -> None:
    sites = model_step_sites(a.model, a.experts, a.rank)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, the {len(sites)} adapted linears of "
          f"the {a.model} model's step in turn, E={a.experts} k={a.top_k} r={a.rank}; median of {a.rounds} "
          f"interleaved rounds x {a.reps}")
    print(f"{'T':>3} {'base linear':>12} {'op, scale 0':>12} {'op':>10} {'op - base':>10} {'adapter':>8} {'vs base':>8}"
          "  (us per step; op - base and op - op at scale 0 per site)")
    with torch.inference_mode():
        for T in (int(t) for t in a.tokens.split(",")):
            xs = [torch.randn(T, W.shape[1]) for W, _, _ in sites]
            routings = [random_routing(T, a.experts, a.top_k) for _ in sites]

            def step(scale):
                for (W, A, B), x, (idx, g) in zip(sites, xs, routings):
                    lora_moe_linear(x, W, None, A, B, idx, g, scale)

            def linears():
                for (W, _, _), x in zip(sites, xs):
                    F.linear(x, W)

            res = interleaved_medians({"linear": linears, "op0": functools.partial(step, 0.0),
                                       "op": functools.partial(step, 2.0)}, rounds=a.rounds, reps=a.reps)
            print(f"{T:>3} {res['linear'] * 1e6:>12.0f} {res['op0'] * 1e6:>12.0f} {res['op'] * 1e6:>10.0f} "
                  f"{(res['op'] - res['linear']) / len(sites) * 1e6:>10.1f} "
                  f"{(res['op'] - res['op0']) / len(sites) * 1e6:>8.1f} {res['op'] / res['linear']:>8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--out", type=int, default=None)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--model", choices=sorted(MODEL_SITES), default=None,
                    help="time every adapted linear of this model's step in turn (cold weights)")
    a = ap.parse_args()
    torch.manual_seed(0)
    kernel = "C++ kernel" if load_cpu_kernels() else "pure-torch fallback (C++ kernel not built)"
    if a.model:
        print(f"fused op = {kernel}")
        bench_model_step(a)
        return
    n_in, n_out, E, k, r = a.hidden, a.out or a.hidden, a.experts, a.top_k, a.rank
    W, A, B = random_site(n_in, n_out, E, r)
    b = torch.randn(n_out)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
          f"in={n_in} out={n_out} E={E} k={k} r={r}; median of {a.rounds} interleaved rounds x {a.reps}; "
          f"fused op = {kernel}")
    print(f"{'T':>3} {'config':<26} {'us/call':>9} {'vs base':>8}")
    with torch.inference_mode():
        for T in (int(t) for t in a.tokens.split(",")):
            x = torch.randn(T, n_in)
            idx, g = random_routing(T, E, k)
            args = (x, W, b, A, B, idx, g, 2.0)
            fns = {
                "base linear only": lambda x, W, b, *_: F.linear(x, W, b),
                "fused op": lora_moe_linear,
                "torch fallback (auto)": _torch_path(None),
                "torch fallback, gathered": _torch_path(float("inf")),
                "torch fallback, dense": _torch_path(0.0),
                "eager MixLoRA loop": eager_mixlora,
                "eager MoLA masked loop": eager_mola,
            }
            ref = eager_mixlora(*args)
            for name in ("fused op", "torch fallback (auto)", "eager MoLA masked loop"):
                torch.testing.assert_close(fns[name](*args), ref, rtol=1e-4, atol=1e-4)
            res = interleaved_medians({name: functools.partial(fn, *args) for name, fn in fns.items()},
                                      rounds=a.rounds, reps=a.reps)
            for name, t in res.items():
                print(f"{T:>3} {name:<26} {t * 1e6:>9.1f} {t / res['base linear only']:>8.2f}")


if __name__ == "__main__":
    main()
