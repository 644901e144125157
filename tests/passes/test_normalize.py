"""SliceLinearRowsPass: a linear read only in row slices computes those rows only, exactly the
values the slices had; anything else reading the linear keeps it whole.

MaskedAccumulatePass: ``acc[mask] += v`` with a boolean mask becomes one accumulating
``index_put_``, bitwise the same; an integer index (rows may repeat), another write between the
read and the write back, or a second reader of the rows keeps the Python form."""

import operator

import torch
import torch.nn.functional as F
from torch import nn

from adafuse_compile.passes import MaskedAccumulatePass, SliceLinearRowsPass, graph_ops
from adafuse_compile.testing import check_pass, count_calls


class _PerAdapterRows(nn.Module):
    """MoE-PEFT's shape: the base output sliced per adapter, written back with index_copy_."""

    def __init__(self, other_read=False):
        super().__init__()
        self.base, self.other_read = nn.Linear(16, 12), other_read
        self.register_buffer("rows", torch.arange(8))

    def forward(self, x):
        y = self.base(x)
        out = torch.empty_like(y)
        out.index_copy_(0, self.rows[0:2], y[0:2] + 2.0 * x[0:2, :, :12])
        out.index_copy_(0, self.rows[2:4], y[2:4] - x[2:4, :, :12])
        return out + y.sum() if self.other_read else out


def _capture(module, x):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=backend)(x)
    torch._dynamo.reset()
    return graphs[0]


def test_a_linear_read_in_row_slices_computes_those_rows():
    x = torch.randn(4, 3, 16)
    gm, example_inputs = _capture(_PerAdapterRows(), x)
    rewritten = check_pass(SliceLinearRowsPass(), gm, *example_inputs, example_inputs=example_inputs)
    linears = [n for n in rewritten.graph.nodes if n.target in (F.linear, torch._C._nn.linear)]
    assert len(linears) == 2 and all(n.args[0].target is operator.getitem for n in linears)
    assert count_calls(rewritten, torch.empty_like) == 0 and count_calls(rewritten, graph_ops.empty_linear_output) == 1


def test_a_linear_read_whole_is_kept():
    x = torch.randn(4, 3, 16)
    gm, example_inputs = _capture(_PerAdapterRows(other_read=True), x)
    rewritten = check_pass(SliceLinearRowsPass(), gm, *example_inputs, example_inputs=example_inputs)
    assert count_calls(rewritten, torch._C._nn.linear, F.linear) == 1
    assert count_calls(rewritten, graph_ops.empty_linear_output) == 0


class _MaskedAdds(nn.Module):
    """eulerforge's accumulation, spelled four ways; ``variant`` breaks it."""

    def __init__(self, variant=None):
        super().__init__()
        self.variant = variant

    def forward(self, x, idx):
        acc = torch.zeros(x.shape[0], 6)
        for e in range(3):
            mask = idx == e
            if self.variant == "integer":
                mask = mask.nonzero().squeeze(-1).repeat(2)  # rows twice: a write back is not a sum
            v = x[mask] * (e + 1.0)
            if e == 0:
                acc[mask] += v
            elif e == 1:
                acc[mask] = acc[mask] + v
            elif self.variant == "write between":
                rows = acc[mask]
                acc.mul_(2.0)
                acc[mask] = v + rows
            elif self.variant == "read twice":
                rows = acc[mask]
                acc[mask] = v + rows
                acc = acc + rows.sum()
            else:
                acc[mask] = v + acc[mask]
        return acc


def _masked_graph(variant):
    x, idx = torch.randn(9, 6), torch.tensor([0, 1, 2, 0, 2, 2, 1, 0, 0])
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        torch.compile(_MaskedAdds(variant), backend=backend, fullgraph=True)(x, idx)
    torch._dynamo.reset()
    gm, example_inputs = graphs[0]
    return check_pass(MaskedAccumulatePass(), gm, x, idx, example_inputs=example_inputs)


def test_masked_adds_become_accumulating_index_puts():
    rewritten = _masked_graph(None)
    puts = [n for n in rewritten.graph.nodes if n.op == "call_method" and n.target == "index_put_"]
    assert len(puts) == 3 and all(n.kwargs == {"accumulate": True} for n in puts)
    assert count_calls(rewritten, operator.setitem) == 0


def test_masked_adds_that_are_not_accumulations_are_kept():
    assert count_calls(_masked_graph("integer"), operator.setitem) == 3
    for variant in ("write between", "read twice"):
        rewritten = _masked_graph(variant)
        assert count_calls(rewritten, operator.setitem) == 1, variant  # the first two still rewritten
