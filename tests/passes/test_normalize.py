"""SliceLinearRowsPass: a linear read only in row slices computes those rows only, exactly the
values the slices had; anything else reading the linear keeps it whole."""

import operator

import torch
import torch.nn.functional as F
from torch import nn

from adafuse_compile.passes import SliceLinearRowsPass, graph_ops
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
