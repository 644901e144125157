"""FuseMoLEPass: sites found, verified and fused; numerics against float64; ops left in the graph."""

import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import adafuse_compile
from adafuse_compile.models import add_lora_moe, tiny_llama
from torch.fx.passes.shape_prop import ShapeProp

from adafuse_compile.models.layers import LoRAMoELinear
from adafuse_compile.passes.graph_ops import routed_site
from adafuse_compile.testing import (FUSED_SITES, assert_equivalent, assert_rewrite, check_pass, compile_and_capture, count_calls,
                                     count_fused, mole_configs)

# Ops that make up an unfused adapter: none may survive at a fused site.
ADAPTER_OPS = (torch.functional.einsum, torch.einsum, torch.bmm, operator.getitem, torch.Tensor.index_add_)


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


@settings(max_examples=20)  # each example compiles: ~0.3 s
@given(cfg=mole_configs(), seed=st.integers(0, 999))
def test_reference_layer_is_fused_and_matches_float64(cfg, seed):
    torch.manual_seed(seed)
    layer = LoRAMoELinear(torch.nn.Linear(cfg["in_f"], cfg["out_f"]), experts=cfg["experts"],
                          rank=cfg["rank"], top_k=cfg["top_k"], gate=cfg["gate"],
                          shared_A=cfg["shared_A"], seed=seed).eval()
    x = torch.randn(*cfg["tokens"], cfg["in_f"])
    (rw,) = assert_rewrite(layer, x, reduction=cfg["in_f"] + cfg["top_k"] * cfg["rank"],
                           before=[torch.functional.einsum], after=[FUSED_SITES])
    gm = rw.graph
    assert count_fused(gm) == 1
    assert count_calls(gm, torch.functional.einsum, torch.einsum) == 0
    # The gather of experts by index is gone; the router's own topk/softmax stays.
    assert not any(n.op == "call_function" and n.target is operator.getitem and
                   n.args[0].op == "placeholder" for n in gm.graph.nodes)


class MaskedLoop(torch.nn.Module):
    """MoLA-like: per-expert Linear pairs in ModuleLists, Python loop, gate weight by mask."""

    def __init__(self, in_f=24, out_f=20, E=4, r=3, k=2):
        super().__init__()
        self.base_layer = torch.nn.Linear(in_f, out_f)
        self.router = torch.nn.Linear(in_f, E, bias=False)
        self.lora_A = torch.nn.ModuleList(torch.nn.Linear(in_f, r, bias=False) for _ in range(E))
        self.lora_B = torch.nn.ModuleList(torch.nn.Linear(r, out_f, bias=False) for _ in range(E))
        for b in self.lora_B:
            torch.nn.init.normal_(b.weight, std=0.2)
        self.E, self.k = E, k

    def forward(self, x):
        y = self.base_layer(x)
        w, idx = torch.topk(torch.softmax(self.router(x), -1), self.k)
        w = w / w.sum(-1, keepdim=True)
        for e in range(self.E):
            we = (w * (idx == e)).sum(-1, keepdim=True)
            y = y + we * self.lora_B[e](self.lora_A[e](x)) * 2.0
        return y


def test_per_expert_loop_is_fused_into_one_op():
    torch.manual_seed(0)
    m = MaskedLoop().eval()
    (gm,) = assert_equivalent(m, torch.randn(6, 24), reduction=30)
    assert count_fused(gm) == 1
    # The 2*E expert linears are gone; the base is inside the op, the router too on CPU
    # (RouteIntoSitesPass) or left as the one linear.
    assert count_calls(gm, torch._C._nn.linear) + count_calls(gm, routed_site) == 1


class NonlinearBetween(MaskedLoop):
    """Looks like MoLE but has a nonlinearity between A and B: not a LoRA, must be left."""

    def forward(self, x):
        y = self.base_layer(x)
        w, idx = torch.topk(torch.softmax(self.router(x), -1), self.k)
        for e in range(self.E):
            we = (w * (idx == e)).sum(-1, keepdim=True)
            y = y + we * self.lora_B[e](torch.relu(self.lora_A[e](x)))
        return y


