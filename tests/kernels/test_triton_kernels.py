"""The Triton kernels against their float64 references.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` on small CPU tensors (the interpreter
runs each program in numpy, so shapes stay small); with one, the same tests run on CUDA.
"""

import os

import torch

# Must happen before triton is imported (triton.jit picks the interpreter at decoration time).
# tests/conftest.py does the same; setdefault keeps whichever came first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("triton")

from lora_cases import lora_reference  # noqa: E402
from lora_cases import make_lora_case as _make_lora_case  # noqa: E402

from adafuse_compile.kernels import lora_moe_linear_triton as lml  # noqa: E402
from adafuse_compile.kernels import merge_ops_triton as mst  # noqa: E402
from adafuse_compile.kernels.lora_moe_linear_triton import lora_moe_linear_triton  # noqa: E402
from adafuse_compile.kernels.merge_ops_triton import merge_combination_triton  # noqa: E402
from adafuse_compile.kernels.reference import merged_delta_ref  # noqa: E402
from adafuse_compile.testing import assert_close_to_reference as assert_close  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# --------------------------------------------------------------------------------------------
# lora_moe_linear


def make_lora_case(*args, **kw):
    return _make_lora_case(*args, device=DEVICE, **kw)


def check_lora(T, in_f, out_f, r, E, k, *, dtype, scale=2.0, adapter=None, **kw):
    args = make_lora_case(T, in_f, out_f, r, E, k, dtype=dtype, **kw)
    y = lora_moe_linear_triton(*args, scale, adapter=adapter)
    assert y.dtype == dtype and y.shape == (T, out_f)
    assert_close(y, lora_reference(*args, scale), reduction=max(in_f, k * r))
    return y


@st.composite
def lora_params(draw):
    E = draw(st.integers(1, 8))
    return dict(
        T=draw(st.integers(0, 9)),
        in_f=draw(st.integers(1, 70)),
        out_f=draw(st.integers(1, 70)),
        r=draw(st.integers(1, 16)),
        E=E,
        k=draw(st.integers(1, E)),
        dtype=draw(st.sampled_from(DTYPES)),
        shared_A=draw(st.booleans()),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        adapter=draw(st.sampled_from(lml.ADAPTER_PATHS)),
    )


@settings(max_examples=15, deadline=None)
@given(lora_params())
def test_lora_matches_reference(p):
    check_lora(**p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case",
    [
        dict(T=0, in_f=24, out_f=17, r=4, E=3, k=2),  # no tokens: no launch, empty output
        dict(T=5, in_f=33, out_f=21, r=5, E=4, k=4),  # dense gate: k == E
        dict(T=3, in_f=19, out_f=40, r=7, E=1, k=1),  # a single expert
        dict(T=4, in_f=29, out_f=31, r=6, E=5, k=3, shared_A=True),  # HydraLoRA: shared A
        dict(T=2, in_f=45, out_f=66, r=16, E=6, k=2, bias=False),
        dict(T=2, in_f=1100, out_f=20, r=3, E=4, k=2),  # long input: split-K shrink
    ],
    ids=["T0", "k_eq_E", "E1", "shared_A", "no_bias_r16", "split_in"],
)
@pytest.mark.parametrize("adapter", lml.ADAPTER_PATHS)
def test_lora_cases(case, dtype, adapter):
    check_lora(**case, dtype=dtype, adapter=adapter)


