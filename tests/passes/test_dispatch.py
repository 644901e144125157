"""BatchTokenDispatchPass: a token-dispatch loop over experts whose block is nonlinear (MixLoRA's
feed-forward) is batched only when the structure proves it; every variation that breaks the
proof (experts that differ, an op that mixes rows, full-matrix experts)
is left as it was, with the reason."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adafuse_compile
from adafuse_compile.passes import graph_ops
from adafuse_compile.testing import assert_rewrite, count_calls

D, I, E, R, K = 24, 40, 4, 3, 2


class MixLoRAFFN(nn.Module):
    """MixLoRA as the packages write it: shared gate/up/down, a LoRA per expert on each, the
    router's top-k tokens gathered per expert with ``torch.where`` and ``index_add_``-ed back."""

    def __init__(self, variant="plain", mask="one_hot", inner=I):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.variant, self.mask = variant, mask
        self.gate, self.up = nn.Linear(D, inner, bias=False), nn.Linear(D, inner, bias=False)
        self.down = nn.Linear(inner, D, bias=False)
        self.router = nn.Linear(D, E, bias=False)
        rank = inner if variant == "full_experts" else R
        self.A = nn.ParameterList([nn.Parameter(torch.randn(rank, D, generator=g) / 4) for _ in range(3 * E)])
        self.B = nn.ParameterList([nn.Parameter(torch.randn(o, rank, generator=g) / 4)
                                   for _ in range(E) for o in (inner, inner, D)])
        self.A_down = nn.ParameterList([nn.Parameter(torch.randn(rank, inner, generator=g) / 4) for _ in range(E)])

    def lora(self, h, e, which):
        a = self.A_down[e] if which == 2 else self.A[3 * e + which]
        return F.linear(F.linear(h, a), self.B[3 * e + which]) * 2.0

    def expert(self, e, x_rows, gate_rows, up_rows):
        act = torch.relu if self.variant == "differ" and e == 1 else F.silu
        h = act(gate_rows + self.lora(x_rows, e, 0)) * (up_rows + self.lora(x_rows, e, 1))
        if self.variant == "mixes_rows":
            h = h - h.mean(0)
        return self.down(h) + self.lora(h, e, 2)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, D)
        probs = F.softmax(self.router(x), dim=-1)
        if self.mask == "one_hot":
            w, sel = torch.topk(probs, K, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            mask = F.one_hot(sel, num_classes=E).permute(2, 1, 0)
        else:  # MoE-PEFT's top-p: every slot, -1 where the cumulative probability is reached
            w, sel = torch.sort(probs, dim=-1, descending=True)
            drop = w.cumsum(-1) - w > 0.6
            w, sel = w.masked_fill(drop, 0.0), sel.masked_fill(drop, -1)
            mask = torch.empty((E, E, x.shape[0]))
            for e in range(E):
                mask[e] = (sel == e).transpose(0, 1)
        gate, up = self.gate(x), self.up(x)
        out = torch.zeros_like(x)
        for e in range(E):
            slot, tok = torch.where(mask[e])
            y = self.expert(e, x[None, tok].reshape(-1, D), gate[None, tok].reshape(-1, gate.shape[-1]),
                            up[None, tok].reshape(-1, up.shape[-1]))
            out.index_add_(0, tok, y * w[tok, slot, None])
        return out.reshape(shape)


X = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mask", ["one_hot", "top_p"])
def test_mixlora_ffn_dispatch_is_batched_without_data_dependent_sizes(mask):
    model = MixLoRAFFN(mask=mask).eval()
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        (rw,) = assert_rewrite(model, X, before=(torch.where,), after=(graph_ops.expert_linear, graph_ops.dispatch_rows))
        report = adafuse_compile.explain(model, X)
    assert count_calls(rw.graph, "index_add_") == 1
    assert count_calls(rw.graph, torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_size.int) == 0
    assert [(s.status, s.gate, s.experts, s.k, s.rank) for s in report.sites] == [
        ("fused", "token dispatch", E, K if mask == "one_hot" else E, R)]
    # 3 LoRA pairs per expert: six per-expert parameters stacked
    assert "(6 per expert)" in report.sites[0].reason


@pytest.mark.parametrize("variant, reason", [
    ("differ", "the experts' computations differ"),
    ("mixes_rows", "is not known to be row-wise"),
    ("full_experts", "full matrices"),
])
def test_dispatch_that_is_not_proved_is_left_with_the_reason(variant, reason):
    model = MixLoRAFFN(variant, inner=96 if variant == "full_experts" else I).eval()
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        (rw,) = assert_rewrite(model, X)
        report = adafuse_compile.explain(model, X)
    assert count_calls(rw.graph, graph_ops.expert_linear) == 0
    assert count_calls(rw.graph, torch.where) == E
    left = [s for s in report.sites if s.gate is None and s.status == "left" and reason in s.reason]
    assert left, str(report)


def test_with_freeze_the_experts_are_stacked_once_and_weight_updates_are_seen():
    from torch._dynamo.utils import counters

    model = MixLoRAFFN().eval()
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        (rw,) = assert_rewrite(model, X, options={"freeze": True}, after=(graph_ops.expert_linear,))
        assert count_calls(rw.graph, torch.stack) == 0 and len(rw.derived_inputs) == 6
        torch._dynamo.reset()
        counters.clear()
        fast = adafuse_compile.compile(model, inner="eager", freeze=True)
        fast(X)
        model.B[2].mul_(3.0)  # an in-place update of one expert's down B: its version changes
        torch.testing.assert_close(fast(X), model(X), atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
