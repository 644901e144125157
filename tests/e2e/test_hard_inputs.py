"""Bad and unusual input: clear errors, failing passes, look-alike adapters, NaN/inf, graph
breaks, weight loading and weights changed after compilation. Nothing may be lost or wrong.

Small layers and ``inner="eager"`` throughout: what is under test is the rewrite, not Inductor.
"""

import ast
import dataclasses
import logging
import pathlib
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.utils import counters

import adafuse_compile
from adafuse_compile import AdafuseOptions
from adafuse_compile.models import add_lora_moe, load_adapters, save_adapters, tiny_llama
from adafuse_compile.models.layers import LoRAMoELinear
from adafuse_compile.models.styles import MoLAStyleLinear, StyledMLP, _seeded_base
from adafuse_compile.passes import GraphPass
from adafuse_compile.testing import FUSED_SITES, assert_equivalent, compile_and_capture, count_fused

PACKAGE = pathlib.Path(adafuse_compile.__file__).parent

# ------------------------------------------------------------------------------------ options

FIELDS = {f.name: type(getattr(AdafuseOptions(), f.name)) for f in dataclasses.fields(AdafuseOptions)}
WRONG_VALUES = {
    str: st.one_of(st.integers(), st.none(), st.booleans(), st.lists(st.text(max_size=3), max_size=2)),
    bool: st.one_of(st.integers(0, 1), st.none(), st.sampled_from(["yes", "True", 1.0])),
}


@given(data=st.data(), name=st.sampled_from(sorted(FIELDS)))
def test_ill_typed_option_names_the_option_and_its_type(data, name):
    value = data.draw(WRONG_VALUES[FIELDS[name]])
    with pytest.raises(ValueError, match=rf"option '{name}' must be {FIELDS[name].__name__}, got {type(value).__name__}"):
        AdafuseOptions.from_dict({name: value})


@given(key=st.text(min_size=1, max_size=12).filter(lambda k: k not in FIELDS))
def test_unknown_option_lists_every_valid_option_with_its_type(key):
    with pytest.raises(ValueError, match="unknown adafuse option") as info:
        AdafuseOptions.from_dict({"inner": "eager", key: True})
    message = str(info.value)
    assert repr(key) in message
    assert all(f"{name} ({tp.__name__})" in message for name, tp in FIELDS.items())


@pytest.mark.parametrize("name", [n for n, tp in FIELDS.items() if tp is str])
def test_option_value_outside_its_choices_names_the_choices(name):
    with pytest.raises(ValueError, match=rf"option '{name}' must be one of \("):
        AdafuseOptions.from_dict({name: "no-such-choice"})


# ------------------------------------------------------------------------- a pass that raises


class SabotagePass(GraphPass):
    """Runs after the real passes, breaks the graph half-way (every fused op now returns zeros),
    then raises: the manager must restore the graph as the real passes left it."""

    name = "sabotage"

    def __call__(self, gm, example_inputs=None):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in FUSED_SITES:
                node.target = lambda *args: torch.zeros(())
        raise RuntimeError("sabotaged on purpose")


@pytest.fixture
def sabotaged(monkeypatch):
    from adafuse_compile import backend

    real = backend.build_pass_manager

    def with_sabotage(opts, example_inputs=None):
        manager = real(opts, example_inputs)
        manager.passes.append(SabotagePass())
        return manager

    monkeypatch.setattr(backend, "build_pass_manager", with_sabotage)


def test_failing_pass_warns_with_its_cause_and_the_graph_before_it_is_compiled(sabotaged, caplog):
    model = StyledMLP("mola").eval()
    x = torch.randn(2, 3, 48)
    torch._dynamo.reset()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="adafuse_compile"):
        out = torch.compile(model, backend="adafuse", options={"inner": "eager"})(x)
        expected = model(x)
    torch._dynamo.reset()
    torch.testing.assert_close(out, expected)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "sabotage" in warning.getMessage()
    assert isinstance(warning.exc_info[1], RuntimeError) and "on purpose" in str(warning.exc_info[1])
    # What the real passes did survives: both sites were still fused before the failing pass.
    with torch.no_grad():
        _, (gm,) = compile_and_capture(model, x)
    assert count_fused(gm) == 2