class _Launches:
    """A kernel that counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


def test_lora_adapter_path_follows_the_token_count(monkeypatch):
    """The adapter runs as one kernel up to ``ONE_KERNEL_MAX_TOKENS`` tokens (0: never, until
    measured on a GPU), else as the shrink and expand kernels; both give the reference."""
    spies = {name: _Launches(getattr(lml, name)) for name in ("_adapter_kernel", "_shrink_kernel", "_expand_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(lml, name, spy)
    assert lml.ONE_KERNEL_MAX_TOKENS == 0
    check_lora(2, 24, 20, 4, 4, 2, dtype=torch.float32)
    assert [s.count for s in spies.values()] == [0, 1, 1]
    monkeypatch.setattr(lml, "ONE_KERNEL_MAX_TOKENS", 2)
    check_lora(2, 24, 20, 4, 4, 2, dtype=torch.float32)
    check_lora(3, 24, 20, 4, 4, 2, dtype=torch.float32)
    assert [s.count for s in spies.values()] == [1, 2, 2]
    with pytest.raises(ValueError, match="adapter"):
        check_lora(2, 24, 20, 4, 4, 2, dtype=torch.float32, adapter="fast")


def test_lora_split_path_is_taken():
    """The long-input case above really exercises the split reduction (and its partial sums)."""
    *_, split, _ = lml._block_sizes(T=2, k=2, in_f=1100, out_f=20, r=3)
    assert split > 1


@pytest.mark.parametrize("adapter", lml.ADAPTER_PATHS)
def test_lora_duplicate_experts_and_low_precision_gate(adapter):
    """The same expert twice for a token adds both weights; a bf16 gate is read as float."""
    x, W, b, A, B, _, _ = make_lora_case(3, 20, 30, 4, 4, 2, dtype=torch.float32)
    idx = torch.tensor([[1, 1], [0, 3], [2, 2]], device=DEVICE)
    g = torch.tensor([[0.25, 0.5], [1.0, -0.5], [0.3, 0.7]], device=DEVICE).bfloat16()
    y = lora_moe_linear_triton(x, W, b, A, B, idx, g, 1.5, adapter=adapter)
    assert_close(y, lora_reference(x, W, b, A, B, idx, g, 1.5), reduction=20)


@pytest.mark.parametrize("adapter", lml.ADAPTER_PATHS)
def test_lora_non_contiguous_inputs(adapter):
    x, W, b, A, B, idx, g = make_lora_case(4, 23, 19, 3, 3, 2, dtype=torch.float32)
    x_t = x.t().contiguous().t()  # same values, column-major
    B_t = B.transpose(1, 2).contiguous().transpose(1, 2)
    y = lora_moe_linear_triton(x_t, W, b, A, B_t, idx, g, 0.5, adapter=adapter)
    assert_close(y, lora_reference(x, W, b, A, B, idx, g, 0.5), reduction=23)


def test_lora_scale_zero_is_base():
    x, W, b, A, B, idx, g = make_lora_case(3, 10, 12, 2, 2, 1, dtype=torch.float32)
    y = lora_moe_linear_triton(x, W, b, A, B, idx, g, 0.0)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, W, b), atol=0, rtol=0)


def test_lora_rejects_bad_shapes():
    x, W, b, A, B, idx, g = make_lora_case(3, 10, 12, 2, 2, 1, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="rank"):
        lora_moe_linear_triton(x, W, b, A[:, :1], B, idx, g, 1.0)
    with pytest.raises(RuntimeError, match="int64"):
        lora_moe_linear_triton(x, W, b, A, B, idx.int(), g, 1.0)


def test_lora_block_sizes_cover_the_input():
    """Every ``in`` element belongs to exactly one split; tiles are powers of two."""
    for T, k, in_f, out_f, r in [(1, 1, 1, 1, 1), (1, 2, 4096, 4096, 8), (64, 8, 14336, 4096, 16), (3, 2, 1100, 20, 3)]:
        r_pad, block_in, chunk, split, block_out = lml._block_sizes(T, k, in_f, out_f, r)
        for v in (r_pad, block_in, block_out):
            assert v & (v - 1) == 0
        assert r_pad >= r and chunk % block_in == 0
        assert (split - 1) * chunk < in_f <= split * chunk


# --------------------------------------------------------------------------------------------
# merge_combination


def make_sites(shapes, E, r_list, *, dtype, shared_A=False, seed=0):
    """Sites of shapes [(out, in), ...]; W, source ~ 1 and each B[e] @ A[e] ~ 1 per element."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype).to(DEVICE)

    Ws, srcs, As, Bs = [], [], [], []
    for (out_f, in_f), r in zip(shapes, r_list):
        Ws.append(randn(out_f, in_f))
        srcs.append(randn(out_f, in_f))
        As.append(randn(1 if shared_A else E, r, in_f))
        Bs.append(randn(E, out_f, r, std=r**-0.5))
    scales = [float(s) for s in torch.rand(len(shapes), generator=gen) * 2 + 0.5]
    return Ws, srcs, As, Bs, scales


