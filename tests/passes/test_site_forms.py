"""SiteForms: a proof is reused only by a site of the same structure, and reused correctly."""

import torch
from torch import nn

import adafuse_compile
from adafuse_compile.models import add_lora_moe, tiny_llama
from adafuse_compile.passes.canonical import FORMS
from adafuse_compile.testing import FUSED_SITES, assert_rewrite


class _Site(nn.Module):
    """``base(x) + 2 * sum_k g_k act(x A_e^T) B_e^T``, top-2 of 4 experts."""

    def __init__(self, act, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.act, self.base, self.router = act, nn.Linear(32, 32), nn.Linear(32, 4, bias=False)
        self.A = nn.Parameter(torch.randn(4, 4, 32, generator=g))
        self.B = nn.Parameter(torch.randn(4, 32, 4, generator=g))

    def forward(self, x):
        w, idx = torch.topk(torch.softmax(self.router(x), -1), 2)
        h = self.act(torch.einsum("ti,tkri->tkr", x, self.A[idx]))
        return self.base(x) + 2.0 * torch.einsum("tk,tkr,tkor->to", w, h, self.B[idx])


def test_the_layers_of_a_model_share_one_proof_per_projection():
    model = add_lora_moe(tiny_llama("tiny", num_hidden_layers=2), experts=4, top_k=2, rank=4).eval()
    ids = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(0))
    FORMS.clear()
    with torch.no_grad():
        report = adafuse_compile.explain(model, ids)
        probed = [s for s in report.sites]
        # probed once per distinct structure (k/v and gate/up look alike), all of layer 1 reused
        assert len(FORMS) <= 7 and FORMS.hits == 14 - len(FORMS)
        assert_rewrite(model, ids, after=(FUSED_SITES,))  # the reused forms map onto layer 1's nodes
        FORMS.clear()
        fresh = adafuse_compile.explain(model, ids)  # the same outcomes when everything is probed
    assert [(s.path, s.status, s.experts, s.k, s.rank, s.gate, s.scale) for s in probed] == [
        (s.path, s.status, s.experts, s.k, s.rank, s.gate, s.scale) for s in fresh.sites]
    assert report.count("fused") == 14


class _TwoSites(nn.Module):
    """Two sites with the same parameter shapes; the second differs by one op between A and B."""

    def __init__(self, second: str):
        super().__init__()
        self.a = _Site(torch.nn.Identity(), seed=0)
        self.b = _Site(torch.relu if second == "relu" else torch.nn.Identity(), seed=1)

    def forward(self, x):
        return self.b(self.a(x))


def test_a_site_that_differs_by_one_op_is_probed_not_matched():
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    FORMS.clear()
    with torch.no_grad():
        report = adafuse_compile.explain(_TwoSites("relu"), x)
    assert [s.status for s in report.sites] == ["fused", "left"], str(report)
    assert "relu" in report.sites[1].reason
    assert FORMS.hits == 0
    with torch.no_grad():
        report = adafuse_compile.explain(_TwoSites("none"), x)
    assert [s.status for s in report.sites] == ["fused", "fused"] and FORMS.hits == 2  # both seen before
    with torch.no_grad():  # the second site reads the first's output: after fusing it, its fused node
        (rw,) = assert_rewrite(_TwoSites("none"), x, after=(FUSED_SITES,))
    assert [s.status for s in rw.sites] == ["fused", "fused"]
