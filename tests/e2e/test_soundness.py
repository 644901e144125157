"""End-to-end soundness of the adafuse backend: compiled == eager, never a silent wrong answer.

Each test builds a tiny adapter model, compiles it through the public API (inner compiler
"eager": the passes are under test) and then does what users do after compiling: update weights
in every way PyTorch allows, feed inputs the compile-time example never resembled, change scales
that look constant, run several threads, decode. A site may be left unrewritten instead of
fused or folded; the output must always be eager's.
"""

from __future__ import annotations

import gc
import re
import sys
import threading

import pytest
import torch
from e2e_models import (  # noqa: F401  (fresh_dynamo: autouse fixture)
    MoLESite,
    SiteSpec,
    StaticLoRA,
    assert_matches_eager,
    compile_eager_inner,
    degenerate_,
    fresh_dynamo,
    inputs,
    randomize_,
)
from torch import nn

import adafuse_compile
from adafuse_compile.models import add_pregated_lora_moe, find_pregate, tiny_llama

BF16_REL = 2e-2


def _explain(model, *args, **options):
    with torch.no_grad():
        return adafuse_compile.explain(model, *args, options={"inner": "eager", **options})


def _statuses(model, *args, **options):
    return [(s.status, s.reason) for s in _explain(model, *args, **options).sites]


class SharedInputSites(nn.Module):
    """Two MoLE sites whose routers read the same tensor (q/v-like): both outputs and decisions."""

    def __init__(self, spec: SiteSpec, seed: int = 0) -> None:
        super().__init__()
        self.q = MoLESite(spec, seed)
        self.v = MoLESite(spec, seed + 1)

    def forward(self, x):
        (idx_q, _), (idx_v, _) = self.q.route(x), self.v.route(x)
        return self.q(x), self.v(x), idx_q, idx_v


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _assert_outputs_match(got, expected, msg: str = "", rel: float = 1e-4) -> None:
    """Float outputs within ``rel`` of eager; integer outputs (decisions) bitwise."""
    for i, (a, b) in enumerate(zip(_as_tuple(got), _as_tuple(expected), strict=True)):
        if b.is_floating_point():
            assert_matches_eager(a, b, rel=rel, msg=f"{msg} (output {i})")
        else:
            assert torch.equal(a, b), f"{msg} (output {i}): decisions differ from eager"


# --- 1. weights updated after compiling -------------------------------------------------------

def _new_values(p: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5).to(p.dtype)


UPDATES = {
    "data.copy_": lambda p, new: p.data.copy_(new),
    "data.mul_": lambda p, new: p.data.mul_(2),
    "data = new": lambda p, new: setattr(p, "data", new.clone()),
    "copy_ under no_grad": lambda p, new: p.copy_(new),
}

TARGETS = {
    # (model, input features, what the names of the parameters the user updates contain)
    "static LoRA A/B (folded)": (lambda: StaticLoRA(), 32, ("lora_A", "lora_B")),
    "per-expert ModuleList A/B (stacked)": (lambda: MoLESite(SiteSpec(layout="list")), 32, ("lora_A", "lora_B")),
    "routers on one input (hoisted)": (lambda: SharedInputSites(SiteSpec(d_in=64, experts=8)), 64, ("router",)),
}


def _updated(model: nn.Module, keys) -> list[tuple[str, nn.Parameter]]:
    chosen = [(n, p) for n, p in model.named_parameters() if any(k in n for k in keys)]
    assert chosen, f"no parameter name contains one of {keys}"
    return chosen


