"""Expert loops that skip empty experts (``if not mask.any(): continue``): compiled branch-free
only when the rest of the iteration provably does nothing for an empty mask
(:mod:`adafuse_compile.branches`); otherwise the skip, its graph breaks and eager's output stay.

Each module below is the eulerforge loop with one change. The accepted ones must compile to one
graph with the site fused; the rejected ones must keep the original forward (graph breaks) and
still give eager's output. Compiled with ``inner="eager"``: the passes are under test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adafuse_compile
from adafuse_compile.branches import skip_branches_when_compiling

IN, OUT, E, K, R = 16, 24, 4, 2, 4


class Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(R, IN) / 4)
        self.B = nn.Parameter(torch.randn(OUT, R) / 2)

    def forward(self, x):
        z = F.linear(x, self.A)
        return F.linear(z, self.B) * 2.0


class Counting(Branch):
    """An expert with an effect of its own: it counts its calls."""

    def forward(self, x):
        self.calls = getattr(self, "calls", 0) + 1
        return F.linear(F.linear(x, self.A), self.B)


class Skipping(nn.Module):
    """eulerforge's MixtureLoRALinear loop (top-k over (slot, expert), skip empty experts)."""

    expert_class = Branch

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(IN, OUT)
        self.router = nn.Linear(IN, E, bias=False)
        self.experts = nn.ModuleList(self.expert_class() for _ in range(E))

    def start(self, x):
        """The base output, the tokens, the top-k decision and a zero accumulator."""
        t = x.reshape(-1, IN)
        w, idx = torch.topk(F.softmax(self.router(t), dim=-1), K, dim=-1)
        return self.base(x), t, w / w.sum(dim=-1, keepdim=True), idx, torch.zeros(t.shape[0], OUT, dtype=x.dtype)

    def forward(self, x):
        out, t, w, idx, delta = self.start(x)
        for k in range(K):
            idx_k, w_k = idx[:, k], w[:, k].unsqueeze(-1)
            for e in range(E):
                mask = idx_k == e
                if not mask.any():
                    continue
                d = self.experts[e](t[mask])
                delta[mask] += d * w_k[mask]
        return out + delta.reshape(out.shape)


class TorchAny(Skipping):
    def forward(self, x):
        out, t, w, idx, delta = self.start(x)
        for k in range(K):
            for e in range(E):
                mask = idx[:, k] == e
                if not torch.any(mask):
                    continue
                delta[mask] = delta[mask] + self.experts[e](t[mask]) * w[:, k, None][mask]
        return out + delta.reshape(out.shape)


class WritesOtherRows(Skipping):
    def forward(self, x):
        out, t, w, idx, delta = self.start(x)
        rows = torch.arange(t.shape[0])
        for e in range(E):
            mask = idx[:, 0] == e
            if not mask.any():
                continue
            delta[rows[:1]] += 1.0  # written whether or not the expert has tokens
            delta[mask] += self.experts[e](t[mask])
        return out + delta.reshape(out.shape)


class ReadsTemporaryLater(Skipping):
    def forward(self, x):
        out, t, w, idx, delta = self.start(x)
        d = torch.zeros(1, OUT)
        for e in range(E):
            mask = idx[:, 0] == e
            if not mask.any():
                continue
            d = self.experts[e](t[mask])
            delta[mask] += d
        return out + delta.reshape(out.shape) + d.sum()  # the last non-empty expert's output


class InPlace(Skipping):
    def forward(self, x):
        out, t, w, idx, delta = self.start(x)
        for e in range(E):
            mask = idx[:, 0] == e
            if not mask.any():
                continue
            d = self.experts[e](t[mask]).mul_(w[:, :1][mask])
            delta[mask] += d
        return out + delta.reshape(out.shape)


class Random(Skipping):
    def forward(self, x):
        out, t, w, idx, delta = self.start(x)
        for e in range(E):
            mask = idx[:, 0] == e
            if not mask.any():
                continue
            delta[mask] += self.experts[e](t[mask]) + 0 * torch.rand_like(t[mask][:, :1])
        return out + delta.reshape(out.shape)


class MutatesModule(Skipping):
    def forward(self, x):
        out, t, w, idx, delta = self.start(x)
        self.used = 0
        for e in range(E):
            mask = idx[:, 0] == e
            if not mask.any():
                continue
            self.used += 1
            delta[mask] += self.experts[e](t[mask])
        return out + delta.reshape(out.shape)


class CallsForward(Skipping):
    """The expert called through a local and ``.forward``: its code is not checked, so not trusted."""

    expert_class = Counting

    def forward(self, x):
        out, t, w, idx, delta = self.start(x)
        experts = self.experts
        for e in range(E):
            mask = idx[:, 0] == e
            if not mask.any():
                continue
            delta[mask] += experts[e].forward(t[mask])
        return out + delta.reshape(out.shape)


