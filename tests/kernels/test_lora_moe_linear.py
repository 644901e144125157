"""adafuse::lora_moe_linear and adafuse::lora_moe_linear_lists against their float64 reference, on both
CPU paths, plus opcheck."""

import importlib
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lora_cases import lora_reference as reference
from lora_cases import make_lora_case as make_case

from adafuse_compile.kernels import lora_moe_linear, lora_moe_linear_lists
from adafuse_compile.kernels.cpu_extension import load_cpu_kernels
from adafuse_compile.kernels.lora_moe_linear import lora_moe_linear_torch
from adafuse_compile.testing import assert_close_to_reference

# The module, not the function that adafuse_compile.kernels re-exports under the same name.
op_module = importlib.import_module("adafuse_compile.kernels.lora_moe_linear")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


case_params = st.fixed_dictionaries(
    {
        "T": st.integers(0, 64),
        "in_f": st.integers(1, 80),
        "out_f": st.integers(1, 80),
        "r": st.integers(1, 16),
        "E": st.integers(1, 8),
        "k_frac": st.floats(0, 1),
        "dtype": st.sampled_from(DTYPES),
        "shared_A": st.booleans(),
        "bias": st.booleans(),
        "dup": st.booleans(),
        "scale": st.sampled_from([0.5, 1.0, 2.0, 0.0]),
        "seed": st.integers(0, 2**16),
    }
)


def _aten_base(W: torch.Tensor) -> torch.Tensor:
    """W's values stored column-major: the C++ kernel leaves such a base linear to ATen on every
    CPU, and then adds the adapter with the GEMMs from T*k >= 64E (float32), with the loops below."""
    return W.t().contiguous().t()


# Token counts and W layouts that reach each float32 path of the C++ kernel on any CPU: its own
# base linear with the loops (where AVX-512 is), ATen's base with the loops, ATen's base with the
# GEMMs; and 128 tokens with W as it is (the kernel's base and the loops on AVX-512 CPUs other
# than Intel's, the GEMMs on Intel's, see fused_base in the kernel).
PATHS = pytest.mark.parametrize("T,aten_base", [(3, False), (40, True), (128, True), (128, False)],
                                ids=["loops", "loops-aten-base", "gemm", "T128"])


def _run_case(p, impl=lora_moe_linear):
    k = 1 + int(p["k_frac"] * (p["E"] - 1))
    args = make_case(
        p["T"], p["in_f"], p["out_f"], p["r"], p["E"], k, dtype=p["dtype"],
        shared_A=p["shared_A"], bias=p["bias"], seed=p["seed"], dup=p["dup"],
    )
    y = impl(*args, p["scale"])
    assert y.dtype == p["dtype"] and y.shape == (p["T"], p["out_f"])
    assert_close_to_reference(y, reference(*args, p["scale"]), reduction=p["in_f"] + k * p["r"])


@pytest.mark.parametrize("op", ["lora_moe_linear", "lora_moe_linear_lists", "routed_lora_moe_linear"])
def test_cpu_kernel_is_built_and_registered(op):
    """CI has a compiler: the C++ kernels must serve the ops, or the tests test the fallbacks."""
    assert load_cpu_kernels()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"adafuse::{op}", "CPU")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mapped libraries")
def test_cpu_kernel_is_built_with_openmp():
    """Compiled without -fopenmp, at::parallel_for is a serial loop: the kernel's threads (and
    its thread-count test below) silently become one. The library must need libgomp."""
    assert load_cpu_kernels()
    # The path is the sixth field; " (deleted)" follows it when another process rebuilt the
    # library in the shared torch_extensions cache meanwhile (the file there is the same build).
    libs = {line.split(maxsplit=5)[-1].strip().removesuffix(" (deleted)")
            for line in open("/proc/self/maps") if "adafuse_cpu_kernels" in line}
    assert libs, "the C++ kernels' library is not mapped"
    dynamic = subprocess.run(["readelf", "-d", *libs], capture_output=True, text=True, check=True).stdout
    assert "libgomp" in dynamic


