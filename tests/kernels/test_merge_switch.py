"""adafuse::merge_switch_ / merge_rebase_ against float64 references, opcheck, and drift over many switches."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adafuse_compile import MergedGroup
from adafuse_compile.kernels import merge_rebase_, merge_switch_
from adafuse_compile.kernels.reference import merge_rebase_ref, merge_switch_ref
from adafuse_compile.testing import assert_close_to_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_group(shapes, E, r, *, dtype, shared_A=False, seed=0):
    """Sites of shapes [(out, in), ...] sharing E experts; W ~ 1, delta ~ 1 per element."""
    gen = torch.Generator().manual_seed(seed)
    Ws, As, Bs = [], [], []
    for out_f, in_f in shapes:
        Ws.append(torch.randn(out_f, in_f, generator=gen, dtype=torch.float64).to(dtype))
        As.append(torch.randn(1 if shared_A else E, r, in_f, generator=gen, dtype=torch.float64).to(dtype))
        Bs.append((torch.randn(E, out_f, r, generator=gen, dtype=torch.float64) / r**0.5).to(dtype))
    scales = [float(s) for s in torch.rand(len(shapes), generator=gen) * 2 + 0.5]
    return Ws, As, Bs, scales


def decision(E, k, gen):
    idx = torch.randperm(E, generator=gen)[:k]
    return idx, torch.softmax(torch.randn(k, generator=gen), 0)


def doubles(ts):
    return [t.double() for t in ts]


group_params = st.fixed_dictionaries(
    {
        "shapes": st.lists(st.tuples(st.integers(1, 70), st.integers(1, 70)), min_size=1, max_size=4),
        "E": st.integers(1, 8),
        "r": st.integers(1, 16),
        "k_old": st.integers(0, 8),
        "k_new": st.integers(0, 8),
        "shared_A": st.booleans(),
        "dtype": st.sampled_from(DTYPES),
        "seed": st.integers(0, 2**16),
    }
)


@given(group_params)
def test_switch_matches_reference(p):
    E = p["E"]
    Ws, As, Bs, scales = make_group(p["shapes"], E, p["r"], dtype=p["dtype"], shared_A=p["shared_A"], seed=p["seed"])
    gen = torch.Generator().manual_seed(p["seed"])
    old = decision(E, min(p["k_old"], E), gen)
    new = decision(E, min(p["k_new"], E), gen)
    expected = merge_switch_ref(doubles(Ws), doubles(As), doubles(Bs), scales, *old, *new)
    originals = list(Ws)
    merge_switch_(Ws, As, Bs, scales, *old, *new)
    for W, W0, ref in zip(Ws, originals, expected):
        assert W is W0  # in place
        assert_close_to_reference(W, ref, reduction=2 * E * p["r"])


@given(group_params)
def test_rebase_matches_reference(p):
    E = p["E"]
    bases, As, Bs, scales = make_group(p["shapes"], E, p["r"], dtype=p["dtype"], shared_A=p["shared_A"], seed=p["seed"])
    gen = torch.Generator().manual_seed(p["seed"])
    idx, g = decision(E, min(p["k_new"], E), gen)
    Ws = [torch.full_like(b, float("nan")) for b in bases]  # every element must be overwritten
    merge_rebase_(Ws, bases, As, Bs, scales, idx, g)
    expected = merge_rebase_ref(doubles(bases), doubles(As), doubles(Bs), scales, idx, g.double())
    for W, ref in zip(Ws, expected):
        assert_close_to_reference(W, ref, reduction=E * p["r"])


def test_unchanged_experts_are_not_touched():
    """Switching to the same decision is exactly a no-op: no expert's coefficient changed."""
    Ws, As, Bs, scales = make_group([(33, 17)], 6, 4, dtype=torch.float32)
    before = Ws[0].clone()
    idx, g = torch.tensor([4, 1]), torch.tensor([0.7, 0.3])
    merge_switch_(Ws, As, Bs, scales, idx, g, idx.flip(0), g.flip(0))
    assert torch.equal(Ws[0], before)


def test_bad_group_raises():
    Ws, As, Bs, scales = make_group([(8, 6), (5, 4)], 3, 2, dtype=torch.float32)
    empty = (torch.empty(0, dtype=torch.int64), torch.empty(0))
    with pytest.raises(RuntimeError, match="disagree"):
        merge_switch_(Ws, As[:1], Bs, scales, *empty, *empty)
    with pytest.raises(RuntimeError, match="int64"):
        merge_switch_(Ws, As, Bs, scales, *empty, torch.tensor([1], dtype=torch.int32), torch.ones(1))
    with pytest.raises(RuntimeError, match="disagree"):
        merge_switch_(Ws, [As[1], As[0]], Bs, scales, *empty, *empty)


