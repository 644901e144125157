"""The functions a rewritten graph calls: the op vocabulary of the adafuse passes.

Every rewrite inserts calls to these (public names, keyword arguments for everything that is not
a tensor operand), so a later pass, ``explain`` and the tests name what they match instead of
reading positions::

    y = fused_site(x, W, b, A, B, idx, g, scale=2.0, A_layout="eri", B_layout="eor",
                   out_dtype=torch.float32, lowering="op")

They run at every step of the compiled model (Inductor traces through them into the custom ops
of :mod:`adafuse_compile.kernels` or plain torch ops), so they are stateless: per-step state
lives in :mod:`adafuse_compile.runtime.merge_state`, reached by a group id.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..kernels import lora_moe_linear, lora_moe_linear_lists, routed_lora_moe_linear
from ..kernels.reference import lora_moe_delta_ref, lora_moe_linear_ref
from ..runtime.switched_ops import group_decide, group_site_linear

__all__ = ["canonical_A", "canonical_B", "dispatch_rows", "empty_linear_output", "expert_linear", "rows_where", "fused_site", "group_decision", "group_site", "hoisted_logits",
           "is_call", "routed_site", "router_logits", "site_operands"]


def is_call(node: fx.Node, fn) -> bool:
    """Whether ``node`` calls ``fn`` (one of this module's functions)."""
    return node.op == "call_function" and node.target is fn


def empty_linear_output(x: torch.Tensor, weight: torch.Tensor, **kwargs) -> torch.Tensor:
    """``torch.empty_like(F.linear(x, weight), **kwargs)`` without computing the linear."""
    return torch.empty((*x.shape[:-1], weight.shape[0]), dtype=kwargs.get("dtype") or x.dtype,
                       device=kwargs.get("device") or x.device)


def dispatch_rows(sel: torch.Tensor, *, experts: int):
    """``(rows, slots, experts, valid)`` of every (token, slot) pair of a decision ``sel [T, k]``,
    token-major: row ``t * k + j`` is token ``t``'s ``j``-th choice, expert ``sel[t, j]``. A slot
    holding no expert (a -1 sentinel of top-p routing) is not ``valid``; its expert reads as 0."""
    tokens, k = sel.shape
    rows = torch.arange(tokens, device=sel.device).repeat_interleave(k)
    slots = torch.arange(k, device=sel.device).repeat(tokens)
    flat = sel.reshape(-1)
    valid = (flat >= 0) & (flat < experts)
    return rows, slots, torch.where(valid, flat, 0), valid


def rows_where(valid: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` with the rows that are not ``valid`` zeroed (what a dispatch that skips them adds)."""
    return torch.where(valid.view(-1, *([1] * (y.dim() - 1))), y, 0)


def expert_linear(h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, bias=None) -> torch.Tensor:
    """``F.linear(h[n], weights[experts[n]])`` for every row ``n``: each row with its own expert's
    weight (``weights [E, out, in]``, low-rank factors: one side is an adapter's rank).

    Computed as one matmul over all experts' columns (E * min(out, in) of them) rather than a
    gather of a weight matrix per row: for an A (``out`` = r) all experts' products, then each
    row's block; for a B (``in`` = r) each row's input in its expert's block of an E * r wide
    row (zeros elsewhere), times all experts' B side by side.
    """
    E, out_f, in_f = weights.shape
    n = h.shape[0]
    if out_f <= in_f:
        z = (h @ weights.reshape(E * out_f, in_f).t()).view(n, E, out_f)
        y = z.gather(1, experts.view(n, 1, 1).expand(n, 1, out_f)).squeeze(1)
    else:
        block = F.one_hot(experts, E).to(h.dtype)
        y = (block[:, :, None] * h[:, None, :]).reshape(n, E * in_f) @ weights.permute(0, 2, 1).reshape(E * in_f, out_f)
    return y if bias is None else y + bias


def canonical_A(A, layout: str) -> torch.Tensor:
    """``A [E or 1, r, in]`` from a site's tensor(s) in ``layout``: ``"eri"`` ([E, r, in]),
    ``"eir"`` ([E, in, r]), ``"ri"`` (one shared [r, in]) or ``"list"`` (per-expert [r, in])."""
    if layout == "list":
        return torch.stack(A)
    if layout == "ri":
        return A.unsqueeze(0)
    return A.transpose(1, 2) if layout == "eir" else A


def canonical_B(B, layout: str) -> torch.Tensor:
    """``B [E, out, r]`` from ``"eor"`` ([E, out, r]), ``"ero"`` ([E, r, out]) or ``"list"``."""
    if layout == "list":
        return torch.stack(B)
    return B.transpose(1, 2) if layout == "ero" else B


def site_operands(x, A, B, idx, g, A_layout, B_layout):
    """``(x [T, in], A, B, idx [T, k] int64, g [T, k])`` as the fused ops take them: canonical
    expert layouts, tokens flattened, the dense or static decision made explicit."""
    x2, idx, g = _tokens_and_decision(x, idx, g)
    return x2, canonical_A(A, A_layout), canonical_B(B, B_layout), idx, g


def _tokens_and_decision(x, idx, g):
    """``(x [T, in], idx [T, k] int64, g [T, k])``: tokens flattened, the dense or static
    decision made explicit."""
    x2 = x.reshape(-1, x.shape[-1])  # routing may run on flattened tokens (MixLoRA): the
    if g is None:  # static LoRA          # verification compared in this flattened order
        g = torch.ones(x2.shape[0], 1, dtype=x.dtype, device=x.device)
    g = g.reshape(-1, g.shape[-1])
    if idx is None:  # every expert (a dense gate), or the one static adapter
        idx = torch.arange(g.shape[-1], device=g.device).expand(g.shape)
    return x2, idx.reshape(-1, g.shape[-1]).to(torch.int64), g


def _op_factors(A, B, A_layout: str, B_layout: str) -> tuple[list, list]:
    """``(As, Bs)`` as the list-taking ops read them: per-expert matrices when either factor is
    held one tensor per expert (the other as views into its stack), else the canonical stacks."""
    if "list" not in (A_layout, B_layout):
        return [canonical_A(A, A_layout)], [canonical_B(B, B_layout)]
    As = list(A) if A_layout == "list" else list(canonical_A(A, A_layout).unbind(0))
    Bs = list(B) if B_layout == "list" else list(canonical_B(B, B_layout).unbind(0))
    return As, Bs


def fused_site(x, weight, bias, A, B, idx, g, *, scale: float, A_layout: str, B_layout: str, out_dtype,
               lowering: str = "op"):
    """One adapted linear: the base and its chosen experts, ``[..., out]``.

    ``lowering="op"`` calls ``adafuse::lora_moe_linear`` (C++ on CPU, Triton on CUDA);
    ``"decomposed"`` computes the same in plain torch ops (the gathered form of
    :func:`~adafuse_compile.kernels.reference.lora_moe_linear_ref`) for Inductor to fuse.
    """
    if lowering == "op" and "list" in (A_layout, B_layout):
        # Experts held one tensor each: the op reads them in place (stacking them copied every
        # expert at every step: ~90 us per site of the small model at batch 8).
        As, Bs = _op_factors(A, B, A_layout, B_layout)
        if all(t.dtype == x.dtype for t in (weight, *As, *Bs)):
            x2, idx, g = _tokens_and_decision(x, idx, g)
            y = lora_moe_linear_lists(x2, weight, bias, As, Bs, idx, g, scale)
            return y.view(*x.shape[:-1], weight.shape[0]).to(out_dtype)
    x2, A, B, idx, g = site_operands(x, A, B, idx, g, A_layout, B_layout)
    if A.dtype != x.dtype or B.dtype != x.dtype or weight.dtype != x.dtype:
        # Adapters in another dtype than the base (PEFT keeps them in float32 on a bf16 model):
        # eager's semantics, the base in its dtype and the adapter in the adapter's, summed in
        # the promoted dtype.
        base = F.linear(x2, weight, bias)
        delta = lora_moe_delta_ref(x2.to(A.dtype), A, B.to(A.dtype), idx, g)
        y = base.to(out_dtype) + (scale * delta).to(out_dtype)
        return y.view(*x.shape[:-1], weight.shape[0])
    if lowering == "decomposed":
        # An index outside [0, E) is outside what was proved (a sentinel of a decision made
        # elsewhere): the op raises on it; here, where Inductor cannot raise, it poisons the row
        # with NaN instead of silently picking an expert (Python indexing would wrap -1 to E-1).
        valid = (idx >= 0) & (idx < B.shape[0])
        g = torch.where(valid, g, torch.full_like(g, float("nan")))
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        y = lora_moe_linear_ref(x2, weight, bias, A, B, idx, g, scale)
    else:
        y = lora_moe_linear(x2, weight, bias, A, B, idx, g, scale)
    return y.view(*x.shape[:-1], weight.shape[0]).to(out_dtype)


def group_decision(idx, g, *, weights, As, Bs, A_layouts, B_layouts, scales, group: int):
    """Once per step for a pre-gated group: fused or merged, and the merge (a 0-dim token)."""
    k = g.shape[-1]
    As = [canonical_A(a, lay) for a, lay in zip(As, A_layouts)]
    Bs = [canonical_B(b, lay) for b, lay in zip(Bs, B_layouts)]
    return group_decide(idx.reshape(-1, k).to(torch.int64), g.reshape(-1, k), weights, As, Bs, scales, group)


def group_site(x, weight, bias, A, B, idx, g, *, scale: float, A_layout: str, B_layout: str, out_dtype,
               token, group: int, site: int):
    """One site of a pre-gated group, in the mode :func:`group_decision` chose for this step."""
    x2, A, B, idx, g = site_operands(x, A, B, idx, g, A_layout, B_layout)
    y = group_site_linear(x2, weight, bias, A, B, idx, g, scale, token, group, site)
    return y.view(*x.shape[:-1], weight.shape[0]).to(out_dtype)


def hoisted_logits(inp: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """``[S, T, E]``: the logits of ``S`` routers reading ``inp``, from one batched matmul."""
    x2 = inp.reshape(-1, inp.shape[-1])
    return torch.matmul(x2.unsqueeze(0).expand(stacked.shape[0], *x2.shape), stacked.transpose(1, 2))


def router_logits(logits: torch.Tensor, *, router: int, like: torch.Tensor) -> torch.Tensor:
    """Router ``router``'s logits from :func:`hoisted_logits`, shaped for the input ``like``."""
    return logits[router].view(*like.shape[:-1], logits.shape[-1])


def routed_site(x, weight, bias, router_input, router_weight, router_bias, A, B, *, k: int, softmax_first: bool,
                renorm: bool, softmax_dtype, gate_dtype, sorted: bool, scale: float, A_layout: str, B_layout: str,
                out_dtype):
    """:func:`fused_site` whose top-k router runs inside the op (:mod:`.route`): the decision is
    :func:`~adafuse_compile.kernels.reference.topk_route` of ``router_input``."""
    As, Bs = _op_factors(A, B, A_layout, B_layout)
    y = routed_lora_moe_linear(
        x.reshape(-1, x.shape[-1]), weight, bias, router_input.reshape(-1, router_input.shape[-1]), router_weight,
        router_bias, As, Bs, k=k, softmax_first=softmax_first, renorm=renorm, softmax_dtype=softmax_dtype,
        gate_dtype=gate_dtype, sorted=sorted, scale=scale)
    return y.view(*x.shape[:-1], weight.shape[0]).to(out_dtype)