def test_failing_pass_raises_through_the_backend_when_strict(sabotaged):
    torch._dynamo.reset()
    fast = torch.compile(StyledMLP("mola").eval(), backend="adafuse", options={"inner": "eager", "strict": True})
    with pytest.raises(Exception, match="sabotaged on purpose"), torch.no_grad():
        fast(torch.randn(2, 48))
    torch._dynamo.reset()


def test_failure_inside_one_site_is_reported_with_the_site(monkeypatch, caplog):
    from adafuse_compile.passes import fuse_mole

    real = fuse_mole.canonicalize

    def failing(gm, site, *args, **kwargs):
        if site.name == "fc2":
            raise RuntimeError("injected")
        return real(gm, site, *args, **kwargs)

    monkeypatch.setattr(fuse_mole, "canonicalize", failing)
    model = StyledMLP("mola").eval()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="adafuse_compile"):
        out, _ = compile_and_capture(model, torch.randn(3, 48))
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "injected" not in warnings  # the cause is in exc_info; the message must name the site
    assert "fc2" in warnings


# ------------------------------------------------------------------------- look-alike adapters


class ExpertLoop(nn.Module):
    """MoLA-like loop with knobs that make it differ from a LoRA-MoE, or stress its routing."""

    def __init__(self, in_f=24, out_f=20, E=4, r=3, k=2, bias_in_A=False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.base_layer = _seeded_base(in_f, out_f, gen)
        self.router = nn.Linear(in_f, E, bias=False)
        self.lora_A = nn.ModuleList(nn.Linear(in_f, r, bias=bias_in_A) for _ in range(E))
        self.lora_B = nn.ModuleList(nn.Linear(r, out_f, bias=False) for _ in range(E))
        with torch.no_grad():
            for lin in [self.router, *self.lora_A, *self.lora_B]:
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.3)
                if lin.bias is not None:
                    lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen))
        self.E, self.k = E, k

    def forward(self, x):
        y = self.base_layer(x)
        w, idx = torch.topk(torch.softmax(self.router(x), -1), self.k)
        w = w / w.sum(-1, keepdim=True)
        for e in range(self.E):
            y = y + (w * (idx == e)).sum(-1, keepdim=True) * self.lora_B[e](self.lora_A[e](x))
        return y


def _explain(model, *args):
    with torch.no_grad():
        return adafuse_compile.explain(model, *args)


def test_bias_in_A_is_left_with_a_reason():
    """``B (A x + a)`` adds ``g B a``: no term of the canonical form, so it must not be fused."""
    model = ExpertLoop(bias_in_A=True).eval()
    x = torch.randn(5, 24)
    (gm,) = assert_equivalent(model, x, reduction=30)
    assert count_fused(gm) == 0
    (site,) = _explain(model, x).sites
    assert site.status == "left" and "linear with a bias inside an adapter term" in site.reason


@pytest.mark.parametrize("ties", ["all-equal", "duplicate-experts"])
def test_top_k_with_ties_routes_exactly_as_eager(ties):
    """Tied router scores: the routing stays in the graph, so ties break as eager breaks them."""
    model = ExpertLoop().eval()
    with torch.no_grad():
        if ties == "all-equal":
            model.router.weight.zero_()  # every expert scores the same for every token
        else:
            model.router.weight[1] = model.router.weight[0]  # experts 0 and 1 tie on every token
            model.router.weight[3] = model.router.weight[2]
    x = torch.randn(6, 24)
    with torch.no_grad():
        out, (gm,) = compile_and_capture(model, x)
        expected = model(x)
    assert count_fused(gm) == 1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("E,k,T", [(1, 1, 5), (4, 4, 5), (4, 2, 0)], ids=["E=1", "k=E", "T=0"])
def test_degenerate_sizes_are_exact_or_left(E, k, T):
    model = ExpertLoop(E=E, k=k).eval()
    x = torch.randn(T, 24)
    with torch.no_grad():
        out, (gm,) = compile_and_capture(model, x)
        expected = model(x)
        (site,) = _explain(model, x).sites
    assert out.shape == expected.shape == (T, 20)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert count_fused(gm) == (site.status == "fused")
    if T:  # with tokens there is something to verify on: these must be fused
        assert (site.status, site.experts, site.k) == ("fused", E, k)
    else:
        assert site.status in ("fused", "left") and site.reason


# ------------------------------------------------------------------------------- NaN and inf

_COMPILED: dict = {}


