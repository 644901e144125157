"""The verification core on small modules: structure (linearity for a fixed decision) and identity
testing with random parameters. Each case is a site the old probe-based check accepted wrongly,
or one it must keep accepting."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adafuse_compile.passes.canonical import canonicalize
from adafuse_compile.passes.sites import find_sites, parameter_values, size_values

E, R, IN, OUT = 4, 3, 10, 6


class Site(nn.Module):
    """A stacked-expert MoLE linear whose adapter path ``between`` A and B can be mutated."""

    def __init__(self, between=None, scale=None, perm=None, zero_B=False, dropout=0.0):
        super().__init__()
        self.base = nn.Linear(IN, OUT)
        self.router = nn.Linear(IN, E, bias=False)
        self.A = nn.Parameter(torch.randn(E, R, IN) / IN ** 0.5)
        self.B = nn.Parameter(torch.zeros(E, OUT, R) if zero_B else torch.randn(E, OUT, R))
        self.between, self.perm, self.dropout = between, perm, dropout
        self.scale = scale if scale is not None else 2.0

    def forward(self, x):
        w, idx = torch.topk(torch.softmax(self.router(x), -1), 2)
        w = w / w.sum(-1, keepdim=True)
        if self.perm is not None:
            idx = self.perm[idx]
        h = torch.einsum("ti,tkri->tkr", F.dropout(x, self.dropout, self.training), self.A[idx])
        if self.between is not None:
            h = self.between(h)
        delta = torch.einsum("tkr,tkor->to", h * w.unsqueeze(-1), self.B[idx])
        scale = self.scale[idx].unsqueeze(-1).sum(1) if isinstance(self.scale, nn.Parameter) and self.scale.dim() \
            else self.scale
        return self.base(x) + delta * scale


def verdicts(module, x, to=None):
    """``[(canonical or None, reason)]`` of every site of ``module(x)``'s Dynamo graph."""
    out = []

    def backend(gm, example_inputs):
        params = parameter_values(gm, example_inputs)
        if to is not None:
            params = {n: p.to(to) for n, p in params.items()}
        sites, rejected = find_sites(gm, example_inputs)
        out.extend(canonicalize(gm, s, params, size_values(gm, example_inputs)) for s in sites)
        out.extend((None, r.reason) for r in rejected)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(module, backend=backend)(x)
    torch._dynamo.reset()
    return out


def test_plain_site_is_proved_with_its_scale():
    ((canon, reason),) = verdicts(Site().eval(), torch.randn(5, IN))
    assert canon is not None and canon.scale == pytest.approx(2.0) and reason.startswith("proved")


@pytest.mark.parametrize("between, op", [(lambda h: torch.clamp(h, -50, 50), "clamp"), (torch.relu, "relu"),
                                         (lambda h: h * h, "mul of two input-dependent values"),
                                         (lambda h: h + 1.0, "affine")])
def test_a_nonlinear_op_between_A_and_B_is_named(between, op):
    """The clamp is never reached by probes (|h| << 50): only the structure check can see it."""
    ((canon, reason),) = verdicts(Site(between).eval(), torch.randn(5, IN))
    assert canon is None and op in reason


def test_active_dropout_is_a_random_op_and_the_rng_is_untouched():
    module = Site(dropout=0.01).train()
    for p in module.parameters():
        p.requires_grad_(False)
    state = torch.get_rng_state()
    torch.manual_seed(123)
    expected = torch.get_rng_state()
    ((canon, reason),) = verdicts(module, torch.randn(5, IN))
    assert canon is None and "dropout" in reason
    torch.manual_seed(123)
    ((canon, _),) = verdicts(Site().eval(), torch.randn(5, IN))  # probing draws: own generators
    torch.manual_seed(123)
    assert canon is not None and torch.equal(torch.get_rng_state(), expected)
    torch.set_rng_state(state)


@pytest.mark.parametrize("scale", [nn.Parameter(torch.tensor(0.5)), nn.Parameter(torch.ones(E))],
                         ids=["learnable scalar", "per-expert vector of ones"])
def test_a_scale_read_from_a_parameter_is_not_baked_in(scale):
    ((canon, reason),) = verdicts(Site(scale=scale).eval(), torch.randn(5, IN))
    assert canon is None, "a parameter's value would be baked into the rewrite"


@pytest.mark.parametrize("zero_B", [True, False])
def test_a_permuted_expert_table_is_left_even_when_B_is_zero_now(zero_B):
    """Swapped experts 1 and 2: with B = 0 today the site computes the same as the canonical
    form, but not once B is trained. Random parameters, not today's, decide."""
    perm = torch.tensor([0, 2, 1, 3])
    ((canon, reason),) = verdicts(Site(perm=perm, zero_B=zero_B).eval(), torch.randn(5, IN))
    assert canon is None


def test_one_token_graphs_still_draw_every_expert():
    """At T=1 a probe chooses only k=2 of E experts: more probes are drawn until all were chosen."""
    class Swapped(Site):  # experts 2 and 3 swapped in the table
        def forward(self, x):
            w, idx = torch.topk(torch.softmax(self.router(x), -1), 2)
            idx = torch.where(idx == 2, 3, torch.where(idx == 3, 2, idx))
            h = torch.einsum("ti,tkri->tkr", x, self.A[idx]) * (w / w.sum(-1, keepdim=True)).unsqueeze(-1)
            return self.base(x) + torch.einsum("tkr,tkor->to", h, self.B[idx])

    ((canon, reason),) = verdicts(Swapped().eval(), torch.randn(1, IN))
    assert canon is None
    ((canon, reason),) = verdicts(Site().eval(), torch.randn(1, IN))
    assert canon is not None and "every expert drawn" in reason


def test_probing_reads_only_shapes_so_parameters_on_any_device_work():
    """Parameters on the meta device have no values at all: the proof must not need them (this
    is what failed on CUDA, where probes were made on the CPU)."""
    ((canon, reason),) = verdicts(Site().eval(), torch.randn(5, IN), to="meta")
    assert canon is not None, reason


def test_an_expert_table_smaller_than_the_router_is_left():
    """Found by the look-alike property (10k run): per-expert lists where every expert uses
    ``B_1`` leave one B among the site's parameters, so a one-expert form (shared A) was fitted
    while the router picks among two. Draws must choose among what the router ranks."""

    class Duplicated(nn.Module):
        def __init__(self):
            super().__init__()
            self.base, self.router = nn.Linear(IN, OUT), nn.Linear(IN, 2, bias=False)
            self.A = nn.ParameterList([nn.Parameter(torch.randn(R, IN)) for _ in range(2)])
            self.B = nn.ParameterList([nn.Parameter(torch.randn(OUT, R)) for _ in range(2)])

        def forward(self, x):
            w, idx = torch.topk(torch.softmax(self.router(x), -1), 1)
            y = self.base(x)
            for e in range(2):
                y = y + ((idx == e) * w).sum(-1, keepdim=True) * (x @ self.A[e].T @ self.B[1].T)
            return y

    ((canon, reason),) = verdicts(Duplicated().eval(), torch.randn(1, IN))
    assert canon is None and "chooses among 2 experts" in reason
