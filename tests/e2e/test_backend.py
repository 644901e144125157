"""The adafuse backend: registration, options, inner compilers, and pass-failure fallback."""

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

import adafuse_compile
from adafuse_compile import AdafuseOptions
from adafuse_compile.backend import adafuse_backend
from adafuse_compile.passes import GraphPass, PassManager


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(12, 7)

    def forward(self, x):
        return torch.relu(self.lin(x)) * 2


def test_backend_name_works_without_importing_the_package():
    """The torch_dynamo_backends entry point makes backend="adafuse" work after pip install."""
    code = textwrap.dedent(
        """
        import sys, torch
        m = torch.nn.Linear(4, 3)
        f = torch.compile(m, backend="adafuse", options={"inner": "eager"})
        x = torch.randn(2, 4)
        torch.testing.assert_close(f(x), m(x))
        assert "adafuse_compile" in sys.modules  # loaded lazily by Dynamo through the entry point
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_import_then_compile_does_not_trip_duplicate_registration():
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    assert "adafuse" in list_backends()
    assert lookup_backend("adafuse") is adafuse_backend
    adafuse_compile._register_backend_without_entry_point()  # idempotent


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_inner_compilers_give_eager_results(inner):
    torch._dynamo.reset()
    m = TinyNet()
    x = torch.randn(5, 12)
    f = torch.compile(m, backend="adafuse", options={"inner": inner})
    torch.testing.assert_close(f(x), m(x))


@pytest.mark.parametrize(
    "options,message",
    [
        ({"inner": "tvm"}, "inner.*must be one of"),
        ({"inenr": "eager"}, r"unknown adafuse option.*inenr.*valid options: inner .*strict"),
        ({"strict": "yes"}, "strict.*must be bool"),
        (["inner"], "must be a dict"),
    ],
)
def test_bad_options_raise_value_error_naming_valid_keys(options, message):
    with pytest.raises(ValueError, match=message):
        AdafuseOptions.from_dict(options)


def test_bad_options_surface_through_torch_compile():
    torch._dynamo.reset()
    f = torch.compile(TinyNet(), backend="adafuse", options={"bogus": 1})
    with pytest.raises(Exception, match="unknown adafuse option"):
        f(torch.randn(2, 12))


class ExplodingPass(GraphPass):
    """Half-rewrites the graph, then fails: the manager must restore the graph."""

    name = "exploding"

    def __call__(self, gm, example_inputs=None):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.relu:
                node.target = torch.sigmoid
        raise RuntimeError("boom")


def _traced():
    return torch.fx.symbolic_trace(TinyNet())


def test_failing_pass_warns_and_leaves_graph_unchanged(caplog):
    gm = _traced()
    before = str(gm.graph)
    x = torch.randn(3, 12)
    expected = gm(x)
    with caplog.at_level(logging.WARNING, logger="adafuse_compile"):
        PassManager([ExplodingPass()])(gm)
    assert str(gm.graph) == before
    torch.testing.assert_close(gm(x), expected)
    assert any("exploding" in r.getMessage() and r.exc_info for r in caplog.records)


def test_failing_pass_raises_when_strict():
    with pytest.raises(RuntimeError, match="boom"):
        PassManager([ExplodingPass()], strict=True)(_traced())


def test_inductor_is_the_default_inner_compiler():
    torch._dynamo.reset()
    m = TinyNet()
    x = torch.randn(5, 12)
    f = torch.compile(m, backend="adafuse")
    torch.testing.assert_close(f(x), m(x))


@pytest.mark.slow
def test_mode_is_passed_to_inductor():
    torch._dynamo.reset()
    m = TinyNet()
    x = torch.randn(5, 12)
    f = torch.compile(m, backend="adafuse", mode="max-autotune-no-cudagraphs")
    torch.testing.assert_close(f(x), m(x))


def test_compile_takes_a_mode_and_options_together(monkeypatch):
    """torch.compile refuses mode= with options=; adafuse_compile.compile hands the mode to the
    backend itself, so CUDA graphs (mode="reduce-overhead") combine with any strategy."""
    torch._dynamo.reset()
    seen = []
    monkeypatch.setattr("torch._inductor.list_mode_options", lambda mode=None, dynamic=None: seen.append(mode) or {})
    m = TinyNet()
    x = torch.randn(5, 12)
    f = adafuse_compile.compile(m, mode="max-autotune-no-cudagraphs", strict=True)
    torch.testing.assert_close(f(x), m(x))
    assert seen == ["max-autotune-no-cudagraphs"]


def _record_compile_fx_patches(monkeypatch) -> list:
    """The ``config_patches`` of every ``compile_fx`` call from now on (the call still runs)."""
    import torch._inductor.compile_fx as inductor

    patches = []
    real = inductor.compile_fx
    monkeypatch.setattr(inductor, "compile_fx", lambda *a, **kw: patches.append(kw.get("config_patches")) or real(*a, **kw))
    return patches


def test_cpp_wrapper_option_compiles_fused_sites_with_inductors_cpp_wrapper(caplog, monkeypatch):
    """``cpp_wrapper=True``: the rewritten graph goes through Inductor's C++ wrapper (the fused
    ops called from C++), with eager's output and no fallback to the Python wrapper."""
    from adafuse_compile.models.styles import StyledMLP

    patches = _record_compile_fx_patches(monkeypatch)

    torch.manual_seed(0)
    model = StyledMLP("mola").eval()
    x = torch.randn(2, 3, 48)
    torch._dynamo.reset()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="adafuse_compile"), \
            torch._inductor.config.patch(fx_graph_cache=False):
        with adafuse_compile.backend.capture_rewrites() as rewrites:
            out = torch.compile(model, backend="adafuse", options={"cpp_wrapper": True})(x)
        expected = model(x)
    torch._dynamo.reset()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert any(r.status == "fused" for rw in rewrites for r in rw.sites)
    assert any(p and p.get("cpp_wrapper") for p in patches)  # (compile_fx then calls itself unpatched)
    assert not [r for r in caplog.records if "C++ wrapper failed" in r.getMessage()]


