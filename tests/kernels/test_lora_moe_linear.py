"""adafuse::lora_moe_linear against its float64 reference, on both CPU paths, plus opcheck."""

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

from adafuse_compile.kernels import lora_moe_linear
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


def _run_case(p, impl=lora_moe_linear):
    k = 1 + int(p["k_frac"] * (p["E"] - 1))
    args = make_case(
        p["T"], p["in_f"], p["out_f"], p["r"], p["E"], k, dtype=p["dtype"],
        shared_A=p["shared_A"], bias=p["bias"], seed=p["seed"], dup=p["dup"],
    )
    y = impl(*args, p["scale"])
    assert y.dtype == p["dtype"] and y.shape == (p["T"], p["out_f"])
    assert_close_to_reference(y, reference(*args, p["scale"]), reduction=p["in_f"] + k * p["r"])


def test_cpu_kernel_is_built_and_registered():
    """CI has a compiler: the C++ kernel must serve the op, or every test below tests the fallback."""
    assert load_cpu_kernels()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("adafuse::lora_moe_linear", "CPU")


@given(case_params)
def test_matches_reference(p):
    # T in 0..64 with k <= E covers both the C++ kernel's token loops and its GEMM path.
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
     (64, 2, 2, False), (64, 3, 1, True)],
    ids=["empty-T", "k==E", "E==1", "dense-gate-shared-A", "decode-shared-A", "gemm-path",
         "gemm-path-shared-A"],
)
def test_edge_cases(T, E, k, shared_A):
    args = make_case(T, 37, 29, 5, E, k, dtype=torch.float32, shared_A=shared_A)
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
    with pytest.raises(RuntimeError, match="no autograd formula"):
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