class RouterOnOtherInput(MaskedLoop):
    """The router reads a different tensor than the experts: not a site of this linear."""

    def forward(self, x, h):
        y = self.base_layer(x)
        w, idx = torch.topk(torch.softmax(self.router(h), -1), self.k)
        for e in range(self.E):
            we = (w * (idx == e)).sum(-1, keepdim=True)
            y = y + we * self.lora_B[e](self.lora_A[e](x))
        return y


@pytest.mark.parametrize(
    "model,inputs,reason",
    [
        (NonlinearBetween, (torch.randn(5, 24),), "relu of an input-dependent value"),
        (RouterOnOtherInput, (torch.randn(5, 24), torch.randn(5, 24)), "computed from l_h_"),
    ],
    ids=["nonlinearity-between-A-and-B", "router-on-other-input"],
)
def test_lookalikes_are_left_unchanged_with_a_reason(model, inputs, reason):
    torch.manual_seed(0)
    m = model().eval()
    (gm,) = assert_equivalent(m, *inputs, reduction=30)
    assert count_fused(gm) == 0
    with torch.no_grad():
        report = adafuse_compile.explain(m, *inputs)
    assert [s.status for s in report.sites] == ["left"]
    assert reason in report.sites[0].reason


def test_training_graphs_are_left_unrewritten():
    """No autograd formula for the fused op: with gradients required, sites are left (and say so)."""
    layer = LoRAMoELinear(torch.nn.Linear(16, 12), experts=4, rank=3, top_k=2)
    x = torch.randn(3, 16)
    out, (gm,) = compile_and_capture(layer, x)
    assert count_fused(gm) == 0
    out.sum().backward()
    eager_grad = torch.autograd.grad(layer(x).sum(), layer.lora_A)[0]
    torch.testing.assert_close(layer.lora_A.grad, eager_grad)
    report = adafuse_compile.explain(layer, x)
    assert report.sites[0].status == "left" and "gradients are required" in report.sites[0].reason


def test_nan_inputs_give_what_eager_gives():
    layer = LoRAMoELinear(torch.nn.Linear(16, 12), experts=4, rank=3, top_k=2).eval()
    x = torch.randn(4, 16)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    with torch.no_grad():
        out, (gm,) = compile_and_capture(layer, x)
        expected = layer(x)
    assert count_fused(gm) == 1
    torch.testing.assert_close(out, expected, equal_nan=True)


def test_fuse_option_off_leaves_the_graph():
    layer = LoRAMoELinear(torch.nn.Linear(16, 12), experts=4, rank=3, top_k=2).eval()
    with torch.no_grad():
        _, (gm,) = compile_and_capture(layer, torch.randn(3, 16), options={"fuse": False})
    assert count_fused(gm) == 0
    assert count_calls(gm, torch.functional.einsum) == 2


def test_tiny_llama_every_site_fused_and_logits_match():
    model = add_lora_moe(tiny_llama("tiny"))
    ids = torch.randint(0, 500, (2, 7))
    (gm,) = assert_equivalent(model, ids, reduction=1024)
    assert count_fused(gm) == 14
    with torch.no_grad():
        report = adafuse_compile.explain(model, ids)
    assert report.count("fused") == 14 and report.graph_breaks == 0
    assert all(s.experts == 8 and s.k == 2 and s.rank == 8 for s in report.sites)
    assert "model.layers.1.mlp.down_proj" in str(report)


@pytest.mark.slow
def test_tiny_llama_under_inductor_matches_eager():
    model = add_lora_moe(tiny_llama("tiny"))
    ids = torch.randint(0, 500, (1, 9))
    with torch.inference_mode():
        expected = model(ids).logits
        torch._dynamo.reset()
        out = torch.compile(model, backend="adafuse")(ids).logits
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_passes_apply_to_a_symbolic_trace_graph():
    """Passes are usable on any GraphModule: parameters as get_attr nodes, no example inputs."""
    m = MaskedLoop().eval()
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(5, 24)
    expected = gm(x)
    ShapeProp(gm).propagate(x)  # symbolic_trace records no shapes; the probes need them
    adafuse_compile.passes.NormalizeLinearsPass()(gm)  # nn.Linear modules -> F.linear
    pass_ = adafuse_compile.passes.FuseMoLEPass()
    rewritten = check_pass(pass_, gm, x, reduction=30)
    assert [r.status for r in pass_.reports] == ["fused"]
    assert count_fused(rewritten) == 1
    torch.testing.assert_close(rewritten(x), expected, rtol=1e-5, atol=1e-5)


