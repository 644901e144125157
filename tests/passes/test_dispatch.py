"""BatchTokenDispatchPass: a token-dispatch loop over experts whose block is nonlinear (MixLoRA's
feed-forward) is batched only when the structure proves it; every variation that breaks the
proof (experts that differ, an op that mixes rows, full-matrix experts)
is left as it was, with the reason."""

import dataclasses
import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import adafuse_compile
from adafuse_compile.passes import graph_ops
from adafuse_compile.testing import assert_rewrite, count_calls

# --- MixLoRA-style blocks over a spec (hypothesis draws the specs; the examples pick some) ---

# Each example compiles the block (about 0.5-1.5 s on 2 cores; a left one also runs explain):
# a small fixed budget under the ci profile (about 30 s for both properties), the profile's own
# under the others (dev: 300 for property 1, 300 shared by the mutations of property 2);
# ADAFUSE_DISPATCH_EXAMPLES overrides both (per mutation for property 2).
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
_SMALL = _PROFILE in ("ci", "triage")
_BATCHED_EXAMPLES = int(os.environ.get("ADAFUSE_DISPATCH_EXAMPLES", 24 if _SMALL else settings().max_examples))

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": torch.relu, "tanh": torch.tanh}
PROJECTIONS = ("gate", "up", "down")
LORA_PLACEMENTS = [c for n in (1, 2, 3) for c in itertools.combinations(PROJECTIONS, n)]  # which carry a LoRA
TOKENS = [(), (1,), (1, 1), (2, 3), (3, 7)]  # leading shapes of x [..., D]: one token, ..., 21 tokens
ROW_MIXERS = {  # ops that mix the rows of an expert's block
    "mean": lambda h: h - h.mean(0),
    "cumsum": lambda h: h.cumsum(0),
    "flip": lambda h: torch.flip(h, [0]),
    "softmax": lambda h: torch.softmax(h, dim=0),
}
EXTRA_OPS = {"scale": lambda h: h * 2.0, "shift": lambda h: h + 0.5, "neg": lambda h: -h}


@dataclasses.dataclass(frozen=True)
class FFNSpec:
    """A MixLoRA-style feed-forward dispatch: sizes, routing, which projections carry a LoRA, and
    at most one ``mutation`` (what makes the pass leave it, see ``LEFT_REASONS``)."""

    experts: int = 4
    k: int = 2
    rank: int = 3
    d: int = 24
    inner: int = 40
    act: str = "silu"
    mask: str = "one_hot"  # "one_hot" (Mixtral, MixLoRA) or "top_p" (MoE-PEFT: -1 sentinels in sel)
    top_p: float = 0.6
    loras: tuple = PROJECTIONS
    shared_A: bool = False  # HydraLoRA: one A per projection, a B per expert
    renorm: bool = True
    tokens: tuple = (2, 5)
    dtype: torch.dtype = torch.float32
    bias: bool = False  # biases on the shared gate/up/down
    block: str = "gated"  # "gated": down(act(gate) * up); "linear": down(up), linear in the rows
    shared_scale: bool = False  # h * a vector parameter shared by the experts (row-wise)
    dropout: bool = False  # F.dropout in eval mode (inactive)
    mutation: str | None = None
    target: int = 0  # the expert a "differ_*" mutation changes
    variant: str = ""  # the activation, extra op or row mixer of a "differ_act", "differ_extra", "mix_rows"
    seed: int = 0