class RaisesWhenEmpty(Skipping):
    def forward(self, x):
        out, t, w, idx, delta = self.start(x)
        for e in range(E):
            mask = idx[:, 0] == e
            if not mask.any():
                continue
            d = self.experts[e](t[mask])
            delta[mask] += d / d.abs().max()
        return out + delta.reshape(out.shape)


class CountingExperts(Skipping):
    expert_class = Counting


class IntegerMask(Skipping):
    """The skip tests an integer tensor: an all-zero one indexes row 0 (twice), it does not select nothing."""

    def forward(self, x):
        out, t, w, idx, delta = self.start(x)
        for e in range(E):
            mask = (idx[:, 0] == e).long()
            if not mask.any():
                continue
            delta[mask] += self.experts[e](t[mask])
        return out + delta.reshape(out.shape)


def _run(cls, x):
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():
        eager = model(x)
        report = adafuse_compile.explain(model, x)
        compiled = adafuse_compile.compile(model, inner="eager")(x)
    torch._dynamo.reset()
    return model, eager, report, compiled


# Three tokens over four experts: at least one expert of each slot has no token, so the skip is taken.
X = torch.randn(1, 3, IN)


@pytest.mark.parametrize("cls", [Skipping, TorchAny])
def test_proved_skip_compiles_to_one_graph_with_the_site_fused(cls):
    model, eager, report, compiled = _run(cls, X)
    (branch,) = report.branches
    assert branch.installed and branch.modules == 1, str(report)
    assert report.graph_breaks == 0 and report.count("fused") == 1, str(report)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls, why", [
    (WritesOtherRows, "indexed by something other than `mask`"),
    (ReadsTemporaryLater, "`d`, computed after the skip, is read elsewhere"),
    (InPlace, "writes in place"),
    (Random, "draws random numbers"),
    (MutatesModule, "a statement other than"),
    (CountingExperts, "Counting.forward has a statement other than"),
    (CallsForward, "is not a tensor method, or is also a module's"),
    (RaisesWhenEmpty, "raises on the empty rows"),
])
def test_unproved_skip_stays_with_its_reason(cls, why):
    model, eager, report, compiled = _run(cls, X)
    (branch,) = report.branches
    assert not branch.installed and why in branch.reason, branch.reason
    assert "forward" not in model.__dict__
    assert report.graph_breaks > 0 and report.count("fused") == 0, str(report)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_integer_mask_keeps_the_skip_when_compiling():
    """The copy is installed (the source cannot tell the dtype) but its test keeps the branch for a
    mask that is not boolean: compiled, the empty experts are still skipped, as eagerly."""
    model, eager, report, compiled = _run(IntegerMask, X)
    assert report.branches[0].installed and report.graph_breaks > 0, str(report)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_installed_copy_keeps_the_skip_eagerly_and_in_training():
    torch.manual_seed(0)
    model = Skipping().eval()
    x = torch.randn(1, 1, IN)  # one token: two experts chosen, two skipped
    reports = skip_branches_when_compiling(model)
    assert reports[0].installed and reports[0].modules == 1 and "forward" in model.__dict__
    assert skip_branches_when_compiling(model)[0].modules == 1  # idempotent
    hooks = [expert.register_forward_pre_hook(lambda m, args: m.__dict__.__setitem__("seen", args[0].shape[0]))
             for expert in model.experts]
    with torch.no_grad():
        model(x)
    assert sum("seen" in m.__dict__ for m in model.experts) == K  # the skipped experts never ran
    assert not skip_branches_when_compiling(model)[0].installed  # hooks now: not proved, the copy is removed
    assert "forward" not in model.__dict__
    for hook in hooks:
        hook.remove()
    model.train()
    with torch.no_grad():
        report = adafuse_compile.explain(model, x)
    torch._dynamo.reset()
    assert report.graph_breaks > 0, str(report)  # in training the branch stays when compiling too


def test_each_instance_is_proved_with_its_own_experts():
    """Two modules of one class: the one whose expert has a hook keeps its skip, the other does not."""
    torch.manual_seed(0)
    class Two(nn.ModuleList):
        def forward(self, x):
            return self[0](x) + self[1](x)

    model = Two([Skipping(), Skipping()]).eval()
    model[1].experts[2].register_forward_hook(lambda m, args, out: None)
    (report,) = skip_branches_when_compiling(model)
    assert report.installed and report.modules == 1
    assert "forward" in model[0].__dict__ and "forward" not in model[1].__dict__
    x = torch.randn(1, 3, IN)
    with torch.no_grad():
        eager = model(x)
        compiled = adafuse_compile.compile(model, inner="eager")(x)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