# What each project's code shape becomes (adafuse_compile.models.styles). MixLoRA's dispatch
# breaks Dynamo's graph inside the loop, so Dynamo runs that forward eagerly: nothing to fuse.
EXPECTED_GATE = {"mola": "softmax_topk", "stacked": "topk_softmax", "hydralora": "dense", "xlora": "dense",
                 "loramoe": "dense", "peft": "static"}


@pytest.mark.parametrize("style", sorted(EXPECTED_GATE))
def test_every_project_style_is_fused_and_matches_float64(style):
    from adafuse_compile.models.styles import StyledMLP

    torch.manual_seed(0)
    model = StyledMLP(style).eval()
    x = torch.randn(2, 3, 48)
    (gm,) = assert_equivalent(model, x, reduction=64)
    # One fused op per site; only the routers remain, as linears or inside the op (a static
    # LoRA has none).
    assert count_fused(gm) == 2
    assert count_calls(gm, torch._C._nn.linear, F.linear, routed_site) == (0 if style == "peft" else 2)
    with torch.no_grad():
        report = adafuse_compile.explain(model, x)
    assert [(s.path, s.status, s.gate) for s in report.sites] == [
        ("fc1", "fused", EXPECTED_GATE[style]), ("fc2", "fused", EXPECTED_GATE[style])]


def test_mixlora_dispatch_under_plain_torch_compile_is_left_to_eager_and_stays_correct():
    from adafuse_compile.models.styles import StyledMLP

    model = StyledMLP("mixlora").eval()
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        out, graphs = compile_and_capture(model, x)
        report = adafuse_compile.explain(model, x, plain_torch_compile=True)
        torch.testing.assert_close(out, model(x))
        compiled_report = adafuse_compile.explain(model, x)  # what adafuse_compile.compile does
    assert all(count_fused(gm) == 0 for gm in graphs)
    assert report.graph_breaks >= 1 and report.count("fused") == 0
    assert "adafuse_compile.compile()" in str(report)  # says why, and what to do
    assert compiled_report.graph_breaks == 0 and compiled_report.count("fused") == 2


def test_real_peft_lora_model_is_fused_and_matches():
    peft = pytest.importorskip("peft")  # a test dependency (pyproject [test]); skipped only outside it
    model = tiny_llama("tiny")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.1,
                             init_lora_weights=False)  # non-zero B, so the adapters matter
    model = peft.get_peft_model(model, config).eval()
    ids = torch.randint(0, 500, (2, 6))
    (gm,) = assert_equivalent(model, ids, reduction=1024)
    assert count_fused(gm) == 14  # read at every call: hot-swapped adapters are seen
    (gm,) = assert_equivalent(model, ids, reduction=1024, options={"freeze": True})
    assert count_fused(gm) == 0  # all folded into the base weights
    with torch.no_grad():
        report = adafuse_compile.explain(model, ids, options={"freeze": True})
    assert report.count("folded") == 14 and {s.gate for s in report.sites} == {"static"}


@settings(max_examples=15)  # each example compiles: ~2 s
@given(style=st.sampled_from(sorted(EXPECTED_GATE)), in_f=st.integers(5, 40), hidden=st.integers(3, 40),
       E=st.integers(1, 6), r=st.integers(1, 8), k_frac=st.floats(0, 1), T=st.integers(1, 6))
def test_styles_with_random_configs_are_fused_and_exact(style, in_f, hidden, E, r, k_frac, T):
    from adafuse_compile.models.styles import StyledMLP

    k = 1 + int(k_frac * (E - 1))
    torch.manual_seed(E * 100 + r)
    model = StyledMLP(style, in_f=in_f, hidden=hidden, out_f=7, experts=E, rank=r, top_k=k).eval()
    (gm,) = assert_equivalent(model, torch.randn(T, in_f), reduction=in_f + hidden)
    assert count_fused(gm) == 2