@given(case_params)
def test_matches_reference(p):
    # T in 0..64 with k <= E covers the C++ kernel's token loops, and its GEMM path in half
    # precision (from T*k >= 8E) and, on Intel's CPUs, in float32 with few experts (from T*k >=
    # 64E; elsewhere the kernel's own base linear keeps these on the loops; the fixed cases
    # below take the GEMMs on every CPU).
    load_cpu_kernels()
    _run_case(p)


@pytest.mark.parametrize("path", ["gathered", "dense"])
@given(p=case_params)
def test_pure_torch_paths_match_reference(path, p):
    # The fallback, with one path forced whatever T*k/E says, so each is covered on every shape.
    threshold = float("inf") if path == "gathered" else 0.0
    with mock.patch.object(op_module, "_DENSE_MIN_PAIRS_PER_EXPERT", threshold):
        _run_case(p, impl=lora_moe_linear_torch)


@pytest.mark.parametrize(
    "T,E,k,shared_A",
    [(0, 4, 2, False), (3, 5, 5, False), (4, 1, 1, False), (6, 6, 6, True), (1, 8, 2, True),
     (64, 2, 2, False), (192, 3, 1, True)],
    ids=["empty-T", "k==E", "E==1", "dense-gate-shared-A", "decode-shared-A", "gemm-path",
         "gemm-path-shared-A"],
)
@pytest.mark.parametrize("aten_base", [False, True], ids=["W", "W-column-major"])
def test_edge_cases(T, E, k, shared_A, aten_base):
    x, W, *rest = make_case(T, 37, 29, 5, E, k, dtype=torch.float32, shared_A=shared_A)
    args = (x, _aten_base(W) if aten_base else W, *rest)
    assert_close_to_reference(lora_moe_linear(*args, 2.0), reference(*args, 2.0), reduction=37)


def test_leading_dims_are_flattened_and_restored():
    x, W, b, A, B, idx, g = make_case(6, 24, 16, 4, 4, 2, dtype=torch.float32)
    y = lora_moe_linear(x.view(2, 3, 24), W, b, A, B, idx.view(2, 3, 2), g.view(2, 3, 2), 1.5)
    assert y.shape == (2, 3, 16)
    torch.testing.assert_close(y.view(6, 16), lora_moe_linear(x, W, b, A, B, idx, g, 1.5))


def test_low_precision_model_with_float32_routing():
    x, W, b, A, B, idx, g = make_case(5, 40, 24, 8, 8, 2, dtype=torch.bfloat16)
    assert g.dtype == torch.float32
    y = lora_moe_linear(x, W, b, A, B, idx, g, 2.0)
    assert y.dtype == torch.bfloat16
    assert_close_to_reference(y, reference(x, W, b, A, B, idx, g, 2.0), reduction=40)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a: a.__setitem__(0, a[0][:, :-1]), "features"),
        (lambda a: a.__setitem__(5, a[5].int()), "int64"),
        (lambda a: a.__setitem__(4, a[4][:, :-1]), "outputs"),
        (lambda a: a.__setitem__(3, a[3][:, :-1]), "rank"),
        (lambda a: a.__setitem__(1, a[1].double()), "weight is .* but x is"),
        (lambda a: a.__setitem__(6, a[6][:, :1]), "must match idx"),
    ],
    ids=["x-width", "idx-dtype", "B-out", "A-rank", "weight-dtype", "g-shape"],
)
@pytest.mark.parametrize("impl", [lora_moe_linear, lora_moe_linear_torch], ids=["op", "torch-path"])
def test_bad_arguments_raise_clear_errors(mutate, message, impl):
    load_cpu_kernels()
    args = list(make_case(3, 16, 12, 4, 4, 2, dtype=torch.float32))
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        impl(*args, 1.0)


def test_out_of_range_expert_index_raises():
    load_cpu_kernels()
    x, W, b, A, B, idx, g = make_case(2, 16, 12, 4, 4, 2, dtype=torch.float32)
    idx[1, 0] = 4
    with pytest.raises((RuntimeError, IndexError), match="expert|index"):
        lora_moe_linear(x, W, b, A, B, idx, g, 1.0)