def test_dynamo_graphs_compile_without_inductors_per_call_input_checks():
    """Inductor's size and stride checks of every input at every call are left out of graphs
    Dynamo made (its guards check the same before the call; 0.42 ms of a 3.8 ms graph call on the
    small MoLA-style model). The generated code has none, and a weight whose strides change
    through ``.data`` is seen by Dynamo's guards: the graph is compiled again (the values alone
    would not show it: the fused op reads any strides)."""
    from torch._inductor.utils import run_and_get_code

    from adafuse_compile.models.styles import StyledMLP

    torch.manual_seed(0)
    model = StyledMLP("mola").eval()
    x = torch.randn(2, 3, 48)
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), \
            adafuse_compile.backend.capture_rewrites() as rewrites:
        f = torch.compile(model, backend="adafuse")
        out, codes = run_and_get_code(f, x)
        assert any(r.status == "fused" for rw in rewrites for r in rw.sites)
        assert codes and not any("assert_size_stride(arg" in code for code in codes)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
        f(x)
        assert len(rewrites) == 1
        for weight in (model.fc1.lora_A[1].weight, model.fc2.base_layer.weight):
            weight.data = weight.data.t().contiguous().t()  # the same values, column-major
            torch.testing.assert_close(f(x), model(x), rtol=1e-5, atol=1e-5)
        assert len(rewrites) == 3  # one compile per change
    torch._dynamo.reset()


@pytest.mark.parametrize("trees", [True, False])
def test_cuda_graphs_without_trees_keep_inductors_input_checks(monkeypatch, trees):
    """Under CUDA graphs without trees the same Inductor setting also checks that a static input
    has not moved, so the checks stay there (trees check that themselves)."""
    from adafuse_compile.backend import backend_with_mode
    from adafuse_compile.models.styles import StyledMLP

    patches = _record_compile_fx_patches(monkeypatch)
    model = StyledMLP("mola").eval()
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch({"triton.cudagraph_trees": trees, "fx_graph_cache": False}):
        torch.compile(model, backend=backend_with_mode("reduce-overhead"))(torch.randn(2, 3, 48))
    torch._dynamo.reset()
    ours = [p for p in patches if p and p.get("triton.cudagraphs")]
    assert ours and all(("size_asserts" in p) == trees for p in ours)


def _static_input_idxs(fn, *args, **compile_kwargs) -> list[list[int]]:
    """The static input indices Inductor compiled each graph with (its CUDA graphs copy every
    other input into their own buffers at each replay)."""
    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("static input idxs compile_fx_inner:"):
                seen.append(eval(msg.split(":", 1)[1]))

    handler = Catch()
    logger = logging.getLogger("torch._inductor")
    logger.addHandler(handler)
    torch._logging.set_logs(cudagraph_static_inputs=True)
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(fx_graph_cache=False), torch.inference_mode():
            torch.compile(fn, **compile_kwargs)(*args)
    finally:
        torch._logging.set_logs()
        logger.removeHandler(handler)
        torch._dynamo.reset()
    return seen