def merge_reference(Ws, sources, As, Bs, scales, ids, coefs):
    """float64 ``src_n + delta_n``; ``merged_delta_ref`` is ``scale * sum_j c_j B[e_j] A[e_j]``."""
    base = Ws if sources is None else sources
    return [
        S.double() + merged_delta_ref(A.double(), B.double(), s, ids, coefs.double())
        for S, A, B, s in zip(base, As, Bs, scales)
    ]


def run_merge(Ws, sources, As, Bs, scales, ids, coefs):
    """Run the kernel, check it updated the very same tensors, and compare to the reference."""
    expected = merge_reference(Ws, sources, As, Bs, scales, ids, coefs)
    originals = [(W, W.data_ptr()) for W in Ws]
    src_before = None if sources is None else [S.clone() for S in sources]
    merge_combination_triton(Ws, sources, As, Bs, scales, ids.to(DEVICE), coefs.to(DEVICE))
    for (W0, ptr), W in zip(originals, Ws):
        assert W is W0 and W.data_ptr() == ptr
    if sources is not None:
        for S, S0 in zip(sources, src_before):
            assert torch.equal(S, S0), "sources must not be modified"
    r_max = max(B.shape[2] for B in Bs)
    for n, (W, ref) in enumerate(zip(Ws, expected)):
        assert_close(W, ref, reduction=max(1, ids.numel() * r_max))


@st.composite
def merge_params(draw):
    E = draw(st.integers(1, 8))
    n = draw(st.integers(1, 3))
    m = draw(st.integers(0, 6))
    return dict(
        shapes=[(draw(st.integers(1, 70)), draw(st.integers(1, 70))) for _ in range(n)],
        r_list=[draw(st.integers(1, 16)) for _ in range(n)],
        E=E,
        ids=torch.tensor([draw(st.integers(0, E - 1)) for _ in range(m)], dtype=torch.int64),
        coefs=torch.tensor([draw(st.floats(-1.5, 1.5)) for _ in range(m)], dtype=torch.float32),
        dtype=draw(st.sampled_from(DTYPES)),
        shared_A=draw(st.booleans()),
        with_sources=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=15, deadline=None)
@given(merge_params())
def test_merge_matches_reference(p):
    Ws, srcs, As, Bs, scales = make_sites(
        p["shapes"], p["E"], p["r_list"], dtype=p["dtype"], shared_A=p["shared_A"], seed=p["seed"]
    )
    run_merge(Ws, srcs if p["with_sources"] else None, As, Bs, scales, p["ids"], p["coefs"])


