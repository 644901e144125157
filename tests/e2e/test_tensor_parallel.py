"""Sites whose base linear is sharded by ``torch.distributed.tensor.parallel`` (DTensor weights).

Dynamo captures such a linear as ``from_local(x) -> linear(x, W_shard) -> redistribute ->
to_local``, with the adapter terms reading the local ``x`` and added after ``to_local``. The fused
ops take plain local tensors, so the site is left, and the report says so (it used to vanish: no
site, no reason). A plain sharded linear without adapter terms is no site at all.

Two process groups: a fake one of two ranks (real shard shapes, collectives that do nothing, so
only the report is checked) and a real one-rank gloo group (same graph structure, real numbers).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import adafuse_compile
from adafuse_compile.models.layers import LoRAMoELinear

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.col = LoRAMoELinear(nn.Linear(32, 48), experts=4, rank=4, top_k=2)  # adapted, column-parallel
        self.row = LoRAMoELinear(nn.Linear(48, 32), experts=4, rank=4, top_k=2)  # adapted, row-parallel
        self.plain = nn.Linear(32, 32)  # sharded, no adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plain(self.row(torch.relu(self.col(x))))


def _parallelize(model: _Model, world: int) -> _Model:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    # Replicated outputs and inputs: the adapters read and write full activations on each rank.
    parallelize_module(model.col.base_layer, mesh, ColwiseParallel(output_layouts=Replicate()))
    parallelize_module(model.row.base_layer, mesh, RowwiseParallel(input_layouts=Replicate()))
    parallelize_module(model.plain, mesh, ColwiseParallel(output_layouts=Replicate()))
    return model


@pytest.fixture
def process_group(request, tmp_path):
    backend, world = request.param
    if backend == "fake":
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    else:
        dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=world)
    yield world
    dist.destroy_process_group()
    torch._dynamo.reset()


def _assert_left_with_reason(report) -> None:
    assert [s.path for s in report.sites] == ["col", "row"], str(report)
    assert report.count("left") == 2 and report.count("fused") == 0, str(report)
    assert all("DTensor" in s.reason and "tensor-parallel" in s.reason for s in report.sites), str(report)


@pytest.mark.parametrize("process_group", [("fake", 2)], indirect=True)
def test_sharded_sites_are_reported_left(process_group):
    model = _parallelize(_Model().eval(), process_group)
    assert type(model.col.base_layer.weight).__name__ == "DTensor"
    with torch.no_grad():
        report = adafuse_compile.explain(model, torch.randn(3, 32))
    _assert_left_with_reason(report)


@pytest.mark.parametrize("process_group", [("gloo", 1)], indirect=True)
def test_sharded_sites_compile_to_eager_output(process_group):
    model = _parallelize(_Model().eval(), process_group)
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = model(x)
        report = adafuse_compile.explain(model, x)
        got = adafuse_compile.compile(model, inner="eager")(x)
    _assert_left_with_reason(report)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
