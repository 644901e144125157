"""Benchmark of the SGMM merge ops on CPU: switch vs re-base vs a plain copy of the weights.

The sites of the medium model (hidden 1024, 8 layers, all 7 projections: 56 sites, ~405 MB
fp32), E=8, r=8, decisions of k=2 experts. Configurations run interleaved in one process; the
median of per-round medians is reported with the effective bandwidth (weights read + written).

    python benchmarks/bench_merge.py [--layers 8] [--hidden 1024] [--rounds 7]
"""

from __future__ import annotations

import argparse

import torch

from adafuse_compile.kernels import merge_rebase_, merge_switch_
from adafuse_compile.bench.timing import interleaved_medians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    torch.manual_seed(0)
    h, inter, E, r = a.hidden, int(a.hidden * 2.6875), a.experts, a.rank
    shapes = ([(h, h)] * 4 + [(inter, h)] * 2 + [(h, inter)]) * a.layers  # q k v o, gate up, down
    Ws = [torch.randn(o, i) * 0.02 for o, i in shapes]
    bases = [w.clone() for w in Ws]
    As = [torch.randn(E, r, i) / i**0.5 for _, i in shapes]
    Bs = [torch.randn(E, o, r) * 0.01 for o, _ in shapes]
    scales = [2.0] * len(shapes)
    g = torch.tensor([0.6, 0.4])
    ids = lambda *e: torch.tensor([x % E for x in e])  # noqa: E731

    def switch(old, new, g_new=g):
        return lambda: merge_switch_(Ws, As, Bs, scales, ids(*old), g, ids(*new), g_new)

    def copy():
        for w, b in zip(Ws, bases):
            w.copy_(b)

    # The cost of a merge grows with the rank of the update, m * r for m changed experts.
    fns = {
        "switch, 1 expert changes": switch((0, 1), (0, 1), torch.tensor([0.6, 0.5])),
        "switch, 2 experts change": switch((0, 1), (0, 3)),
        "switch, 4 experts change": switch((0, 1), (2, 3)),
        "re-base, k=2": lambda: merge_rebase_(Ws, bases, As, Bs, scales, ids(2, 3), g),
        "re-base, dense k=E": lambda: merge_rebase_(
            Ws, bases, As, Bs, scales, torch.arange(E), torch.full((E,), 1.0 / E)),
        "plain copy of the weights": copy,
    }
    with torch.inference_mode():
        medians = interleaved_medians(fns, rounds=a.rounds, reps=3, warmup=1)
    nbytes = sum(w.numel() * w.element_size() for w in Ws)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {len(shapes)} sites, "
          f"{nbytes / 1e6:.0f} MB of weights, E={E} r={r}; median of {a.rounds} interleaved rounds x 3")
    for name, t in medians.items():
        print(f"{name:<28} {t * 1e3:8.1f} ms  {2 * nbytes / t / 1e9:5.1f} GB/s (read + write)")


if __name__ == "__main__":
    main()