@pytest.mark.parametrize("freeze", [False, True])
def test_inductor_sees_parameters_and_derived_inputs_as_static(freeze):
    """The rewritten graph tells AOTAutograd which inputs are parameters as Dynamo's own graph
    does, and the inputs the passes add (stacked experts under freeze) are static too: every input
    but the token ids. Without it Inductor saw none as static, and on an H200 each CUDA-graph
    replay copied every parameter (1.2 ms of a 2.5 ms decode step)."""
    from adafuse_compile.backend import capture_rewrites
    from adafuse_compile.bench.cli import add_styled_adapters
    from adafuse_compile.models import tiny_llama

    model = add_styled_adapters(tiny_llama("tiny", seed=0, num_hidden_layers=1), "mola").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 1))
    with capture_rewrites() as rewrites:
        seen = _static_input_idxs(lambda i: model(i, use_cache=False).logits, ids, backend="adafuse",
                                  options={"freeze": freeze})
    (rw,) = rewrites
    assert rw.counts() == {"fused": 7}
    assert bool(rw.derived_inputs) == freeze
    inputs = len(rw.graph.graph.find_nodes(op="placeholder"))
    assert seen == [list(range(1, inputs))]  # input 0: the token ids


def test_cuda_compile_failure_retries_with_opaque_kernels(monkeypatch, caplog):
    """On CUDA the fused sites' Triton kernels are compiled into Inductor's code; if that fails,
    the backend compiles the rewritten graph again with the opaque op (still fused), not the
    unrewritten graph."""
    import adafuse_compile.backend as backend
    from adafuse_compile.kernels.lora_moe_linear import cuda_op

    calls = []
    real = backend.compile_rewritten

    def flaky(rw, example_inputs, opts, mode=None):
        calls.append(cuda_op())
        if len(calls) == 1:
            raise RuntimeError("Inductor could not compile the user-defined Triton kernels")
        return real(rw, example_inputs, opts, mode)

    monkeypatch.setattr(backend, "compile_rewritten", flaky)
    monkeypatch.setattr(backend, "_on_cuda", lambda example_inputs: True)
    net = TinyNet()
    x = torch.randn(3, 12)
    with caplog.at_level(logging.WARNING, logger="adafuse_compile"):
        out = adafuse_backend(torch.fx.symbolic_trace(net), [x], options={"inner": "eager"})(x)
    torch.testing.assert_close(out, net(x))
    assert calls == [torch.ops.adafuse.lora_moe_linear_cuda.default, torch.ops.adafuse.lora_moe_linear.default]
    assert "calling them as opaque ops" in caplog.text


@pytest.mark.parametrize("strategy", ["merge", "auto"])
def test_merge_strategies_fuse_under_cuda_graphs_and_say_why(strategy, monkeypatch, caplog):
    """A strategy that merges is not captured by CUDA graphs (a host-side choice per step, merged
    copies that outlive a replay): on CUDA with a CUDA-graph mode the backend fuses every site
    instead, with a warning; without the mode the groups stay switchable."""
    import adafuse_compile.backend as backend
    from adafuse_compile.backend import capture_rewrites
    from adafuse_compile.models import add_pregated_lora_moe, tiny_llama

    monkeypatch.setattr(backend, "_on_cuda", lambda example_inputs: True)
    model = add_pregated_lora_moe(tiny_llama("tiny", num_hidden_layers=1), seed=0).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 2))
    options = {"inner": "eager", "strategy": strategy, "freeze": True}
    groups = {}
    for mode in ("reduce-overhead", None):
        torch._dynamo.reset()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="adafuse_compile"), capture_rewrites() as rewrites, \
                torch.no_grad():
            out = torch.compile(model, backend=backend.backend_with_mode(mode), options=options)(ids).logits
            torch.testing.assert_close(out, model(ids).logits, atol=1e-4, rtol=1e-4)
        groups[mode] = [g.strategy for rw in rewrites for g in rw.groups]
        assert ("not captured by CUDA graphs" in caplog.text) == (mode is not None)
    torch._dynamo.reset()
    assert groups == {"reduce-overhead": ["fused"], None: [strategy]}


def test_dynamos_restart_requests_are_not_taken_for_failures(caplog):
    """Under dynamic=True Inductor asks Dynamo to trace again with the float scalings made tensors
    (TensorifyScalarRestartAnalysis, raised through the backend). The backend lets it through:
    caught, it was logged as a failed rewrite and the graph compiled unrewritten. After the
    restart each site left says why (here: the scale is read from a tensor)."""
    from adafuse_compile.backend import capture_rewrites
    from adafuse_compile.models import add_lora_moe, tiny_llama

    torch._dynamo.reset()
    model = add_lora_moe(tiny_llama("tiny", seed=0, num_hidden_layers=1), experts=4, top_k=2, rank=4).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 3))
    with caplog.at_level(logging.WARNING, logger="adafuse_compile"), capture_rewrites() as rewrites, \
            torch.inference_mode():
        out = torch.compile(model, backend="adafuse", dynamic=True)(ids, use_cache=False).logits
        torch.testing.assert_close(out, model(ids, use_cache=False).logits, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()
    assert "rewriting failed" not in caplog.text
    assert rewrites and all(rw.error is None for rw in rewrites)
    sites = [s for rw in rewrites for s in rw.sites]
    assert len(sites) == 7 and all(s.reason for s in sites if s.status == "left")
