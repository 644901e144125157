"""The adafuse passes by hand, on an FX GraphModule, without the backend.

Two MoLE sites written the way MoLA writes them (per-expert ``nn.Linear`` pairs, a Python loop
over experts, the gate applied by mask) with SiLU between. The model is traced to a GraphModule,
either by ``torch.fx.symbolic_trace`` (parameters are ``get_attr`` nodes; shapes come from
``ShapeProp``, since the passes probe each site on inputs of the right shape) or by Dynamo (the
graph a ``torch.compile`` backend receives, parameters as inputs). The passes then run by hand:
the loop over experts becomes one fused op per site, and the outputs stay the same.

    python examples/passes_on_fx.py [--style mola|stacked|xlora] [--dynamo]
"""

from __future__ import annotations

import argparse

import torch
from torch.fx.passes.shape_prop import ShapeProp

from adafuse_compile.models.styles import StyledMLP
from adafuse_compile.passes import FuseMoLEPass, NormalizeLinearsPass, PassManager


def symbolic_graph(model, x):
    """``symbolic_trace``, plus the shapes the passes' probes need; no example inputs."""
    gm = torch.fx.symbolic_trace(model)
    ShapeProp(gm).propagate(x)
    return gm, None


def dynamo_graph(model, x):
    """The graph and example inputs Dynamo gives a backend (what ``backend="adafuse"`` sees)."""
    captured = []

    def grab(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=grab, fullgraph=True)(x)
    torch._dynamo.reset()
    return captured[0]


def main() -> None:
    ap = argparse.ArgumentParser(description="apply the adafuse passes to an FX GraphModule by hand")
    ap.add_argument("--style", default="mola", choices=["mola", "stacked", "xlora"],
                    help="how the adapters are written (models.styles)")
    ap.add_argument("--dynamo", action="store_true", help="trace with Dynamo instead of symbolic_trace")
    args = ap.parse_args()

    model = StyledMLP(args.style, experts=4, rank=4, top_k=2).eval()
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # sites whose parameters need gradients are left (no fused backward)
        gm, example_inputs = (dynamo_graph if args.dynamo else symbolic_graph)(model, x)
        expected = gm(*example_inputs) if example_inputs else gm(x)
        nodes_before = len(gm.graph.nodes)
        print(f"--- {args.style}-style MLP traced by {'Dynamo' if args.dynamo else 'symbolic_trace'}: "
              f"{nodes_before} nodes ---")
        print(gm.code)

        fuse = FuseMoLEPass(lowering="op")  # one torch.ops.adafuse.lora_moe_linear call per site
        PassManager([NormalizeLinearsPass(), fuse], strict=True)(gm, example_inputs)
        print(f"--- after NormalizeLinearsPass and FuseMoLEPass: {len(gm.graph.nodes)} nodes ---")
        print(gm.code)
        for r in fuse.reports:
            print(f"site {r.path}: {r.status} (E={r.experts}, k={r.k}, r={r.rank}, gate={r.gate}): {r.reason}")

        # The rewritten graph reads the parameters at every call (MoLA's per-expert matrices
        # are stacked in the graph), so it takes the same inputs as before.
        got = gm(*example_inputs) if example_inputs else gm(x)
        got, expected = (t[0] if isinstance(t, (tuple, list)) else t for t in (got, expected))
        diff = (got - expected).abs().max().item()
    print(f"max |output diff| after the passes: {diff:.1e}")
    if not diff < 1e-4:
        raise SystemExit(f"rewritten graph differs from the traced one by {diff}")


if __name__ == "__main__":
    main()
