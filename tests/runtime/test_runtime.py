"""The run-time state compiled graphs call into: merged copies that never drift, the per-step
mode of a switched group, and the cost model that chooses it."""

import torch

from adafuse_compile.runtime.cost_model import GAIN, CostModel, GroupShape, T
from adafuse_compile.runtime.merge_state import MergedGroup, SwitchedGroup


def test_merge_drift_stays_bounded_without_rebase_from_the_model():
    """The incremental switches alone (no re-base) over 1000 decisions stay within fp32 rounding."""
    torch.manual_seed(0)
    W = [torch.randn(32, 24), torch.randn(16, 32)]
    As = [torch.randn(6, 3, 24) * 0.3, torch.randn(6, 3, 32) * 0.3]
    Bs = [torch.randn(6, 32, 3) * 0.3, torch.randn(6, 16, 3) * 0.3]
    copies = [w.clone() for w in W]
    group = MergedGroup(copies, As, Bs, [2.0, 2.0], pristine=W, rebase_every=10_000)
    for _ in range(1000):
        idx = torch.randperm(6)[:2]
        group.switch(idx, torch.rand(2))
    expected = [w + 2.0 * torch.einsum("k,kor,kri->oi", group.g, B[group.idx], A[group.idx])
                for w, A, B in zip(W, As, Bs)]
    for got, want in zip(group.weights, expected):
        assert (got - want).abs().max() <= 1e-4


def test_merge_strategy_falls_back_to_fused_when_tokens_disagree():
    state = SwitchedGroup("merge", None)
    W, A, B = torch.randn(5, 4), torch.randn(3, 2, 4), torch.randn(3, 5, 2)
    state.step(torch.tensor([[0, 1], [1, 2]]), torch.rand(2, 2), [W], [A], [B], [1.0])
    assert not state.use_merged and state.merged is None  # no copies made for a fused step
    state.step(torch.tensor([[0, 1], [0, 1]]), torch.ones(2, 2), [W], [A], [B], [1.0])
    assert state.use_merged


def _shape(sites=4, features=1024, bytes_per_element=4):
    return GroupShape((features,) * sites, (features,) * sites, rank=8, k=2, experts=8,
                      bytes_per_element=bytes_per_element)


def test_cost_model_threshold_is_where_the_gain_changes_sign():
    model = CostModel(_shape())
    for rate in (1.0, 0.1, 0.01):
        t = model.threshold(rate)
        assert t is not None and model.merge_pays(t, rate) and (t == 1 or not model.merge_pays(t - 1, rate))
    # Rarer switches make merging pay sooner; a decision that never changes pays from T=1.
    assert model.threshold(1.0) > model.threshold(0.1) >= model.threshold(0.01) >= model.threshold(0.0) == 1
    assert not model.merge_pays(0, 0.0)


def test_cost_model_expressions():
    """The gain grows with T (the fused op's extra work is per token; the switch is not), and
    at p = 1 the switch moves twice the group's weight bytes."""
    values = _shape().values()
    gain = GAIN.subs(values)
    p = [s for s in gain.free_symbols if s.name == "p"][0]
    assert gain.free_symbols == {T, p}
    samples = [float(gain.subs({T: t, p: 1.0})) for t in (1, 8, 64, 512, 4096)]
    assert samples == sorted(samples)
    model = CostModel(_shape())
    assert model.estimate(1)["switch"] >= 2 * 4 * 1024 * 1024 * 4 / 18e9
    assert model.estimate(1)["fused"] < model.estimate(1, 1.0)["merge"]  # T=1, new decision: fused
    assert model.estimate(1, 0.0)["merge"] < model.estimate(1)["fused"]  # T=1, same decision: merged


def test_auto_merges_once_the_decision_stops_changing():
    """The guard uses the observed switch rate: a decision repeated step after step gets merged;
    one that changes every step stays fused (T=1, this CPU's constants)."""
    shape = GroupShape((64,), (64,), 4, 2, 4, 4)
    W, A, B = torch.randn(64, 64), torch.randn(4, 4, 64), torch.randn(4, 64, 4)
    state = SwitchedGroup("auto", CostModel(shape))
    steady = (torch.tensor([[1, 3]]), torch.tensor([[0.6, 0.4]]))
    modes = []
    for _ in range(40):
        state.step(*steady, [W], [A], [B], [1.0])
        modes.append(state.use_merged)
    assert not modes[0] and modes[-1]
    changing = SwitchedGroup("auto", CostModel(shape))
    for i in range(40):
        changing.step(torch.tensor([[i % 4, (i + 1) % 4]]), torch.rand(1, 2), [W], [A], [B], [1.0])
        assert not changing.use_merged


def test_switched_ops_stay_out_of_cuda_graphs_and_fused_ops_do_not():
    """A CUDA graph would replay the merge-switch's per-step Python choice frozen: Inductor's own
    predicate must call the switched ops unsafe (it then runs them outside its CUDA graphs), and
    must leave the stateless fused ops capturable."""
    from torch._inductor.utils import is_cudagraph_unsafe_fx_node

    def node_calling(op):
        graph = torch.fx.Graph()
        return graph.call_function(op, ())

    ops = torch.ops.adafuse
    for op in (ops.group_decide.default, ops.group_site_linear.default):
        assert is_cudagraph_unsafe_fx_node(node_calling(op)), op
    for op in (ops.lora_moe_linear.default, ops.lora_moe_linear_lists.default, ops.routed_lora_moe_linear.default):
        assert not is_cudagraph_unsafe_fx_node(node_calling(op)), op