def test_bfloat16_model_with_float32_routing():
    """MixLoRA-style router_dtype: routing nodes stay as the model wrote them (float32)."""
    layer = LoRAMoELinear(torch.nn.Linear(32, 24), experts=6, rank=4, top_k=2).to(torch.bfloat16).eval()
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        out, (gm,) = compile_and_capture(layer, x)
        expected = layer(x)
    assert count_fused(gm) == 1
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=1.6e-2, atol=1.6e-2)


def test_mixlora_dispatch_is_fused_by_adafuse_compile():
    """adafuse_compile.compile captures nonzero-based dispatch in one graph; the fused graph has
    no nonzero/where, index_add_ or size asserts left (Inductor compiles it)."""
    from adafuse_compile.models.styles import StyledMLP

    torch.manual_seed(0)
    model = StyledMLP("mixlora").eval()
    x = torch.randn(2, 3, 48)
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        out, (gm,) = compile_and_capture(model, x)
        torch.testing.assert_close(out, model(x))
        report = adafuse_compile.explain(model, x)
    assert count_fused(gm) == 2
    assert count_calls(gm, torch.where, "index_add_", torch.ops.aten._assert_scalar.default) == 0
    assert [s.status for s in report.sites] == ["fused", "fused"]
    assert not torch._dynamo.config.capture_dynamic_output_shape_ops
    with torch.no_grad():
        fast = adafuse_compile.compile(model, inner="eager")
        torch.testing.assert_close(fast(x), model(x))
    assert not torch._dynamo.config.capture_dynamic_output_shape_ops  # scoped, not global


def _capturing_backend(graphs, **options):
    """The adafuse backend (inner eager) that keeps each rewritten graph."""
    from adafuse_compile.backend import adafuse_backend, capture_rewrites

    def backend(gm, example_inputs):
        with capture_rewrites() as rewrites:
            compiled = adafuse_backend(gm, example_inputs, options={"inner": "eager", **options})
        graphs.extend(rw.graph for rw in rewrites)
        return compiled

    return backend


def test_recompile_with_symbolic_token_count_still_fuses():
    """A second token count makes Dynamo recompile with symbolic sizes: probes use this call's."""
    from adafuse_compile.models.styles import StyledMLP

    model = StyledMLP("mola").eval()
    graphs = []
    torch._dynamo.reset()
    fast = torch.compile(model, backend=_capturing_backend(graphs))
    with torch.no_grad():
        for T in (3, 7, 11):
            x = torch.randn(2, T, 48)
            torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    assert len(graphs) == 2  # static, then dynamic: no recompile for T=11
    assert all(count_fused(gm) == 2 for gm in graphs)
    sizes = [n for n in graphs[1].graph.nodes if n.op == "placeholder"
             and isinstance(n.meta.get("example_value"), torch.SymInt)]
    assert sizes, "the second graph should have symbolic sizes"


def test_dynamic_true_float_scale_is_left_with_a_reason():
    """dynamic=True passes Python floats (the LoRA scaling) as inputs: never baked into a rewrite."""
    layer = LoRAMoELinear(torch.nn.Linear(16, 12), experts=4, rank=3, top_k=2).eval()
    graphs = []
    torch._dynamo.reset()
    x = torch.randn(3, 16)
    with torch.no_grad():
        out = torch.compile(layer, backend=_capturing_backend(graphs), dynamic=True)(x)
        torch.testing.assert_close(out, layer(x))
    torch._dynamo.reset()
    assert count_fused(graphs[0]) == 0


@pytest.mark.parametrize("gate", ["softmax_topk", "topk_softmax", "dense", "top_p"])
def test_explain_names_the_gate_variant(gate):
    layer = LoRAMoELinear(torch.nn.Linear(20, 12), experts=5, rank=3, top_k=3, gate=gate).eval()
    with torch.no_grad():
        report = adafuse_compile.explain(layer, torch.randn(4, 20))
    (site,) = report.sites
    assert (site.status, site.gate, site.experts, site.k, site.rank) == (
        "fused", gate, 5, 5 if gate == "dense" else 3, 3)
