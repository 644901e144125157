"""Inputs and float64 references for adafuse::lora_moe_linear, shared by its CPU and Triton tests."""

import torch

from adafuse_compile.kernels.reference import lora_moe_linear_ref


def make_lora_case(
    T, in_f, out_f, r, E, k, *, dtype, shared_A=False, bias=True, seed=0, dup=False,
    g_dtype=torch.float32, device="cpu",
):
    """O(1)-scaled inputs (x ~ 1, W and A ~ 1/sqrt(in), B ~ 1/sqrt(r)) so outputs are O(1).

    ``dup`` draws expert ids with repetition (the same expert twice in a token: weights add).
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype).to(device)

    x = randn(T, in_f)
    W = randn(out_f, in_f, std=in_f**-0.5)
    b = randn(out_f) if bias else None
    A = randn(1 if shared_A else E, r, in_f, std=in_f**-0.5)
    B = randn(E, out_f, r, std=r**-0.5)
    if dup:
        idx = torch.randint(0, E, (T, k), generator=gen)
    else:
        idx = torch.argsort(torch.rand(T, E, generator=gen), dim=1)[:, :k].contiguous()
    g = torch.softmax(torch.randn(T, k, generator=gen), dim=-1).to(g_dtype)
    return x, W, b, A, B, idx.to(device), g.to(device)


def lora_reference(x, W, b, A, B, idx, g, scale):
    """The reference in float64 on the same (already rounded) inputs."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return lora_moe_linear_ref(d(x), d(W), d(b), d(A), d(B), idx, g.double(), scale)
