"""Site finding on small hand-built graphs: what is a site, what ends its add chain, what is
rejected and why, and that finding never changes the graph."""

import torch
import torch.nn as nn

from adafuse_compile.passes.sites import find_sites


def _graph(module, *inputs):
    """The Dynamo graph of ``module(*inputs)`` and its example inputs, as a backend sees them."""
    captured = []

    def grab(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(module, backend=grab, fullgraph=True)(*inputs)
    torch._dynamo.reset()
    return captured[0]


class Lora(nn.Module):
    """``base(x) + B(A(x)) * s``, plus optional extras that are not adapter terms."""

    def __init__(self, residual=False, other_input=False, reads_base=False):
        super().__init__()
        self.base, self.A, self.B = nn.Linear(8, 6), nn.Linear(8, 2, bias=False), nn.Linear(2, 6, bias=False)
        self.residual, self.other_input, self.reads_base = residual, other_input, reads_base

    def forward(self, x, h):
        y = self.base(x)
        if self.reads_base:
            return y + self.B(self.A(x)) * y.sum()
        y = y + self.B(self.A(h if self.other_input else x)) * 2.0
        return y + x[..., :6] if self.residual else y


def test_a_static_lora_is_one_site_with_its_parameters():
    gm, inputs = _graph(Lora().eval(), torch.randn(3, 8), torch.randn(3, 8))
    (site,), rejected = find_sites(gm, inputs)
    assert rejected == [] and len(site.terms) == 1 and site.bias is not None
    assert sorted(p.name for p in site.params) == sorted(["l_self_modules_a_parameters_weight_",
                                                          "l_self_modules_b_parameters_weight_"])
    assert site.externals == [] and site.x.name == "l_x_"


def test_a_residual_of_the_input_ends_the_add_chain():
    gm, inputs = _graph(Lora(residual=True).eval(), torch.randn(3, 8), torch.randn(3, 8))
    (site,), _ = find_sites(gm, inputs)
    assert len(site.terms) == 1  # the adapter, not x[..., :6] (no parameter: not an adapter)
    assert site.out.target is not None and any(u.op == "call_function" for u in site.out.users)


def test_a_term_computed_from_another_activation_is_not_an_adapter():
    """``base(x) + B(A(h))``: the term does not read ``x``, so it ends the chain (a residual)."""
    gm, inputs = _graph(Lora(other_input=True).eval(), torch.randn(3, 8), torch.randn(3, 8))
    assert find_sites(gm, inputs) == ([], [])


def test_a_term_reading_the_base_output_is_not_a_site():
    """``y + B(A(x)) * y.sum()``: the base output has another user, so there is no add chain."""
    gm, inputs = _graph(Lora(reads_base=True).eval(), torch.randn(3, 8), torch.randn(3, 8))
    assert find_sites(gm, inputs) == ([], [])


def test_finding_sites_never_changes_the_graph():
    gm, inputs = _graph(Lora().eval(), torch.randn(3, 8), torch.randn(3, 8))
    before = str(gm.graph)
    find_sites(gm, inputs)
    assert str(gm.graph) == before
    traced = torch.fx.symbolic_trace(Lora().eval())
    before = str(traced.graph)
    assert find_sites(traced) == ([], [])  # nn.Linear modules are call_module: NormalizeLinearsPass first
    assert str(traced.graph) == before


class _Buffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("proto", torch.randn(4, 8))  # read only: a weight (Arrow's prototypes)
        self.register_buffer("cache", torch.zeros(3, 4, 8))  # written in the forward: state, not a weight
        self.register_buffer("counts", torch.zeros(4))

    def forward(self, x):
        self.cache[0] = x  # through a view of the buffer
        self.counts.add_(1.0)
        return x @ self.proto.T + self.cache.sum(0) @ self.proto.T + self.counts


def test_buffers_the_graph_never_writes_are_weights_written_ones_are_not():
    from adafuse_compile.passes.sites import parameter_values

    seen = {}

    def backend(gm, example_inputs):
        values = parameter_values(gm, example_inputs)
        seen.update({name: any(v is getattr(module, name) for v in values.values())
                     for name in ("proto", "cache", "counts")})
        return gm.forward

    module = _Buffers()
    torch._dynamo.reset()
    torch.compile(module, backend=backend)(torch.randn(4, 8))
    torch._dynamo.reset()
    assert seen == {"proto": True, "cache": False, "counts": False}