@pytest.mark.parametrize("how", [*UPDATES, "load_state_dict"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_weights_updated_after_compiling_are_seen(target, how):
    make, d_in, keys = TARGETS[target]
    model = make().eval()
    x = inputs(d_in, 4, seed=1)
    fast = compile_eager_inner(model)
    with torch.no_grad():
        before = model(x)
        _assert_outputs_match(fast(x), before, "before the update")
        params = _updated(model, keys)
        if how == "load_state_dict":
            state = model.state_dict()
            state.update({n: _new_values(p, seed=i) for i, (n, p) in enumerate(params)})
            model.load_state_dict(state)
        else:
            for i, (_, p) in enumerate(params):
                UPDATES[how](p, _new_values(p, seed=i))
        expected, got = model(x), fast(x)
    assert not torch.allclose(_as_tuple(expected)[0], _as_tuple(before)[0]), "the update must change the eager output"
    _assert_outputs_match(got, expected, f"{target}: stale weights after {how}")


# --- 2. values the compile-time example did not show ------------------------------------------

@pytest.mark.parametrize("layout", ["stacked", "list"])
def test_clamp_between_A_and_B_holds_for_large_inputs(layout):
    """A clamp that no compile-time value reached is still part of the math."""
    spec = SiteSpec(between="clamp", clamp=5.0, layout=layout)
    model = MoLESite(spec).eval()
    x = inputs(spec, 4, seed=1)
    fast = compile_eager_inner(model)
    with torch.no_grad():
        assert_matches_eager(fast(x), model(x))
        big = x * 20  # same shape: no recompile
        assert_matches_eager(fast(big), model(big), msg="clamp ignored for inputs 20x the example")


def test_learnable_scalar_scale_changed_after_compiling():
    spec = SiteSpec(scale="param", scale_value=0.5)
    model = MoLESite(spec).eval()
    x = inputs(spec, 4, seed=1)
    fast = compile_eager_inner(model)
    with torch.no_grad():
        assert_matches_eager(fast(x), model(x))
        model.s.fill_(3.0)
        assert_matches_eager(fast(x), model(x), msg="a learnable scale was baked in as a constant")


@pytest.mark.parametrize("layout", ["stacked", "list"])
def test_per_expert_scale_vector_changed_after_compiling(layout):
    spec = SiteSpec(scale="vector", layout=layout)
    model = MoLESite(spec).eval()  # the vector starts at ones: invisible at compile time
    assert torch.equal(model.s, torch.ones(spec.experts))
    x = inputs(spec, 4, seed=1)
    fast = compile_eager_inner(model)
    with torch.no_grad():
        assert_matches_eager(fast(x), model(x))
        model.s.copy_(torch.tensor([0.25, 2.0, -1.0, 3.0]))
        assert_matches_eager(fast(x), model(x), msg="per-expert scales were dropped")


@pytest.mark.parametrize("init", ["zeros", "tiny", "identical"])
@pytest.mark.parametrize("layout", ["stacked", "list"])
def test_permuted_expert_table_after_experts_diverge(layout, init):
    """The code uses B of expert perm[e]; at compile time the experts cannot tell that apart."""
    spec = SiteSpec(layout=layout, perm=(1, 0, 3, 2))
    model = MoLESite(spec).eval()
    degenerate_(model, init)
    x = inputs(spec, 4, seed=1)
    fast = compile_eager_inner(model)
    with torch.no_grad():
        assert_matches_eager(fast(x), model(x))
        randomize_(model, seed=7)  # training moved on: the experts differ now
        assert_matches_eager(fast(x), model(x), msg=f"permuted experts ({init} at compile time)")


@pytest.mark.parametrize("layout", ["stacked", "list"])
def test_tiny_adapter_with_wrong_structure_is_not_verified(layout):
    """An adapter term ~1e-6 of the output hides any structure; scaling it up must not expose a wrong fusion."""
    spec = SiteSpec(layout=layout, perm=(1, 0, 2, 3))
    model = MoLESite(spec).eval()
    degenerate_(model, "tiny")
    x = inputs(spec, 4, seed=1)
    fast = compile_eager_inner(model)
    with torch.no_grad():
        assert_matches_eager(fast(x), model(x))
        for p in ([model.lora_B] if layout == "stacked" else [m.weight for m in model.lora_B]):
            p.mul_(1e6)
        assert_matches_eager(fast(x), model(x), msg="swapped experts fused as verified on a ~1e-6 adapter term")


# --- 3. one-token graphs ------------------------------------------------------------------------

class SwapTwoExperts(MoLESite):
    """Experts 2 and 5 swapped in the code, after routing."""

    def route(self, x):
        idx, g = super().route(x)
        return torch.where(idx == 2, 5, torch.where(idx == 5, 2, idx)), g


@pytest.mark.parametrize("seed", range(10))
def test_one_token_graph_with_swapped_experts(seed):
    """A T=1 graph gives its probes few tokens to see experts 2 and 5 with: decode must still be eager's."""
    spec = SiteSpec(experts=8, top_k=2)
    model = SwapTwoExperts(spec, seed=seed).eval()
    fast = compile_eager_inner(model)
    with torch.no_grad():
        for step in range(40):
            x = inputs(spec, 1, seed=1000 * seed + step)
            assert_matches_eager(fast(x), model(x), msg=f"seed {seed}, decode step {step}")


# --- 4. merged weights: threads and copies ------------------------------------------------------

def _pregated_llama():
    return add_pregated_lora_moe(tiny_llama("tiny"), seed=0).eval()


def _merge_options() -> dict:
    """strategy="merge" caches merged weights, so it needs freeze=True."""
    return {"inner": "eager", "strategy": "merge", "freeze": True}


def _tokens_with_different_decisions(model, n: int = 2) -> list[int]:
    """Token ids whose pre-gate decisions differ (so each thread merges a different decision)."""
    with torch.no_grad():
        idx, _ = find_pregate(model).decide(model.get_input_embeddings().weight)
    chosen: list[int] = []
    for t in range(idx.shape[0]):
        if all(not torch.equal(idx[t], idx[c]) for c in chosen):
            chosen.append(t)
        if len(chosen) == n:
            return chosen
    raise AssertionError("no tokens with different decisions")


def test_merge_strategy_from_two_threads_equals_eager():
    """Each thread's batch has one decision (so it merges); the merged copies must not be shared mid-step."""
    model = _pregated_llama()
    batches = [torch.full((1, 4), t) for t in _tokens_with_different_decisions(model)]
    fast = torch.compile(model, backend="adafuse", options=_merge_options())
    with torch.no_grad():
        expected = [model(ids).logits for ids in batches]
        for ids, ref in zip(batches, expected):  # compile once, single-threaded
            assert_matches_eager(fast(ids).logits, ref)
    errors: list[str] = []

    def decode(j: int) -> None:
        with torch.no_grad():
            for step in range(50):
                diff = (fast(batches[j]).logits - expected[j]).abs().max().item()
                if diff > 1e-4:
                    errors.append(f"thread {j} step {step}: max |compiled - eager| = {diff:.3g}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the threads between ops, as a loaded server would
    try:
        threads = [threading.Thread(target=decode, args=(j,)) for j in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, f"{len(errors)} of 100 concurrent calls differ from eager: {errors[:3]}"


def _merged_copies_of(model: nn.Module) -> list:
    """Live MergedGroup objects whose unmerged weights are this model's parameters."""
    gc.collect()
    ptrs = {p.data_ptr() for p in model.parameters()}
    return [o for o in gc.get_objects() if isinstance(o, adafuse_compile.MergedGroup)
            and o.pristine is not None and any(w.data_ptr() in ptrs for w in o.pristine)]


def test_one_merged_copy_per_group_after_a_recompile():
    """Merged copies of the weights cost a model's adapted weights each: one per pre-gate group,
    however many graphs Dynamo compiled for the model."""
    model = _pregated_llama()
    (tok,) = _tokens_with_different_decisions(model, 1)
    fast = torch.compile(model, backend="adafuse", options=_merge_options())
    with torch.no_grad():
        for ids in [torch.full((1, 1), tok)] * 3 + [torch.full((2, 1), tok)] * 3:  # the batch change recompiles
            assert_matches_eager(fast(ids).logits, model(ids).logits)
    groups = 1  # one PreGate drives every site
    copies = _merged_copies_of(model)
    assert len(copies) == groups, f"{len(copies)} merged copies of the weights alive for {groups} group"


# --- 5. router hoisting with dynamic shapes -----------------------------------------------------

def test_hoisted_routers_route_bitwise_at_every_token_count():
    model = SharedInputSites(SiteSpec(d_in=64, experts=16, top_k=2)).eval()
    fast = compile_eager_inner(model, dynamic=True)
    with torch.no_grad():
        for T in range(1, 13):
            x = inputs(64, T, seed=T)
            _assert_outputs_match(fast(x), model(x), f"T={T}")


def test_explain_states_which_token_counts_hoisting_was_checked_at():
    """On a dynamic graph, bitwise equality was checked at a few token counts only: the report
    must say which (or not hoist at all), not claim it for every token count."""
    model = SharedInputSites(SiteSpec(d_in=64, experts=16, top_k=2)).eval()
    x = inputs(64, 5, seed=0)
    torch._dynamo.mark_dynamic(x, 0)
    report = _explain(model, x)
    if not report.hoisted_routers:
        return  # dynamic graphs not hoisted: nothing claimed
    line = next(ln for ln in str(report).splitlines() if "hoisted" in ln)
    assert re.search(r"token", line) and re.search(r"\d+(, ?\d+)+", line), (
        f"hoisting on a dynamic graph claimed without the token counts it was checked at: {line!r}")


# --- 6. real PEFT on a bf16 model -----------------------------------------------------------------

@pytest.mark.parametrize("strict", [False, True])
def test_peft_lora_on_bf16_base_with_fp32_adapters(strict):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)  # init_lora_weights=False draws from the global RNG
    base = tiny_llama("tiny", num_hidden_layers=1).to(torch.bfloat16)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, config, autocast_adapter_dtype=True).eval()
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    ids = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(1))
    fast = torch.compile(model, backend="adafuse", options={"inner": "eager", "strict": strict})
    with torch.no_grad():
        expected = model(ids).logits
        got = fast(ids).logits  # strict=True: a pass that raises fails the compile
    assert_matches_eager(got, expected, rel=BF16_REL)


# --- 7. dropout and the global RNG --------------------------------------------------------------

def test_dropout_in_training_mode_is_left_with_the_reason():
    model = StaticLoRA(dropout=0.01).train()
    sites = _explain(model, inputs(32, 8, seed=1)).sites
    assert sites and all(s.status == "left" and "dropout" in s.reason.lower() for s in sites), sites


def test_dropout_in_training_mode_draws_the_masks_eager_draws():
    """Same seed, same masks: compiling must neither fold the dropout away nor draw from the RNG."""
    model = StaticLoRA(dropout=0.01).train()
    x = inputs(32, 8, seed=1)
    fast = compile_eager_inner(model)
    with torch.no_grad():
        torch.manual_seed(0)
        expected = model(x)
        torch.manual_seed(0)
        got = fast(x)  # the first call compiles, then runs
    assert_matches_eager(got, expected, msg="dropout masks differ from eager's")


@pytest.mark.parametrize("model_fn", [lambda: StaticLoRA(), lambda: MoLESite(SiteSpec(layout="list"))],
                         ids=["static", "mole"])
def test_compiling_does_not_consume_the_global_rng(model_fn):
    model = model_fn().eval()  # eval: the model itself draws nothing
    x = inputs(32, 4, seed=1)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    _explain(model, x)
    assert torch.equal(torch.get_rng_state(), state), "explain (capture + passes) drew from the global RNG"
    fast = compile_eager_inner(model)
    with torch.no_grad():
        fast(x)
    assert torch.equal(torch.get_rng_state(), state), "compiling drew from the global RNG"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("model_fn", [lambda: StaticLoRA(dropout=0.01), lambda: MoLESite(SiteSpec(dropout=0.01))],
                         ids=["static", "mole"])
def test_passes_on_an_fx_graph_do_not_consume_the_global_rng(model_fn, train):
    """Outside Dynamo (which restores the RNG after compiling), the backend's probes must not draw either."""
    from torch.fx.passes.shape_prop import ShapeProp

    model = model_fn().train(train)
    x = inputs(32, 8, seed=1)
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(x)
        torch.manual_seed(0)
        state = torch.get_rng_state()
        adafuse_compile.adafuse_backend(gm, [x], options={"inner": "eager"})
    assert torch.equal(torch.get_rng_state(), state), "the passes drew from the global RNG"


# --- 8. probing strictness and negative indices ---------------------------------------------------

@torch.library.custom_op("adafuse_e2e::bf16_only_wobble", mutates_args=())
def bf16_only_wobble(h: torch.Tensor, amount: float) -> torch.Tensor:
    """A low-precision-only kernel (as fused quantized kernels are): ``h * (1 + amount * tanh(h))``."""
    if h.dtype == torch.float64:
        raise RuntimeError("bf16_only_wobble: float64 is not supported")
    return h * (1 + amount * torch.tanh(h))


@bf16_only_wobble.register_fake
def _(h, amount):
    return torch.empty_like(h)


class WobblyLoRA(nn.Module):
    """A bf16 LoRA whose A->B path goes through a kernel that cannot run in float64."""

    def __init__(self, amount: float) -> None:
        super().__init__()
        self.inner = StaticLoRA(d_in=32, d_out=32, rank=4, scaling=8.0).to(torch.bfloat16)
        self.amount = amount

    def forward(self, x):
        s = self.inner
        return s.base(x) + s.lora_B(bf16_only_wobble(s.lora_A(x), self.amount)) * s.scaling


@pytest.mark.parametrize("amount", [0.01, 0.3])
def test_site_that_cannot_be_probed_in_float64_is_not_verified_loosely(amount):
    """Probing in bf16 instead of float64 must not accept a form that is wrong by 1% (or 30%)."""
    model = WobblyLoRA(amount).eval()
    x = inputs(32, 8, seed=1, scale=2.0, dtype=torch.bfloat16)
    statuses = _statuses(model, x)
    assert all(status not in ("fused", "folded") for status, _ in statuses), statuses
    fast = compile_eager_inner(model)
    with torch.no_grad():
        assert_matches_eager(fast(x), model(x), rel=BF16_REL)


class LastExpertOnOverflow(MoLESite):
    """Tokens with a large activation are sent to index -1 (Python indexing: the last expert)."""

    def route(self, x):
        idx, g = super().route(x)
        big = x.reshape(-1, self.spec.d_in).abs().amax(dim=-1, keepdim=True) > 10
        return torch.where(big, -1, idx), g


def test_negative_expert_index_at_run_time_follows_eager():
    spec = SiteSpec(experts=4)
    model = LastExpertOnOverflow(spec).eval()
    x = inputs(spec, 4, seed=1)
    fast = compile_eager_inner(model)
    with torch.no_grad():
        assert_matches_eager(fast(x), model(x))
        big = x * 20
        assert_matches_eager(fast(big), model(big), msg="idx = -1 at run time")


# --- the freeze contract: refresh() after writes through .data -----------------------------------

def test_refresh_after_a_data_write_refolds_under_freeze():
    model = StaticLoRA().eval()
    x = inputs(32, 3, seed=0)
    options = {"inner": "eager", "freeze": True}
    assert [s.status for s in _explain(model, x, **options).sites] == ["folded"]
    fast = torch.compile(model, backend="adafuse", options=options)
    with torch.no_grad():
        assert_matches_eager(fast(x), model(x))
        model.lora_B.weight.data.mul_(3.0)  # no version bump, no new storage: the fold cannot see it
        adafuse_compile.refresh()
        assert_matches_eager(fast(x), model(x), msg="after refresh()")


def test_refresh_reaches_merged_copies_of_every_thread():
    """A worker thread merged the decision into its own copies; refresh() called in the main
    thread must invalidate them too (one epoch every cache keys on, not a walk over this
    thread's state)."""
    model = _pregated_llama()
    ids = torch.full((1, 4), _tokens_with_different_decisions(model)[0])
    fast = torch.compile(model, backend="adafuse", options=_merge_options())
    got: list[torch.Tensor] = []
    go = [threading.Event(), threading.Event()]
    done = [threading.Event(), threading.Event()]

    def worker() -> None:  # one thread for both steps: its merged copies persist between them
        for step in range(2):
            go[step].wait()
            with torch.no_grad():
                got.append(fast(ids).logits)
            done[step].set()

    thread = threading.Thread(target=worker)
    thread.start()
    for step in range(2):
        go[step].set()
        done[step].wait()
        with torch.no_grad():
            assert_matches_eager(got[-1], model(ids).logits, msg=f"step {step}")
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.data.mul_(-2.0)  # merged copies cannot see this without refresh()
        adafuse_compile.refresh()
    thread.join()