def test_opcheck():
    Ws, As, Bs, scales = make_group([(9, 7), (5, 11)], 4, 3, dtype=torch.float32)
    old = (torch.tensor([0, 2]), torch.tensor([0.5, 0.5]))
    new = (torch.tensor([2, 3]), torch.tensor([0.25, 0.75]))
    torch.library.opcheck(torch.ops.adafuse.merge_switch_.default, (Ws, As, Bs, scales, *old, *new))
    bases = [w.clone() for w in Ws]
    torch.library.opcheck(torch.ops.adafuse.merge_rebase_.default, (Ws, bases, As, Bs, scales, *new))


def _random_walk(group, bases64, As64, Bs64, scales, steps, E, k, seed):
    """Switch ``steps`` times among a few decisions (repeats included).

    Returns the worst error against the exact merge, and the largest merged weight and the
    largest merged delta seen.
    """
    gen = torch.Generator().manual_seed(seed)
    pool = [decision(E, k, gen) for _ in range(5)]
    worst = biggest = biggest_delta = 0.0
    for _ in range(steps):
        idx, g = pool[int(torch.randint(0, len(pool), (1,), generator=gen))]
        group.switch(idx, g)
        expected = merge_rebase_ref(bases64, As64, Bs64, scales, idx, g.double())
        worst = max(worst, max((W.double() - e).abs().max().item() for W, e in zip(group.weights, expected)))
        biggest = max(biggest, max(e.abs().max().item() for e in expected))
        biggest_delta = max(biggest_delta, max((e - b).abs().max().item() for e, b in zip(expected, bases64)))
    return worst, biggest, biggest_delta


@pytest.mark.parametrize("keep_pristine", [True, False])
def test_thousand_switches_float32_stay_within_drift_bound(keep_pristine):
    E, k, r = 8, 2, 4
    Ws, As, Bs, scales = make_group([(48, 40), (24, 56)], E, r, dtype=torch.float32, seed=1)
    bases64, As64, Bs64 = doubles(Ws), doubles(As), doubles(Bs)
    group = MergedGroup(Ws, As, Bs, scales, keep_pristine=keep_pristine)
    worst, biggest, _ = _random_walk(group, bases64, As64, Bs64, scales, 1000, E, k, seed=2)
    # Documented bound: each incremental switch adds <= ~u * |W'| (u = 2**-24), plus the
    # rounding of the rank-m*r product; 4 u |W'| covers both with margin.
    per_switch = 2**-24 * biggest * 4
    switches = group.rebase_every if keep_pristine else 1000
    assert worst <= switches * per_switch, (worst, switches * per_switch)
    if keep_pristine:
        assert worst < 1e-4  # the bar for a 1,000-step decode
        group.unmerge()
        for W, base in zip(group.weights, bases64):
            assert torch.equal(W.double(), base)  # pristine copy: exactly the backbone again


def test_sixteen_bit_weights_rebase_every_switch_and_never_drift():
    E, k, r = 6, 2, 4
    Ws, As, Bs, scales = make_group([(32, 24)], E, r, dtype=torch.bfloat16, seed=3)
    bases64, As64, Bs64 = doubles(Ws), doubles(As), doubles(Bs)
    group = MergedGroup(Ws, As, Bs, scales)
    assert group.rebase_every == 1
    worst, biggest, biggest_delta = _random_walk(group, bases64, As64, Bs64, scales, 300, E, k, seed=4)
    # After 300 switches, still one merge's worth of bf16 rounding (u = 2**-8): half an ulp of
    # |W'| for the final store, plus the 16-bit rounding of the coefficient-scaled B.
    assert worst <= 2**-8 * (biggest / 2 + biggest_delta)


def test_repeated_decision_is_skipped():
    Ws, As, Bs, scales = make_group([(8, 8)], 4, 2, dtype=torch.float32)
    group = MergedGroup(Ws, As, Bs, scales)
    idx, g = torch.tensor([1, 3]), torch.tensor([0.6, 0.4])
    assert group.switch(idx, g) is True
    assert group.switch(idx.clone(), g.clone()) is False