# mutation -> reasons the pass may give for leaving the dispatch (any one of them)
LEFT_REASONS = {
    "differ_act": ("the experts' computations differ",),
    "differ_extra": ("the experts' computations differ",),
    "differ_scaling": ("the experts' computations differ",),
    "mix_rows": ("is not known to be row-wise",),
    "expert_bias": ("a per-expert bias", "is used other than as a linear's weight"),
    "expert_scale_list": ("is used other than as a linear's weight",),
    "expert_scalar_list": ("is used other than as a linear's weight",),
    "expert_scale_table": ("not a row of the expert's input",),
    "full_experts": ("full matrices",),
    "no_lora": ("the experts read no parameters of their own",),
}
_LEFT_EXAMPLES = int(os.environ.get("ADAFUSE_DISPATCH_EXAMPLES",
                                    2 if _SMALL else max(1, settings().max_examples // len(LEFT_REASONS))))


class MixLoRAFFN(nn.Module):
    """MixLoRA as the packages write it, over an :class:`FFNSpec`: shared gate/up/down, a LoRA per
    expert on (some of) them, the router's top-k tokens gathered per expert with ``torch.where``
    and ``index_add_``-ed back (hypothesis draws the specs; the examples below pick some)."""

    def __init__(self, s: FFNSpec):
        super().__init__()
        self.s = s
        g = torch.Generator().manual_seed(s.seed)
        D, I_, E, r = s.d, s.inner, s.experts, s.rank

        def rnd(*shape, fan_in=None):
            return nn.Parameter(torch.randn(*shape, generator=g, dtype=s.dtype) / math.sqrt(fan_in or shape[-1]))

        def positive(*shape):
            return nn.Parameter(0.5 + torch.rand(shape, generator=g, dtype=s.dtype))

        self.gate = nn.Linear(D, I_, bias=s.bias, dtype=s.dtype)
        self.up = nn.Linear(D, I_, bias=s.bias, dtype=s.dtype)
        self.down = nn.Linear(I_, D, bias=s.bias, dtype=s.dtype)
        self.router = nn.Linear(D, E, bias=False, dtype=s.dtype)
        with torch.no_grad():  # from the spec's seed, not the global RNG
            for m in (self.gate, self.up, self.down, self.router):
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=s.dtype) / math.sqrt(m.in_features))
        dims = {"gate": (D, I_), "up": (D, I_), "down": (I_, D)}
        self.A = nn.ModuleDict({p: nn.ParameterList([rnd(r, dims[p][0]) for _ in range(1 if s.shared_A else E)])
                                for p in s.loras})
        self.B = nn.ModuleDict({p: nn.ParameterList([rnd(dims[p][1], r) for _ in range(E)]) for p in s.loras})
        self.scaling = [0.5] * E
        if s.mutation == "differ_scaling":  # alpha / r of one expert differs: a different constant
            self.scaling[s.target] = 0.25
        if s.shared_scale:
            self.scale = positive(I_)
        if s.mutation == "expert_bias":  # on the B of the first projection with a LoRA
            self.lora_bias = nn.ParameterList([rnd(dims[s.loras[0]][1], fan_in=1) for _ in range(E)])
        elif s.mutation == "expert_scale_list":
            self.expert_scale = nn.ParameterList([positive(I_) for _ in range(E)])
        elif s.mutation == "expert_scalar_list":
            self.expert_scale = nn.ParameterList([positive() for _ in range(E)])
        elif s.mutation == "expert_scale_table":
            self.expert_scale = positive(E, I_)

    def lora(self, h, e, p):
        s = self.s
        if p not in s.loras:
            return 0.0
        bias = self.lora_bias[e] if s.mutation == "expert_bias" and p == s.loras[0] else None
        a = self.A[p][0 if s.shared_A else e]
        return F.linear(F.linear(h, a), self.B[p][e], bias) * self.scaling[e]

    def expert(self, e, x, gate, up):
        s, mine = self.s, e == self.s.target
        act = ACTIVATIONS[s.variant if s.mutation == "differ_act" and mine else s.act]
        if s.block == "linear":
            h = up + self.lora(x, e, "up")
        else:
            h = act(gate + self.lora(x, e, "gate")) * (up + self.lora(x, e, "up"))
        if s.dropout:
            h = F.dropout(h, 0.1, self.training)
        if s.shared_scale:
            h = h * self.scale
        if s.mutation == "differ_extra" and mine:
            h = EXTRA_OPS[s.variant](h)
        elif s.mutation == "mix_rows":
            h = ROW_MIXERS[s.variant](h)
        elif s.mutation in ("expert_scale_list", "expert_scalar_list", "expert_scale_table"):
            h = h * self.expert_scale[e]
        return self.down(h) + self.lora(h, e, "down")

    def forward(self, x):
        s, E, D = self.s, self.s.experts, self.s.d
        shape = x.shape
        x = x.reshape(-1, D)
        probs = F.softmax(self.router(x), dim=-1)
        if s.mask == "one_hot":
            w, sel = torch.topk(probs, s.k, dim=-1)
        else:  # the first k of the sorted experts, -1 once the cumulative probability is reached
            w, sel = torch.sort(probs, dim=-1, descending=True)
            w, sel = w[:, :s.k], sel[:, :s.k]
            drop = w.cumsum(-1) - w > s.top_p
            w, sel = w.masked_fill(drop, 0.0), sel.masked_fill(drop, -1)
        if s.renorm:
            w = w / w.sum(-1, keepdim=True)
        if s.mask == "one_hot":
            mask = F.one_hot(sel, num_classes=E).permute(2, 1, 0)
        else:
            mask = torch.empty((E, s.k, x.shape[0]))
            for e in range(E):
                mask[e] = (sel == e).transpose(0, 1)
        if s.mutation == "edit_mask":  # token 0 dropped from the mask after it is built, in place
            if s.mask == "one_hot":
                mask[:, :, 0] = 0
            else:
                mask[0][0] = 0  # expert 0's slot-0 rows: a write through a view of the mask
        gate, up = self.gate(x), self.up(x)
        if s.mutation == "alias_acc":  # the outputs are added in place into (a view of) the rows read
            x = x.clone()
            out = x.view(-1, D)
        else:
            out = torch.zeros_like(x)
        for e in range(E):
            slot, tok = torch.where(mask[e])
            y = self.expert(e, x[None, tok].reshape(-1, D), gate[None, tok].reshape(-1, gate.shape[-1]),
                            up[None, tok].reshape(-1, up.shape[-1]))
            out.index_add_(0, tok, y * w[tok, slot, None])
        return out.reshape(shape)

    def example(self):
        g = torch.Generator().manual_seed(self.s.seed + 1)
        return torch.randn(*self.s.tokens, self.s.d, generator=g, dtype=self.s.dtype)


@st.composite
def ffn_specs(draw, mutation=None) -> FFNSpec:
    """Any block; ``mutation`` (a key of ``LEFT_REASONS``) draws one the pass must leave."""
    experts = draw(st.integers(2 if mutation else 1, 6))
    small = st.integers(65, 72) if mutation == "full_experts" else st.integers(3, 40)
    loras = () if mutation == "no_lora" else draw(st.sampled_from(LORA_PLACEMENTS))
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    variant = {
        "differ_act": st.sampled_from(sorted(set(ACTIVATIONS) - {act})),
        "differ_extra": st.sampled_from(sorted(EXTRA_OPS)),
        "mix_rows": st.sampled_from(sorted(ROW_MIXERS)),
    }.get(mutation, st.just(""))
    return FFNSpec(
        experts=experts,
        k=draw(st.integers(1, experts)),
        rank=draw(st.integers(65, 72) if mutation == "full_experts" else st.integers(1, 8)),
        d=draw(small),
        inner=draw(small),
        act=act,
        mask=draw(st.sampled_from(["one_hot", "top_p"])),
        top_p=draw(st.sampled_from([0.3, 0.6, 0.9])),
        loras=loras,
        shared_A=draw(st.booleans()) if mutation not in ("full_experts", "no_lora") else False,
        renorm=draw(st.booleans()),
        tokens=draw(st.sampled_from(TOKENS)),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        bias=draw(st.booleans()),
        block="gated" if mutation else draw(st.sampled_from(["gated"] * 7 + ["linear"])),
        shared_scale=draw(st.booleans()),
        dropout=draw(st.booleans()),
        mutation=mutation,
        target=draw(st.integers(0, experts - 1)),
        variant=draw(variant),
        seed=draw(st.integers(0, 2**16)),
    )


def _compile(model, x, **kw):
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        (rw,) = assert_rewrite(model, x, options={"strict": True}, **kw)
    return rw


def _dispatch_reports(sites):
    return [s for s in sites if s.gate == "token dispatch"]

@pytest.mark.parametrize("mask", ["one_hot", "top_p"])
def test_mixlora_ffn_dispatch_is_batched_without_data_dependent_sizes(mask):
    spec = FFNSpec(mask=mask, k=2 if mask == "one_hot" else 4)  # top-p as MoE-PEFT: every expert a slot
    model = MixLoRAFFN(spec).eval()
    x = model.example()
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        (rw,) = assert_rewrite(model, x, before=(torch.where,), after=(graph_ops.expert_linear, graph_ops.dispatch_rows))
        report = adafuse_compile.explain(model, x)
    assert count_calls(rw.graph, "index_add_") == 1
    assert count_calls(rw.graph, torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_size.int) == 0
    assert [(s.status, s.gate, s.experts, s.k, s.rank) for s in report.sites] == [
        ("fused", "token dispatch", 4, 2 if mask == "one_hot" else 4, 3)]
    # 3 LoRA pairs per expert: six per-expert parameters stacked
    assert "(6 per expert)" in report.sites[0].reason


@pytest.mark.parametrize("spec, reason", [
    (FFNSpec(mutation="differ_act", target=1, variant="relu"), "the experts' computations differ"),
    (FFNSpec(mutation="mix_rows", variant="mean"), "is not known to be row-wise"),
    (FFNSpec(mutation="full_experts", rank=96, inner=96), "full matrices"),
], ids=["differ", "mixes_rows", "full_experts"])
def test_dispatch_that_is_not_proved_is_left_with_the_reason(spec, reason):
    model = MixLoRAFFN(spec).eval()
    x = model.example()
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        (rw,) = assert_rewrite(model, x)
        report = adafuse_compile.explain(model, x)
    assert count_calls(rw.graph, graph_ops.expert_linear) == 0
    assert count_calls(rw.graph, torch.where) == 4
    left = [s for s in report.sites if s.gate is None and s.status == "left" and reason in s.reason]
    assert left, str(report)


def test_with_freeze_the_experts_are_stacked_once_and_weight_updates_are_seen():
    from torch._dynamo.utils import counters

    model = MixLoRAFFN(FFNSpec()).eval()
    x = model.example()
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        (rw,) = assert_rewrite(model, x, options={"freeze": True}, after=(graph_ops.expert_linear,))
        assert count_calls(rw.graph, torch.stack) == 0 and len(rw.derived_inputs) == 6
        torch._dynamo.reset()
        counters.clear()
        fast = adafuse_compile.compile(model, inner="eager", freeze=True)
        fast(x)
        model.B["down"][0].mul_(3.0)  # an in-place update of one expert's down B: its version changes
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


# --- Property tests -------------------------------------------------------------------------

@settings(max_examples=_BATCHED_EXAMPLES)
@given(spec=ffn_specs())
def test_drawn_mixlora_dispatch_is_batched_and_equals_eager(spec):
    """Property 1: whatever the sizes, routing, LoRA placement and dtype, the compiled block equals
    the float64 reference; a nonlinear block over E >= 2 experts is batched into one row-wise
    evaluation (no torch.where left, one index_add_, expert_linear for every per-expert linear)."""
    event("one expert" if spec.experts == 1 else "linear block" if spec.block == "linear" else "batched")
    model = MixLoRAFFN(spec).eval()
    rw = _compile(model, model.example())
    assert rw.error is None
    reports = _dispatch_reports(rw.sites)
    if spec.experts == 1 or spec.block == "linear":
        # one expert is no loop (one index_add_: not a dispatch); a block linear in its rows is
        # FuseMoLEPass's (which leaves it: data-dependent sizes)
        assert not reports and count_calls(rw.graph, graph_ops.expert_linear) == 0, str(rw.sites)
        return
    per_expert = len(spec.loras) * (1 if spec.shared_A else 2)  # the Bs, and the As unless shared
    assert [(s.status, s.experts, s.k) for s in reports] == [("fused", spec.experts, spec.k)], str(rw.sites)
    assert 1 <= reports[0].rank <= spec.rank
    assert f"({per_expert} per expert)" in reports[0].reason
    assert count_calls(rw.graph, "index_add_") == 1
    assert count_calls(rw.graph, graph_ops.dispatch_rows) == 1
    assert count_calls(rw.graph, graph_ops.expert_linear) == per_expert
    assert count_calls(rw.graph, torch.where) == 0
    assert count_calls(rw.graph, torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_size.int) == 0


@pytest.mark.parametrize("mutation", sorted(LEFT_REASONS))
@settings(max_examples=_LEFT_EXAMPLES)
@given(data=st.data())
def test_drawn_dispatch_that_is_not_proved_is_left_and_equals_eager(mutation, data):
    """Property 2: a mutation that breaks the proof (one expert's block differs, an op mixes rows,
    a per-expert bias or elementwise parameter, full-size expert matrices, no expert parameters)
    leaves the dispatch as it was, reported by explain with its reason; the output equals eager.
    Every kind of mutation is run (its variant, the expert it changes and the rest are drawn)."""
    spec = data.draw(ffn_specs(mutation), label="spec")
    model = MixLoRAFFN(spec).eval()
    x = model.example()
    rw = _compile(model, x)
    assert rw.error is None
    assert count_calls(rw.graph, graph_ops.expert_linear) == 0
    assert count_calls(rw.graph, graph_ops.dispatch_rows) == 0
    assert count_calls(rw.graph, torch.where) == spec.experts
    assert count_calls(rw.graph, "index_add_") == spec.experts
    with torch.no_grad():
        report = adafuse_compile.explain(model, x, options={"strict": True})
    assert not _dispatch_reports(report.sites), str(report)
    left = [s for s in report.sites if s.gate is None and s.status == "left"
            and any(r in s.reason for r in LEFT_REASONS[mutation])]
    assert left, str(report)


# --- Regressions: three ways the pass went wrong, found by the properties above ---

def test_dispatch_into_an_alias_of_the_experts_input_is_left():
    """The accumulator is a view of the tensor the experts read their rows from: expert e sees
    the earlier experts' index_add_ in eager, so batching them would change the result."""
    spec = FFNSpec(experts=2, k=2, d=8, inner=8, rank=2, tokens=(3,), mutation="alias_acc")
    model = MixLoRAFFN(spec).eval()
    rw = _compile(model, model.example())  # equal to eager
    assert count_calls(rw.graph, graph_ops.expert_linear) == 0


@pytest.mark.parametrize("mask", ["one_hot", "top_p"])
def test_dispatch_whose_mask_is_edited_in_place_is_left(mask):
    """A mask edited after it was built (a capacity limit dropping token 0) is not what ``sel``
    says: batching by ``sel`` would add the dropped rows back."""
    spec = FFNSpec(experts=2, k=2, d=8, inner=8, rank=2, tokens=(3,), mask=mask, top_p=1.0, mutation="edit_mask")
    model = MixLoRAFFN(spec).eval()
    rw = _compile(model, model.example())  # equal to eager
    assert count_calls(rw.graph, graph_ops.expert_linear) == 0


def test_batched_dispatch_leaves_no_nonzero_when_the_block_skips_some_gathered_rows():
    """With a LoRA on down only, the gathered rows of x are dead code in the loop: they go too."""
    spec = FFNSpec(experts=2, k=1, d=8, inner=8, rank=2, tokens=(3,), loras=("down",))
    model = MixLoRAFFN(spec).eval()
    rw = _compile(model, model.example(), after=(graph_ops.expert_linear,))
    assert count_calls(rw.graph, torch.where) == 0
