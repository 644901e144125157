"""adafuse on tiny models built with the real third-party MoLE packages (tests/e2e/real_packages.py).

MoE-PEFT 2.0.2 (MoLA, LoRAMoE, MixLoRA top-k and top-p), eulerforge 0.1.0 (MixtureLoRALinear)
and mixlora 0.2.3 (TUDB-Labs). For each: the compiled model gives eager's output; ``explain``
reports what is fused (MoLA and LoRAMoE per linear, MixLoRA per MLP block by token dispatch,
mixlora's attention LoRA as static sites); the target, every adapter site fused or folded with no
graph break, is asserted for every package; ``explain`` reports exactly the sites
``adafuse_compile.compile`` rewrites. eulerforge skips empty experts with ``if not mask.any():
continue``, a branch on data: it is compiled branch-free (:mod:`adafuse_compile.branches`).

The packages are installed with ``pip install --no-deps`` (see the Makefile); a test of a
package that is not installed is skipped. Each model is built, explained and compiled once per
module (``inner="eager"``: the passes, not Inductor, are under test).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

import adafuse_compile
from adafuse_compile.backend import capture_rewrites

import real_packages as rp

# name -> (the package's import name, builder)
BUILDERS = {
    **{f"moe_peft[{kind}]": ("moe_peft", lambda kind=kind: rp.moe_peft_model(kind)) for kind in rp.MOE_PEFT_KINDS},
    "eulerforge": ("eulerforge", rp.eulerforge_model),
    "mixlora": ("mixlora", rp.mixlora_model),
}

LAYERS = range(rp.LAYERS)
# The linears each builder adapts, as module paths in the wrapper rp returns, in the order of the forward.
MOE_PEFT_ATTN = [f"self_attn_.{p}" for p in ("wq_", "wk_", "wv_", "wo_")]
MOE_PEFT_MLP = [f"mlp_.mlp_.{p}" for p in ("w1_", "w3_", "w2_")]
HF_ATTN = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
HF_MLP = [f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]


def _paths(prefix, names):
    return [f"{prefix}.{i}.{n}" for i in LAYERS for n in names]


ADAPTED = {
    "moe_peft[mola]": _paths("llm.model_.layers_", MOE_PEFT_ATTN + MOE_PEFT_MLP),
    "moe_peft[loramoe]": _paths("llm.model_.layers_", MOE_PEFT_MLP),
    "moe_peft[mixlora]": _paths("llm.model_.layers_", MOE_PEFT_MLP),
    "moe_peft[mixlora_top_p]": _paths("llm.model_.layers_", MOE_PEFT_MLP),
    "eulerforge": _paths("inner.model.layers", HF_MLP),
    "mixlora": _paths("inner.model.layers", HF_ATTN + HF_MLP),
}


@dataclasses.dataclass
class Outcome:
    built: rp.RealModel
    eager: torch.Tensor
    compiled: torch.Tensor  # adafuse_compile.compile(model, inner="eager")'s output
    rewrites: list  # the Rewrite of every graph that compile rewrote
    report: adafuse_compile.ExplainReport  # explain(model, **inputs) under no_grad


@pytest.fixture(scope="module")
def outcomes():
    """``get(name)``: the builder's model built, run eagerly, compiled and explained, once per module."""
    cache: dict[str, Outcome] = {}

    def get(name: str) -> Outcome:
        package, build = BUILDERS[name]
        if importlib.util.find_spec(package) is None:  # not importorskip: moe_peft needs rp's stubs to import
            pytest.skip(f"{package} is not installed (make setup installs it with pip install --no-deps)")
        if name not in cache:
            built = build()
            eager = built.run()
            torch._dynamo.reset()
            try:
                with capture_rewrites() as rewrites:
                    compiled = built.run(adafuse_compile.compile(built.model, inner="eager"))
            finally:
                torch._dynamo.reset()
            with torch.no_grad():
                report = adafuse_compile.explain(built.model, **built.inputs)
            cache[name] = Outcome(built, eager, compiled, list(rewrites), report)
        return cache[name]

    yield get
    cache.clear()
    torch._dynamo.reset()