def _compiled_style(style):
    """One compiled StyledMLP per style, reused by every example (values never recompile)."""
    if style not in _COMPILED:
        model = StyledMLP(style).eval()
        graphs = []

        def backend(gm, example_inputs):
            from adafuse_compile.backend import adafuse_backend, capture_rewrites

            with capture_rewrites() as rewrites:
                compiled = adafuse_backend(gm, example_inputs, options={"inner": "eager"})
            graphs.extend(rw.graph for rw in rewrites)
            return compiled

        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            fast = torch.compile(model, backend=backend, dynamic=False)
        _COMPILED[style] = (model, fast, graphs)
    return _COMPILED[style]


@settings(max_examples=15, suppress_health_check=[HealthCheck.too_slow])  # ~3 per style: values, not compiles
@given(style=st.sampled_from(["mola", "mixlora", "stacked", "xlora", "peft"]),  # loop, dispatch, gather, dense, static
       seed=st.integers(0, 2**16), specials=st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf")]),
                                                     min_size=1, max_size=4))
def test_nan_and_inf_inputs_give_what_eager_gives(style, seed, specials):
    model, fast, graphs = _compiled_style(style)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 48, generator=gen)
    flat = x.view(-1)
    for value, pos in zip(specials, torch.randint(0, flat.numel(), (len(specials),), generator=gen)):
        flat[pos] = value
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        out = fast(x)
        expected = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert len(graphs) == 1 and count_fused(graphs[0]) == 2  # static PEFT LoRA too: fused, not folded, by default


# ------------------------------------------------------------------------------- graph breaks


class BreakingSite(MoLAStyleLinear):
    """MoLA-style adapter with a graph break of kind ``mode`` around or inside it."""

    mode = "print"

    def forward(self, x):
        result = self.base_layer(x)
        if self.mode == "print":
            print("adapter input", tuple(x.shape))
        w, idx = self._topk(x)
        if self.mode == "item" and w.max().item() > 2.0:  # never true: weights are <= 1
            result = result * 2
        experts = sorted(set(idx.flatten().tolist())) if self.mode == "tolist" else range(self.expert_num)
        for e in experts:
            ew = ((idx == e) * w).sum(dim=-1, keepdim=True)
            if self.mode == "nonzero" and torch.nonzero(ew[..., 0]).shape[0] == 0:
                continue  # data-dependent shape: skip experts no token chose
            result = result + ew * self.lora_B[e](self.lora_A[e](x)) * self.scaling
        return result


class CleanThenBreaking(nn.Module):
    """A clean MoLA site, then one site per kind of break in ``modes``, chained without a loop
    (a break inside a loop would make Dynamo skip this whole frame)."""

    def __init__(self, modes):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fc1 = MoLAStyleLinear(_seeded_base(48, 40, gen), seed=0)
        self.modes = tuple(modes)
        for i, mode in enumerate(self.modes):
            setattr(self, mode, BreakingSite(_seeded_base(40, 40, gen), seed=i + 1))
            getattr(self, mode).mode = mode

    def forward(self, x):
        h = self.fc1(x)
        h = self.item(F.silu(h)) if hasattr(self, "item") else h
        h = self.nonzero(F.silu(h)) if hasattr(self, "nonzero") else h
        h = self.print(F.silu(h)) if hasattr(self, "print") else h
        return self.tolist(F.silu(h)) if hasattr(self, "tolist") else h


BREAK_REASONS = {"print": "print", "item": "item()", "tolist": "Data dependent", "nonzero": "nonzero"}