def test_opcheck():
    load_cpu_kernels()  # check the kernel that serves CPU calls
    op = torch.ops.adafuse.lora_moe_linear.default
    for T, shared_A, bias in [(1, False, True), (7, True, False), (0, False, True), (12, False, False)]:
        args = make_case(T, 20, 13, 3, 5, 2, dtype=torch.float32, shared_A=shared_A, bias=bias)
        torch.library.opcheck(op, (*args, 2.0))


def test_traces_with_dynamic_token_count():
    """The fake impl lets Dynamo/AOTAutograd trace the op once for any T."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lora_moe_linear, backend=counter, dynamic=True, fullgraph=True)
    compiled_after_first = None
    for T in (6, 7, 11):  # distinct from every other dim, or duck sizing ties them
        args = make_case(T, 20, 13, 3, 5, 2, dtype=torch.float32)
        torch.testing.assert_close(f(*args, 2.0), lora_moe_linear(*args, 2.0))
        compiled_after_first = compiled_after_first or counter.frame_count
    assert counter.frame_count == compiled_after_first, "a new token count recompiled"


def test_backward_raises_instead_of_returning_wrong_gradients():
    """No autograd formula yet: training through the op must fail loudly, never silently."""
    x, W, b, A, B, idx, g = make_case(3, 16, 12, 4, 4, 2, dtype=torch.float32)
    A.requires_grad_(True)
    y = lora_moe_linear(x, W, b, A, B, idx, g, 1.0)
    with pytest.raises(RuntimeError, match="derivative for adafuse::lora_moe_linear is not implemented"):
        y.sum().backward()


def test_disabling_the_cpu_kernel_falls_back_to_the_torch_path():
    code = (
        "import torch\n"
        "from adafuse_compile.kernels import lora_moe_linear\n"
        "from adafuse_compile.kernels.reference import lora_moe_linear_ref\n"
        "x, W = torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)\n"
        "A, B = torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(3, 4, 2, dtype=torch.float64)\n"
        "idx, g = torch.tensor([[0, 1], [2, 1]]), torch.rand(2, 2, dtype=torch.float64)\n"
        "for _ in range(2):\n"
        "    y = lora_moe_linear(x, W, None, A, B, idx, g, 2.0)\n"
        "torch.testing.assert_close(y, lora_moe_linear_ref(x, W, None, A, B, idx, g, 2.0))\n"
        "assert not torch._C._dispatch_has_kernel_for_dispatch_key('adafuse::lora_moe_linear', 'CPU')\n"
    )
    env = {**os.environ, "ADAFUSE_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


# --- adafuse::lora_moe_linear_lists, and the in-place reads of strided factors ------------------


def _as_lists(A, B):
    """Stacked factors as lists of per-expert tensors (a shared A -> a one-element list)."""
    return list(A.unbind(0)), list(B.unbind(0))


def _lists_impl(x, W, b, A, B, idx, g, scale):
    return lora_moe_linear_lists(x, W, b, *_as_lists(A, B), idx, g, scale)


@given(case_params)
def test_lists_matches_reference(p):
    # Same draws as test_matches_reference (the token loops, and the GEMM path where T*k/E reaches it).
    load_cpu_kernels()
    _run_case(p, impl=_lists_impl)


def _layout(t, how):
    """The values of ``t [..., m, n]`` in another memory layout.

    ``transposed``: stored ``[..., n, m]`` and viewed back (unit stride on dim -2, read in place);
    ``step2``: every other column of a wider tensor (no unit stride: the kernel must copy);
    ``expanded`` (stacked only): expert 0 broadcast over the experts with stride 0.
    """
    if how == "contiguous":
        return t.contiguous()
    if how == "transposed":
        v = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert v.stride(-2) == 1 or t.shape[-2] == 1
        return v
    if how == "step2":
        wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        wide[..., ::2] = t
        v = wide[..., ::2]
        assert v.stride(-1) == 2
        return v
    if how == "expanded":
        return t[:1].expand_as(t)
    raise ValueError(how)


def _list_layout(ts, how):
    """Per-expert tensors ``[m, n]`` in one layout; ``mixed``: expert 0 contiguous, the others
    transposed views (different strides: the kernel must copy them all)."""
    if how == "mixed":
        return [t.contiguous() if e == 0 else _layout(t, "transposed") for e, t in enumerate(ts)]
    return [_layout(t, how) for t in ts]


STACKED_LAYOUTS = ["contiguous", "transposed", "step2", "expanded"]
LIST_LAYOUTS = ["contiguous", "transposed", "step2", "mixed"]


@PATHS
@pytest.mark.parametrize("r", [5, 8])
@pytest.mark.parametrize("shared_A", [False, True], ids=["own-A", "shared-A"])
@pytest.mark.parametrize("b_layout", STACKED_LAYOUTS[:3])
@pytest.mark.parametrize("a_layout", STACKED_LAYOUTS)
def test_stacked_strided_factors(a_layout, b_layout, shared_A, r, T, aten_base):
    load_cpu_kernels()
    x, W, b, A, B, idx, g = make_case(T, 37, 29, r, 4, 2, dtype=torch.float32, shared_A=shared_A, seed=r + T)
    W = _aten_base(W) if aten_base else W
    A_s, B_s = _layout(A, a_layout), _layout(B, b_layout)
    ref = reference(x, W, b, A_s, B_s, idx, g, 2.0)
    y = lora_moe_linear(x, W, b, A_s, B_s, idx, g, 2.0)
    assert_close_to_reference(y, ref, reduction=37)
    # The same values stored contiguously give the same result.
    y_contig = lora_moe_linear(x, W, b, A_s.contiguous(), B_s.contiguous(), idx, g, 2.0)
    assert_close_to_reference(y, y_contig.double(), reduction=37)


@PATHS
@pytest.mark.parametrize("r", [5, 8])
@pytest.mark.parametrize("shared_A", [False, True], ids=["own-A", "shared-A"])
@pytest.mark.parametrize("b_layout", LIST_LAYOUTS)
@pytest.mark.parametrize("a_layout", LIST_LAYOUTS)
def test_lists_strided_factors(a_layout, b_layout, shared_A, r, T, aten_base):
    load_cpu_kernels()
    x, W, b, A, B, idx, g = make_case(T, 37, 29, r, 4, 2, dtype=torch.float32, shared_A=shared_A, seed=r + T)
    W = _aten_base(W) if aten_base else W
    As, Bs = _as_lists(A, B)
    As, Bs = _list_layout(As, a_layout), _list_layout(Bs, b_layout)
    y = lora_moe_linear_lists(x, W, b, As, Bs, idx, g, 2.0)
    assert_close_to_reference(y, reference(x, W, b, A, B, idx, g, 2.0), reduction=37)
    y_stacked = lora_moe_linear(x, W, b, A, B, idx, g, 2.0)
    assert_close_to_reference(y, y_stacked.double(), reduction=37)


@pytest.mark.parametrize(
    "layout", [("transposed", "transposed"), ("transposed", "contiguous"), ("contiguous", "transposed"),
               ("step2", "step2"), ("expanded", "transposed")],
    ids=lambda lay: "-".join(lay),
)
@given(p=case_params, lists=st.booleans())
def test_strided_factors_match_reference(layout, p, lists):
    # Random shapes include the degenerate ones (r, in or out of 1) whose strides are ambiguous.
    load_cpu_kernels()
    a_layout, b_layout = layout
    if lists:
        a_layout = "mixed" if a_layout == "expanded" else a_layout

        def impl(x, W, b, A, B, idx, g, scale):
            As, Bs = _as_lists(A, B)
            return lora_moe_linear_lists(x, W, b, _list_layout(As, a_layout), _list_layout(Bs, b_layout),
                                         idx, g, scale)
    else:
        def impl(x, W, b, A, B, idx, g, scale):
            return lora_moe_linear(x, W, b, _layout(A, a_layout), _layout(B, b_layout), idx, g, scale)

    if not lists and a_layout == "expanded":
        # The reference must see the broadcast values too.
        k = 1 + int(p["k_frac"] * (p["E"] - 1))
        args = list(make_case(
            p["T"], p["in_f"], p["out_f"], p["r"], p["E"], k, dtype=p["dtype"],
            shared_A=p["shared_A"], bias=p["bias"], seed=p["seed"], dup=p["dup"],
        ))
        args[3] = _layout(args[3], "expanded")
        y = lora_moe_linear(*args[:4], _layout(args[4], b_layout), *args[5:], p["scale"])
        assert_close_to_reference(y, reference(*args, p["scale"]), reduction=p["in_f"] + k * p["r"])
        return
    _run_case(p, impl=impl)


# Each fixed-rank expand (4..64), generic ranks, out = 37 (the AVX2 path's 5-row scalar tail).
# float32 with r % 8 == 0 takes the AVX2 path where built with it; the other dtypes take the
# compile-time-rank loops.
@pytest.mark.parametrize("T", [1, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r", [4, 8, 16, 32, 64, 5, 12])
@pytest.mark.parametrize("lists", [False, True], ids=["stacked", "lists"])
def test_every_rank_path(lists, r, dtype, T):
    load_cpu_kernels()
    x, W, b, A, B, idx, g = make_case(T, 24, 37, r, 4, 2, dtype=dtype, seed=r * 10 + T)
    impl = _lists_impl if lists else lora_moe_linear
    y = impl(x, W, b, A, B, idx, g, 1.5)
    assert_close_to_reference(y, reference(x, W, b, A, B, idx, g, 1.5), reduction=24 + 2 * r)


# Where the C++ kernel computes decode-sized base linears itself (-march=native on AVX-512): up
# to 32 tokens on Intel's CPUs, 1024 on others (fused_base in the kernel).
_CPUINFO = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
_AVX512 = "avx512f" in _CPUINFO
_OWN_BASE_MAX_TOKENS = 32 if "GenuineIntel" in _CPUINFO else 1024


@pytest.mark.parametrize("T,k,out", [(8, 2, 1024), (5, 3, 1029), (16, 1, 37)], ids=["T8k2", "T5k3-out1029", "out37"])
@pytest.mark.parametrize("lists", [False, True], ids=["stacked", "lists"])
def test_thread_chunks_match_one_thread(lists, T, k, out):
    """in=512, r=8: enough work per call that two threads split the (token, choice) pairs of the
    shrink and the row blocks of the expand (out=37: one block, one thread). Every output is
    summed by one thread in one order, so the result is bitwise the same for 1 and 2 threads."""
    load_cpu_kernels()
    x, W, b, A, B, idx, g = make_case(T, 512, out, 8, 4, k, dtype=torch.float32, seed=T + k)
    impl = _lists_impl if lists else lora_moe_linear
    ref = reference(x, W, b, A, B, idx, g, 2.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, base1 = impl(x, W, b, A, B, idx, g, 2.0), torch.nn.functional.linear(x, W, b)
        torch.set_num_threads(2)
        y2, base2 = impl(x, W, b, A, B, idx, g, 2.0), torch.nn.functional.linear(x, W, b)
    finally:
        torch.set_num_threads(before)
    assert_close_to_reference(y1, ref, reduction=512 + k * 8)
    assert_close_to_reference(y2, ref, reduction=512 + k * 8)
    # The kernel's own base linear (decode sizes, float32, AVX-512) sums each output in one order;
    # otherwise the base linear is the BLAS's, bitwise only where it is.
    if (T <= 32 and _AVX512) or torch.equal(base1, base2):
        assert torch.equal(y1, y2)


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 9, 32, 33, 130, 1025])
@pytest.mark.parametrize("weight", ["contiguous", "row slice", "transposed"])
@pytest.mark.parametrize("bias", ["none", "contiguous", "strided"])
@pytest.mark.parametrize("lists", [False, True], ids=["stacked", "lists"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_base_linear_layouts(dtype, lists, bias, weight, T):
    """The kernel computes the base linear itself for float32 tokens with unit-stride rows of W
    (a row slice of a wider matrix included: rows 53 elements apart), up to 32 tokens on Intel's
    CPUs and 1024 on others, up to 12 bfloat16 tokens on the others, and leaves it to ATen otherwise (W
    transposed, a strided bias, more tokens): every case against float64. in=37 and out=29
    exercise the masked tail of a row and the rows after the last full group."""
    load_cpu_kernels()
    x, W, b, A, B, idx, g = make_case(T, 37, 29, 8, 4, 2, dtype=dtype, seed=T)
    if weight == "row slice":
        W = torch.cat([W, torch.randn(29, 16, dtype=dtype)], 1)[:, :37]
    elif weight == "transposed":
        W = W.t().contiguous().t()
    b = {"none": None, "contiguous": b, "strided": torch.stack([b, b], 1)[:, 0]}[bias]
    impl = _lists_impl if lists else lora_moe_linear
    y = impl(x, W, b, A, B, idx, g, 1.5)
    assert_close_to_reference(y, reference(x, W, b, A, B, idx, g, 1.5), reduction=37 + 2 * 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 5])
def test_base_linear_long_rows(T, dtype):
    """Rows of 16 KB or more take the other prefetch pattern (same rows, further along)."""
    load_cpu_kernels()
    x, W, b, A, B, idx, g = make_case(T, 8200, 20, 8, 4, 2, dtype=dtype, seed=T)
    y = lora_moe_linear(x, W, b, A, B, idx, g, 1.5)
    assert_close_to_reference(y, reference(x, W, b, A, B, idx, g, 1.5), reduction=8200 + 2 * 8)


@pytest.mark.skipif(not _AVX512, reason="the kernel computes the base linear itself on AVX-512 only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 3, 8, 32, 100])
@pytest.mark.parametrize("lists", [False, True], ids=["stacked", "lists"])
def test_no_adapter_keeps_the_kernels_base_linear(lists, T, dtype):
    """A call that adds nothing (scale 0, or no expert chosen) computes the base linear the way a
    call with an adapter does, so an adapter weighted by zero changes no bit of the output: the
    same result for scale 0, k = 0 and all-zero gates. Where the kernel's own base linear serves
    (T <= 32, or <= 1024 on CPUs other than Intel's) it differs in rounding from ATen's, which
    sums in another order; elsewhere it is ATen's (checked in float32: rounded to bfloat16, the
    two often agree)."""
    load_cpu_kernels()
    x, W, b, A, B, idx, g = make_case(T, 512, 1029, 8, 4, 2, dtype=dtype, seed=T)
    impl = _lists_impl if lists else lora_moe_linear
    zero_gates = impl(x, W, b, A, B, idx, torch.zeros_like(g), 2.0)
    no_scale = impl(x, W, b, A, B, idx, g, 0.0)
    no_expert = impl(x, W, b, A, B, idx[:, :0], g[:, :0], 2.0)
    assert torch.equal(no_scale, zero_gates) and torch.equal(no_expert, zero_gates)
    if dtype == torch.float32:
        assert torch.equal(no_scale, torch.nn.functional.linear(x, W, b)) == (T > _OWN_BASE_MAX_TOKENS)
    assert_close_to_reference(no_scale, reference(x, W, b, A, B, idx, g, 0.0), reduction=512)


@pytest.mark.parametrize("lists", [False, True], ids=["stacked", "lists"])
def test_zero_outputs(lists):
    """out=0: an empty result (no row blocks to split), and a bad expert index still raises."""
    load_cpu_kernels()
    x, W, b, A, B, idx, g = make_case(3, 16, 0, 8, 4, 2, dtype=torch.float32, seed=0)
    impl = _lists_impl if lists else lora_moe_linear
    assert impl(x, W, b, A, B, idx, g, 1.0).shape == (3, 0)
    with pytest.raises(RuntimeError, match="is not an expert"):
        impl(x, W, b, A, B, idx + 4, g, 1.0)


@pytest.mark.parametrize("bad", [4, -1, 100])
@PATHS
@pytest.mark.parametrize("lists", [False, True], ids=["stacked", "lists"])
def test_out_of_range_expert_index_raises_on_every_path(lists, T, aten_base, bad):
    load_cpu_kernels()
    x, W, b, A, B, idx, g = make_case(T, 16, 12, 4, 4, 2, dtype=torch.float32)
    W = _aten_base(W) if aten_base else W
    idx[T - 1, 0] = bad
    impl = _lists_impl if lists else lora_moe_linear
    with pytest.raises((RuntimeError, IndexError), match="expert|index"):
        impl(x, W, b, A, B, idx, g, 1.0)


def test_lists_opcheck():
    load_cpu_kernels()  # check the kernel that serves CPU calls
    op = torch.ops.adafuse.lora_moe_linear_lists.default
    for T, shared_A, bias, how in [(1, False, True, "contiguous"), (7, True, False, "contiguous"),
                                   (0, False, True, "contiguous"), (12, False, False, "contiguous"),
                                   (5, False, True, "transposed"), (24, False, True, "contiguous")]:
        x, W, b, A, B, idx, g = make_case(T, 20, 13, 3, 5, 2, dtype=torch.float32, shared_A=shared_A, bias=bias)
        As, Bs = _as_lists(A, B)
        torch.library.opcheck(op, (x, W, b, _list_layout(As, how), _list_layout(Bs, how), idx, g, 2.0))


def test_lists_traces_with_dynamic_token_count():
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lora_moe_linear_lists, backend=counter, dynamic=True, fullgraph=True)
    for T in (6, 7, 11):
        x, W, b, A, B, idx, g = make_case(T, 20, 13, 3, 5, 2, dtype=torch.float32)
        As, Bs = _as_lists(A, B)
        torch.testing.assert_close(f(x, W, b, As, Bs, idx, g, 2.0), lora_moe_linear(x, W, b, A, B, idx, g, 2.0))
    assert counter.frame_count == 1, "a new token count recompiled"


def _bad_lists(case):
    x, W, b, A, B, idx, g = make_case(3, 16, 12, 4, 4, 2, dtype=torch.float32)
    As, Bs = _as_lists(A, B)
    if case == "3A-4B":
        As = As[:3]
    elif case == "2A-4B":
        As = As[:2]
    elif case == "no-experts":
        As, Bs = [], []
    elif case == "A-rank-differs":
        As[2] = As[2][:-1]
    elif case == "B-out-differs":
        Bs[1] = Bs[1][:-1]
    elif case == "A-dtype-differs":
        As[3] = As[3].double()
    elif case == "A-not-2d":
        As = [a.unsqueeze(0) for a in As]
    elif case == "A-in-mismatch":
        As = [a[:, :-1] for a in As]
    return x, W, b, As, Bs, idx, g


BAD_LISTS = {
    "3A-4B": "3 A factors for 4 experts",
    "2A-4B": "2 A factors for 4 experts",
    "no-experts": "0 A factors for 0 experts",
    "A-rank-differs": "every A must be",
    "B-out-differs": "every B must be",
    "A-dtype-differs": "every A must be",
    "A-not-2d": "every A must be",
    "A-in-mismatch": "input features",
}


@pytest.mark.parametrize("case", list(BAD_LISTS))
@pytest.mark.parametrize("mode", ["kernel", "fake"])
def test_lists_bad_arguments_raise(mode, case):
    load_cpu_kernels()
    args = _bad_lists(case)
    if mode == "kernel":
        with pytest.raises(RuntimeError, match=BAD_LISTS[case]):
            lora_moe_linear_lists(*args, 1.0)
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as fake_mode:
        conv = lambda t: fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
        x, W, b, As, Bs, idx, g = (
            [conv(t) for t in a] if isinstance(a, list) else conv(a) for a in args
        )
        with pytest.raises(RuntimeError, match=BAD_LISTS[case]):
            lora_moe_linear_lists(x, W, b, As, Bs, idx, g, 1.0)


def test_lists_fake_impl_accepts_good_arguments():
    """The counterpart of the test above: the fake impl's checks do not reject valid lists."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    x, W, b, A, B, idx, g = make_case(3, 16, 12, 4, 4, 2, dtype=torch.float32, shared_A=True)
    As, Bs = _as_lists(A, B)
    with FakeTensorMode() as fake_mode:
        conv = fake_mode.from_tensor
        y = lora_moe_linear_lists(conv(x), conv(W), conv(b), [conv(a) for a in As], [conv(t) for t in Bs],
                                  conv(idx), conv(g), 1.0)
    assert isinstance(y, FakeTensor) and y.shape == (3, 12) and y.dtype == torch.float32