# Sites of different out/in/r, one spanning several tiles in both dimensions (64 x 128 tiles).
SHAPES = [(37, 45), (70, 130), (1, 1), (16, 3)]
RANKS = [3, 16, 1, 7]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_sources", [False, True], ids=["in_place", "rebase"])
@pytest.mark.parametrize("shared_A", [False, True], ids=["own_A", "shared_A"])
def test_merge_sites_of_different_shapes(dtype, with_sources, shared_A):
    Ws, srcs, As, Bs, scales = make_sites(SHAPES, 5, RANKS, dtype=dtype, shared_A=shared_A, seed=1)
    ids = torch.tensor([2, 0, 4])
    coefs = torch.tensor([0.5, -1.0, 0.75])  # a negative coefficient removes an expert
    run_merge(Ws, srcs if with_sources else None, As, Bs, scales, ids, coefs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_duplicate_ids_add(dtype):
    """An expert listed twice contributes the sum of its coefficients."""
    Ws, srcs, As, Bs, scales = make_sites(SHAPES, 4, RANKS, dtype=dtype, seed=2)
    run_merge(Ws, srcs, As, Bs, scales, torch.tensor([1, 3, 1]), torch.tensor([0.25, -0.5, 0.5]))
    once = [W.clone() for W in Ws]
    merge_combination_triton(Ws, srcs, As, Bs, scales, torch.tensor([1, 3], device=DEVICE),
                             torch.tensor([0.75, -0.5], device=DEVICE))  # fmt: skip
    for W, W1 in zip(Ws, once):
        assert_close(W, W1.double(), reduction=3 * 16)


def test_merge_empty_decision():
    """``m == 0``: with sources the weights become a copy of them; without, nothing changes."""
    Ws, srcs, As, Bs, scales = make_sites(SHAPES, 3, RANKS, dtype=torch.bfloat16, seed=3)
    ids, coefs = torch.zeros(0, dtype=torch.int64, device=DEVICE), torch.zeros(0, device=DEVICE)
    before = [W.clone() for W in Ws]
    merge_combination_triton(Ws, None, As, Bs, scales, ids, coefs)
    assert all(torch.equal(W, W0) for W, W0 in zip(Ws, before))
    merge_combination_triton(Ws, srcs, As, Bs, scales, ids, coefs)
    assert all(torch.equal(W, S) for W, S in zip(Ws, srcs))


def test_merge_one_launch_for_all_sites(monkeypatch):
    """Sites of one dtype share a single launch; a second dtype adds one more."""
    grids = []
    kernel = mst._merge_kernel

    class Counting:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(mst, "_merge_kernel", Counting())
    Ws, srcs, As, Bs, scales = make_sites(SHAPES, 3, RANKS, dtype=torch.float32, seed=4)
    ids, coefs = torch.tensor([0, 2]), torch.tensor([1.0, 0.5])
    run_merge(Ws, None, As, Bs, scales, ids, coefs)
    assert len(grids) == 1 and grids[0][1] == len(SHAPES)

    grids.clear()
    W16, _, A16, B16, s16 = make_sites([(20, 30)], 3, [4], dtype=torch.float16, seed=5)
    run_merge(Ws + W16, None, As + A16, Bs + B16, scales + s16, ids, coefs)
    assert len(grids) == 2


def test_merge_strided_weight_in_place():
    """A transposed (column-major) weight view is updated through its strides."""
    Ws, srcs, As, Bs, scales = make_sites([(33, 20)], 3, [5], dtype=torch.float32, seed=6)
    storage = Ws[0].t().contiguous()  # [in, out]
    W_view = storage.t()  # [out, in], strides (1, out)
    run_merge([W_view], [srcs[0]], As, Bs, scales, torch.tensor([1]), torch.tensor([0.5]))
    assert W_view.data_ptr() == storage.data_ptr()


def test_merge_rejects_mismatched_sites():
    Ws, srcs, As, Bs, scales = make_sites([(8, 6)], 2, [3], dtype=torch.float32)
    ids, coefs = torch.tensor([0], device=DEVICE), torch.tensor([1.0], device=DEVICE)
    with pytest.raises(ValueError, match="disagree"):
        merge_combination_triton(Ws, None, As, [Bs[0][:, :4]], scales, ids, coefs)
    with pytest.raises(ValueError, match="int64"):
        merge_combination_triton(Ws, None, As, Bs, scales, ids.int(), coefs)
    with pytest.raises(ValueError, match="dtype"):
        merge_combination_triton(Ws, None, [As[0].double()], Bs, scales, ids, coefs)


def test_lora_cuda_op_matches_reference_and_opaque_switch():
    """``adafuse::lora_moe_linear_cuda`` (the triton_op compiled CUDA graphs call) runs the same
    kernels; ``opaque_cuda_kernels`` switches what compiled graphs call to the opaque op."""
    from adafuse_compile.kernels import opaque_cuda_kernels
    from adafuse_compile.kernels.lora_moe_linear import cuda_op

    visible = cuda_op()
    assert visible is torch.ops.adafuse.lora_moe_linear_cuda.default
    with opaque_cuda_kernels():
        assert cuda_op() is torch.ops.adafuse.lora_moe_linear.default
        with opaque_cuda_kernels():
            pass
        assert cuda_op() is torch.ops.adafuse.lora_moe_linear.default  # nested: restored to on
    assert cuda_op() is visible
    args = make_lora_case(3, 40, 33, 4, 4, 2, dtype=torch.float32)
    assert_close(visible(*args, 2.0), lora_reference(*args, 2.0), reduction=40)