def _covered(report, paths) -> set[str]:
    """The paths among ``paths`` that a fused or folded site covers: the site is that linear, a module
    inside it (an adapter's own linear) or a module around it (a whole token-dispatch MLP block)."""
    done = [s.path for s in report.sites if s.status in ("fused", "folded")]
    return {p for p in paths if any(d == p or d.startswith(p + ".") or p.startswith(d + ".") for d in done)}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_compiled_output_equals_eager(outcomes, name):
    o = outcomes(name)
    torch.testing.assert_close(o.compiled, o.eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_explain_reports_the_sites_compile_rewrites(outcomes, name):
    o = outcomes(name)
    explained = [(s.path, s.status) for s in o.report.sites]
    compiled = [(s.path, s.status) for rw in o.rewrites for s in rw.sites]
    assert explained == compiled, str(o.report)
    assert not [rw.error for rw in o.rewrites if rw.error], "a graph was compiled unrewritten"


@pytest.mark.parametrize("name, experts, k, gate", [
    ("moe_peft[mola]", rp.EXPERTS, rp.TOP_K, "softmax_topk"),
    ("moe_peft[loramoe]", rp.EXPERTS, rp.EXPERTS, "dense"),
])
def test_moe_peft_per_linear_routers_every_site_fused(outcomes, name, experts, k, gate):
    report = outcomes(name).report
    assert report.graph_breaks == 0, str(report)
    assert [s.path for s in report.sites] == ADAPTED[name], str(report)  # 14 for MoLA, 6 for LoRAMoE
    assert all(s.status == "fused" and (s.experts, s.k, s.rank, s.gate) == (experts, k, rp.RANK, gate)
               for s in report.sites), str(report)


def test_mixlora_package_attention_lora_fused(outcomes):
    report = outcomes("mixlora").report
    assert report.graph_breaks == 0, str(report)
    attention = [s for s in report.sites if ".self_attn." in s.path]
    assert [s.path for s in attention] == _paths("inner.model.layers", HF_ATTN), str(report)
    assert all(s.status == "fused" and s.gate == "static" and (s.experts, s.rank) == (1, rp.RANK)
               for s in attention), str(report)


@pytest.mark.parametrize("name, block, k", [
    ("moe_peft[mixlora]", "llm.model_.layers_.{}.mlp_.mlp_", rp.TOP_K),
    ("moe_peft[mixlora_top_p]", "llm.model_.layers_.{}.mlp_.mlp_", rp.EXPERTS),  # top-p: up to every expert
    ("mixlora", "inner.model.layers.{}.mlp", rp.TOP_K),
])
def test_token_dispatch_mixlora_mlp_block_fused(outcomes, name, block, k):
    """MixLoRA's experts run gate/up/down on the rows ``torch.where(expert_mask)`` gathers: each
    MLP block (its experts' LoRA on all three linears) is one token-dispatch site."""
    report = outcomes(name).report
    assert report.graph_breaks == 0, str(report)
    mlp = [s for s in report.sites if ".self_attn." not in s.path]
    assert [s.path for s in mlp] == [block.format(i) for i in LAYERS], str(report)
    assert all(s.status == "fused" and s.gate == "token dispatch" and (s.experts, s.k, s.rank) == (rp.EXPERTS, k, rp.RANK)
               for s in mlp), str(report)


# The target for every package.
@pytest.mark.parametrize("name", list(BUILDERS))
def test_target_every_adapter_site_fused_or_folded(outcomes, name):
    report = outcomes(name).report
    assert report.graph_breaks == 0, str(report)
    assert report.count("left") == 0, str(report)
    assert _covered(report, ADAPTED[name]) == set(ADAPTED[name]), str(report)


def test_eulerforge_compiled_branch_free_with_its_statistics(outcomes):
    """Its expert loop is made branch-free when compiling (proved, reported), every MLP linear is
    one fused site, and the routing statistics the forward stores on each module (``track_stats``,
    on by default: token fractions, gate probabilities, entropy) are still eager's."""
    o = outcomes("eulerforge")
    from eulerforge.modules.mixture_lora import MixtureLoRALinear

    (branch,) = o.report.branches
    assert branch.cls == "MixtureLoRALinear" and branch.installed and branch.modules == len(ADAPTED["eulerforge"])
    assert all(s.status == "fused" and (s.experts, s.k, s.rank, s.gate) == (rp.EXPERTS, rp.TOP_K, rp.RANK, "softmax_topk")
               for s in o.report.sites), str(o.report)
    layers = [m for m in o.built.model.modules() if isinstance(m, MixtureLoRALinear)]
    for m in layers:  # the compiled run must write them again
        m.last_stats = m.last_entropy = None
    with torch.no_grad():
        o.built.run(adafuse_compile.compile(o.built.model, inner="eager"))
        compiled = [(m.last_stats.token_frac.clone(), m.last_stats.gate_prob.clone(), m.last_entropy.clone())
                    for m in layers]
        o.built.run()  # eager: the installed forward keeps the skip outside compilation
        eager = [(m.last_stats.token_frac, m.last_stats.gate_prob, m.last_entropy) for m in layers]
    torch._dynamo.reset()
    for got, want in zip(compiled, eager):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
