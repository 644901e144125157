"""Dtypes and dynamic shapes on the Llama MoLE model: what real serving feeds the compiler."""

import pytest
import torch

from adafuse_compile.backend import adafuse_backend, capture_rewrites
from adafuse_compile.models import add_lora_moe, tiny_llama
from adafuse_compile.passes.graph_ops import routed_site
from adafuse_compile.testing import compile_and_capture, count_fused, tolerance


def _model(dtype=None):
    return add_lora_moe(tiny_llama("tiny", num_hidden_layers=1, dtype=dtype))


def _ids(batch, seq, seed=0):
    return torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _recording_backend(graphs, reports, **options):
    """The adafuse backend (inner eager) that keeps each rewritten graph and its site reports."""
    def backend(gm, example_inputs):
        with capture_rewrites() as rewrites:
            compiled = adafuse_backend(gm, example_inputs, options={"inner": "eager", **options})
        graphs.extend(rw.graph for rw in rewrites)
        reports.extend(rw.sites for rw in rewrites)
        return compiled

    return backend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])  # float32: tests/passes/test_fuse_mole.py
def test_low_precision_models_route_in_float32_and_stay_as_accurate_as_eager(dtype):
    """16-bit weights and activations, float32 routers (MixLoRA's router_dtype). The fused op
    rounds differently from eager's einsums, so both are measured against float64: adafuse may
    not be less accurate than eager by more than one tolerance of the dtype."""
    model = _model(dtype)
    ids = _ids(2, 9)
    with torch.no_grad():
        out, (gm,) = compile_and_capture(model, ids)
        eager = model(ids).logits.double()
        reference = _model().double()(ids).logits
    got = out.logits
    assert got.dtype == dtype and count_fused(gm) == 7
    # Routing on float32 scores: the site's router moved into its op with a float32 input and
    # weight (RouteIntoSitesPass), or a top-k left in the graph on float32 scores.
    topks = [n.args[0] for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.topk]
    routed = [n.args[3:5] for n in gm.graph.nodes if n.op == "call_function" and n.target is routed_site]
    assert len(topks) + len(routed) == 7
    assert all(t.meta["example_value"].dtype == torch.float32 for t in [*topks, *(a for r in routed for a in r)])
    mag = reference.abs().max().item()
    tol = tolerance(dtype, 256) * max(1.0, mag)
    eager_err = (eager - reference).abs().max().item()
    adafuse_err = (got.double() - reference).abs().max().item()
    assert adafuse_err <= eager_err + tol, (adafuse_err, eager_err, tol)
    assert (got.double() - eager).abs().max().item() <= 2 * eager_err + tol


def test_varying_batch_and_length_compile_twice_and_fuse_with_symbolic_shapes():
    """Static first, then one graph with symbolic batch and length serves every later size
    (sizes >= 2: Dynamo specializes 0 and 1). The passes fuse both graphs."""
    model = _model()
    graphs, reports = [], []
    torch._dynamo.reset()
    fast = torch.compile(model, backend=_recording_backend(graphs, reports))
    with torch.no_grad():
        for i, (batch, seq) in enumerate([(2, 5), (3, 7), (4, 9), (5, 6), (2, 17)]):
            ids = _ids(batch, seq, seed=i)
            torch.testing.assert_close(fast(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    assert len(graphs) == 2
    assert [count_fused(gm) for gm in graphs] == [7, 7]
    symbolic = [n for n in graphs[1].graph.nodes if n.op == "placeholder"
                and isinstance(n.meta.get("example_value"), torch.SymInt)]
    assert len(symbolic) >= 2  # batch and sequence length


def test_dynamic_true_is_correct_and_every_site_is_fused_or_left_with_the_reason():
    """dynamic=True also turns the LoRA scaling (a Python float) into a graph input; a site
    whose scale is not a constant is left (its reason names the scaling), never given a stale one."""
    model = _model()
    graphs, reports = [], []
    torch._dynamo.reset()
    fast = torch.compile(model, backend=_recording_backend(graphs, reports), dynamic=True)
    with torch.no_grad():
        for i, (batch, seq) in enumerate([(2, 5), (3, 7), (4, 9)]):
            ids = _ids(batch, seq, seed=i)
            torch.testing.assert_close(fast(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    assert len(graphs) == 1
    (sites,) = reports
    assert len(sites) == 7
    assert all(s.status == "fused" or (s.status == "left" and "scaling" in s.reason) for s in sites)
    assert count_fused(graphs[0]) == sum(s.status == "fused" for s in sites)