def test_graph_breaks_in_adapters_stay_correct_and_are_explained(capsys):
    """Printing, .item(), .tolist() and a data-dependent shape, each in its own adapter: the
    captured site is still fused, the broken ones run eagerly (correct), and explain reports
    each break with its cause and that adapter code behind a break is not rewritten."""
    model = CleanThenBreaking(sorted(BREAK_REASONS)).eval()
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        out, graphs = compile_and_capture(model, x)
        expected = model(x)
        report = adafuse_compile.explain(model, x, plain_torch_compile=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert sum(count_fused(gm) for gm in graphs) == 1
    assert [(s.path, s.status) for s in report.sites if s.status != "left"] == [("fc1", "fused")]
    assert report.graph_breaks >= len(BREAK_REASONS)
    for mode, reason in BREAK_REASONS.items():
        assert any(reason in r for r in report.break_reasons), mode
    assert "not rewritten" in str(report)
    assert "adapter input" in capsys.readouterr().out  # the print's side effect still happens


def test_explain_reports_a_skipped_frame():
    site = BreakingSite(_seeded_base(48, 24, torch.Generator().manual_seed(0)), seed=0)
    site.mode = "nonzero"
    report = _explain(site.eval(), torch.randn(5, 48))
    assert report.graph_breaks >= 1 or report.break_reasons


def test_explain_names_the_site_split_by_a_graph_break():
    """The adapter whose forward breaks (``.item()``) is named, with the break; the clean one is
    not, and neither is the model around them (no linear of its own)."""
    report = _explain(CleanThenBreaking(["item"]).eval(), torch.randn(2, 3, 48))
    assert [(s.path, s.status) for s in report.split] == [("item", "left")], str(report)
    assert "item()" in report.split[0].reason and "test_hard_inputs.py:272" in report.split[0].reason
    assert "left, split by a graph break: item" in str(report)


# ------------------------------------------------------------------------------ weight loading


def test_package_never_unpickles():
    """Adapter weights load through safetensors or torch.load(weights_only=True) only."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names):
                    offenders.append(f"{path.name}:{node.lineno} imports a pickle module")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    offenders.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
    assert not offenders


class _Payload:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(PWNED),))


PWNED = ""


def test_load_adapters_refuses_a_pickle_without_running_it(tmp_path):
    global PWNED
    PWNED = str(tmp_path / "pwned")
    model = add_lora_moe(tiny_llama("tiny", num_hidden_layers=1), targets=("q_proj",))
    path = tmp_path / "adapters.pt"
    with open(path, "wb") as f:
        pickle.dump({"payload": _Payload()}, f)
    with pytest.raises(Exception):
        load_adapters(model, path)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------ weights changed after compile


def test_adapter_weights_loaded_after_compile_are_used_by_the_next_call(tmp_path):
    """Fused sites read the live expert and router tensors: new weights, same graph."""
    targets = ("q_proj", "down_proj")
    source = add_lora_moe(tiny_llama("tiny", num_hidden_layers=1), targets=targets, seed=1)
    model = add_lora_moe(tiny_llama("tiny", num_hidden_layers=1), targets=targets, seed=2)
    save_adapters(source, tmp_path / "a.safetensors")
    ids = torch.randint(0, 512, (2, 5))
    torch._dynamo.reset()
    counters.clear()
    fast = torch.compile(model, backend="adafuse", options={"inner": "eager", "strict": True})
    with torch.no_grad():
        before = fast(ids).logits
        load_adapters(model, tmp_path / "a.safetensors")
        after = fast(ids).logits
        expected = source(ids).logits
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert not torch.allclose(before, after, atol=1e-4)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    assert graphs == 1


@pytest.mark.parametrize("change", ["copy_", "new Parameter", "router"])
def test_fused_site_follows_mutated_parameters(change):
    layer = LoRAMoELinear(nn.Linear(16, 12), experts=4, rank=3, top_k=2).eval()
    x = torch.randn(5, 16)
    torch._dynamo.reset()
    fast = torch.compile(layer, backend="adafuse", options={"inner": "eager", "strict": True})
    with torch.no_grad():
        before = fast(x)
        if change == "copy_":
            layer.lora_B.copy_(torch.randn_like(layer.lora_B))
        elif change == "new Parameter":
            layer.lora_A = nn.Parameter(torch.randn_like(layer.lora_A), requires_grad=False)
        else:
            layer.router.weight.mul_(-1)  # every token picks other experts
        after, expected = fast(x), layer(x)
    torch._dynamo.reset()
    assert not torch.allclose(before, after, atol=1e-4)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ["peft", "mola", "stacked"])
def test_weights_assigned_through_data_after_compile_are_used(style):
    """``p.data = t`` is how much loading code swaps weights (same Parameter, new storage)."""
    torch.manual_seed(0)
    model = StyledMLP(style).eval()
    x = torch.randn(4, 48)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="adafuse", options={"inner": "eager", "strict": True})
    with torch.no_grad():
        fast(x)
        for name, p in model.named_parameters():
            if "lora" in name:
                p.data = p.data * 3 + 0.1
        after, expected = fast(x), model(x)
    torch._dynamo.reset()
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
