"""Approximate pre-gating (opt-in): one token-level gate fitted to every per-layer router.

AdaFuse's speed comes from one routing decision per token shared by every site: then the chosen
experts of all layers can be merged into the weights in one pass. A model trained with a router
per site (MixLoRA, MoLA, our :class:`~adafuse_compile.models.LoRAMoELinear`) has no such
decision: each router reads its own layer's hidden state. :func:`approximate_pregate` fits one
:class:`~adafuse_compile.models.PreGate` on the token embeddings to all those routers at once and
returns a pre-gated copy of the model. This CHANGES the model, so it is never done implicitly and
it always comes with an :class:`ApproximationReport`: how often the pre-gate picks the same
experts as each site's own router, and how far the next-token distributions move.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .models.layers import LoRAMoELinear, MoLELinearBase, PreGate, PreGatedLoRAMoELinear, route
from .models.llama import attach_pregate, embedding_path, replace_module

log = logging.getLogger("adafuse_compile")

__all__ = ["APPROXIMATE_NEEDS_MODEL", "ApproximationReport", "approximate_pregate", "fit_gate"]

APPROXIMATE_NEEDS_MODEL = (
    "option pregate='approximate' changes the model (it fits a new token-level gate), which a "
    "torch.compile backend cannot do: it only sees graphs. Use "
    "adafuse_compile.compile(model, pregate='approximate'), or "
    "approx, report = adafuse_compile.approximate_pregate(model) and compile or explain approx"
)

_SEQ_LEN = 64  # length of the random calibration sequences
_ROWS_PER_FORWARD = 8  # sequences per forward pass while collecting
_HELD_OUT = 512  # default number of held-out tokens


@dataclasses.dataclass
class ApproximationReport:
    """How much approximate pre-gating changed the model, measured on held-out tokens.

    ``agreement[i]``: fraction of held-out tokens for which the pre-gate chooses exactly the same
    SET of experts as site ``sites[i]``'s own router (order and weights aside; experts a top-p
    gate drops do not count as chosen; always 1 for the dense gate, where KL is the measure).
    ``kl``: mean over held-out positions of KL(original || approximated) of the next-token
    distributions, in nats. ``greedy_agreement``: fraction of positions whose argmax token is
    unchanged. ``fit_r2``: R^2 of the least-squares fit on the calibration tokens (1 - residual /
    variance of the target), i.e. how much of the routers' mean logits the embeddings explain.
    """

    sites: list[str]
    agreement: list[float]
    kl: float
    greedy_agreement: float
    calibration_tokens: int
    held_out_tokens: int
    fit_r2: float
    experts: int
    top_k: int
    gate: str

    @property
    def mean_agreement(self) -> float:
        return sum(self.agreement) / len(self.agreement)

    def summary(self) -> str:
        return (
            f"approximate pre-gate: one gate fitted to {len(self.sites)} router(s) on "
            f"{self.calibration_tokens} calibration tokens (E={self.experts}, k={self.top_k}, "
            f"{self.gate}; fit R^2 {self.fit_r2:.3f}); the model changed. On {self.held_out_tokens} "
            f"held-out tokens: same expert set as the site's router {_pct(self.mean_agreement)} mean "
            f"(min {_pct(min(self.agreement))}, max {_pct(max(self.agreement))}{self._chance()}), next-token "
            f"KL(original || approximated) {self.kl:.4g} nats, greedy tokens unchanged "
            f"{_pct(self.greedy_agreement)}"
        )

    def _chance(self) -> str:
        """Agreement of a gate that picks k experts at random: the floor the numbers compare to."""
        if self.gate not in ("softmax_topk", "topk_softmax"):
            return ""  # dense: always the same set; top-p: set sizes vary per token
        return f"; chance {_pct(1 / math.comb(self.experts, self.top_k))}"

    def __str__(self) -> str:
        width = max(len("site"), *(len(s) for s in self.sites))
        lines = [self.summary(), "", f"{'site'.ljust(width)}  same expert set"]
        lines += [f"{s.ljust(width)}  {_pct(a)}" for s, a in zip(self.sites, self.agreement)]
        return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def fit_gate(h0: torch.Tensor, site_logits: torch.Tensor, *, normalize: bool = True) -> tuple[torch.Tensor, float]:
    """Least-squares router weight ``W [E, hidden]`` (float32) with ``norm(h0) W^T ~ logits``, and R^2.

    ``h0 [N, hidden]`` are the token embeddings (what the PreGate reads; RMS-normalized as the
    PreGate does when ``normalize``), ``site_logits [S, N, E]`` every site's router logits on
    the same tokens. The target is the mean over sites: ``sum_s ||X W^T - L_s||^2`` equals
    ``S ||X W^T - mean_s L_s||^2`` plus a constant, so fitting the mean IS the least-squares fit
    to all sites' logits at once (one gate cannot match each site better on average). Solved in
    float64 on the CPU (``gelsd``: also fine when there are fewer tokens than hidden units, with
    the minimum-norm solution).
    """
    if h0.dim() != 2 or site_logits.dim() != 3 or site_logits.shape[1] != h0.shape[0]:
        raise ValueError(f"expected h0 [N, hidden] and site_logits [S, N, E], got {tuple(h0.shape)} and "
                         f"{tuple(site_logits.shape)}")
    x = h0.float()
    if normalize:
        x = F.rms_norm(x, (x.shape[-1],), eps=1e-6)  # exactly PreGate.decide's features
    x = x.double().cpu()
    y = site_logits.double().cpu().mean(dim=0)
    sol = torch.linalg.lstsq(x, y, driver="gelsd").solution  # [hidden, E]
    resid = ((x @ sol - y) ** 2).sum()
    total = ((y - y.mean(dim=0)) ** 2).sum()
    r2 = 1.0 - float(resid / total) if float(total) > 0 else 1.0
    return sol.T.float().contiguous(), r2


def approximate_pregate(
    model: nn.Module,
    calibration: torch.Tensor | None = None,
    *,
    tokens: int = 2048,
    held_out: int | None = None,
    seed: int = 0,
) -> tuple[nn.Module, "ApproximationReport"]:
    """A pre-gated copy of ``model`` whose one token-level gate approximates every site's router.

    ``model`` must have :class:`~adafuse_compile.models.LoRAMoELinear` adapters (a router per
    site, e.g. from ``add_lora_moe``) that share E, top_k and the gate variant. ``calibration``:
    token ids ``[B, L]`` (B >= 2) from the data the model will see; the last
    ``ceil(held_out / L)`` rows are held out for the report (by default up to 512 tokens, at
    most a quarter of the rows). Without it, ``tokens`` random seeded ids fit the gate and
    ``held_out`` (default 512) other random ids measure it; random tokens are not your data:
    pass real text for numbers that mean something.

    The gate is fitted by least squares (:func:`fit_gate`) from the embeddings to the mean of
    all sites' router logits, recorded by running the original model eagerly. The copy shares
    every parameter and buffer with ``model`` (no weights are copied; the per-site routers are
    dropped from it, the new PreGate is its only new parameter); ``model`` itself is unchanged.
    The report is logged (logger ``adafuse_compile``, INFO) and returned.
    """
    sites = _per_layer_sites(model)
    spec = _common_spec(sites)
    emb_name = embedding_path(model)
    emb = model.get_submodule(emb_name)
    calib_ids, held_ids = _token_sets(calibration, emb.num_embeddings, tokens, held_out, seed, emb.weight.device)

    with _eval_mode(model) as modes, torch.no_grad():
        h0, logits = _record(model, emb, sites, calib_ids)
        weight, r2 = fit_gate(h0, logits, normalize=True)
        approx = _pregated_copy(model, emb_name, sites, weight, spec)
        report = _measure(model, approx, emb, sites, held_ids, spec, r2, calib_ids.numel())
    _set_modes(approx, modes, default=modes[emb_name])  # the copy's modes are the original's; the PreGate's its embedding's
    log.info("adafuse %s", report.summary())
    for s, a in zip(report.sites, report.agreement):
        log.info("adafuse approximate pre-gate: %s same expert set %s", s, _pct(a))
    return approx, report


def _per_layer_sites(model: nn.Module) -> dict[str, LoRAMoELinear]:
    sites = {n: m for n, m in model.named_modules() if isinstance(m, MoLELinearBase)}
    if not sites:
        raise ValueError("model has no LoRA-MoE adapters: approximate pre-gating needs LoRAMoELinear sites "
                         "(e.g. from adafuse_compile.models.add_lora_moe)")
    other = sorted(n for n, m in sites.items() if not isinstance(m, LoRAMoELinear))
    if other:
        kind = "already pre-gated" if isinstance(sites[other[0]], PreGatedLoRAMoELinear) else "not LoRAMoELinear"
        raise ValueError(f"site {other[0]} is {kind}: approximate pre-gating fits a gate to per-layer routers "
                         "(LoRAMoELinear); a pre-gated model needs no approximation, compile it as it is")
    return sites


def _common_spec(sites: dict[str, LoRAMoELinear]) -> dict:
    """The gate every site shares (one decision must fit all of them), or a ValueError naming the odd one."""
    def spec(m):
        s = dict(experts=m.experts, top_k=m.top_k, gate=m.gate)
        if m.gate == "top_p":
            s.update(top_p=m.top_p, entropy_threshold=m.entropy_threshold)
        return s

    (first_name, first), *rest = sites.items()
    for name, m in rest:
        if spec(m) != spec(first):
            raise ValueError(f"one pre-gate decision must serve every site, but {name} has {spec(m)} while "
                             f"{first_name} has {spec(first)}: sites must share experts, top_k and gate")
    return {"top_p": first.top_p, "entropy_threshold": first.entropy_threshold, **spec(first),
            "router_dtype": first.router_dtype, "trainable": first.router.weight.requires_grad}


def _token_sets(calibration, vocab: int, tokens: int, held_out: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration ids, held-out ids), each ``[rows, L]``: split from ``calibration`` or random seeded."""
    if held_out is not None and held_out < 1:
        raise ValueError(f"held_out must be >= 1 token, got {held_out}")
    if calibration is None:
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        gen = torch.Generator().manual_seed(seed)
        calib, held = (_random_ids(n, vocab, gen) for n in (tokens, held_out or _HELD_OUT))
    else:
        if not isinstance(calibration, torch.Tensor) or calibration.is_floating_point() or calibration.is_complex():
            raise ValueError("calibration must be an integer tensor of token ids [batch, length]")
        ids = calibration if calibration.dim() == 2 else calibration.reshape(1, -1) if calibration.dim() == 1 else None
        if ids is None or ids.numel() == 0:
            raise ValueError(f"calibration must be token ids [batch, length], got shape {tuple(calibration.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"calibration ids must be in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]")
        rows = math.ceil((held_out or _HELD_OUT) / ids.shape[1])
        if held_out is None:
            rows = min(rows, max(1, ids.shape[0] // 4))
        if rows >= ids.shape[0]:
            raise ValueError(f"calibration has {ids.shape[0]} row(s) of {ids.shape[1]} tokens; holding out "
                             f"{held_out} tokens takes {rows} row(s) and leaves none to fit: pass more rows "
                             "or a smaller held_out")
        calib, held = ids[:-rows], ids[-rows:]
    return calib.to(device=device, dtype=torch.long), held.to(device=device, dtype=torch.long)


def _random_ids(n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    length = min(_SEQ_LEN, n)
    return torch.randint(0, vocab, (math.ceil(n / length), length), generator=gen)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Run the original model in eval mode (no dropout); yields each module's own flag, restored after."""
    flags = {name: m.training for name, m in model.named_modules()}
    model.eval()
    try:
        yield flags
    finally:
        _set_modes(model, flags, default=False)


def _set_modes(model: nn.Module, flags: dict[str, bool], default: bool) -> None:
    for name, m in model.named_modules():
        m.training = flags.get(name, default)


def _record(model, emb, sites, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``[N, hidden]`` and every site's router logits ``[S, N, E]`` (float32) on ``ids``."""
    parts = [_forward_recorded(model, emb, sites, chunk)[:2] for chunk in ids.split(_ROWS_PER_FORWARD)]
    return torch.cat([h for h, _ in parts]), torch.cat([lg for _, lg in parts], dim=1)


def _forward_recorded(model, emb, sites, ids) -> tuple[torch.Tensor, torch.Tensor, object]:
    """One forward of the original model on ``ids``: (embeddings, router logits ``[S, T, E]``, output)."""
    h0, logits = [], {name: [] for name in sites}
    handles = [emb.register_forward_hook(lambda m, a, out: h0.append(out.detach().reshape(-1, out.shape[-1])))]
    for name, site in sites.items():
        handles.append(site.register_forward_pre_hook(
            lambda m, args, name=name: logits[name].append(_router_logits(m, args[0]))))
    try:
        out = model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(h0), torch.stack([torch.cat(logits[n]) for n in sites]), out


def _router_logits(site: LoRAMoELinear, x: torch.Tensor) -> torch.Tensor:
    """What :meth:`LoRAMoELinear.route` feeds to :func:`route`, flattened to ``[T, E]``."""
    rd = site.router_dtype
    return F.linear(x.to(rd), site.router.weight.to(rd)).float().reshape(-1, site.experts)


def _pregated_copy(model, emb_name, sites, weight, spec) -> nn.Module:
    """``model`` with one PreGate of router ``weight`` and every site pre-gated, sharing all tensors."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    approx = copy.deepcopy(model, shared)  # modules copied, parameters and buffers shared
    emb = model.get_submodule(emb_name)
    pregate = PreGate(
        emb.embedding_dim, experts=spec["experts"], top_k=spec["top_k"], gate=spec["gate"], top_p=spec["top_p"],
        entropy_threshold=spec["entropy_threshold"], normalize=True, router_dtype=spec["router_dtype"],
        device=emb.weight.device,
    )
    pregate.router.weight.copy_(weight)
    pregate.router.weight.requires_grad_(spec["trainable"])
    for name in sites:
        replace_module(approx, name, _pregated_site(approx.get_submodule(name), pregate))
    attach_pregate(approx, emb_name, pregate)
    return approx


def _pregated_site(site: LoRAMoELinear, pregate: PreGate) -> PreGatedLoRAMoELinear:
    """The same base layer and expert Parameters, decided by ``pregate`` instead of a router."""
    flags = [p.requires_grad for p in site.base_layer.parameters()]
    new = PreGatedLoRAMoELinear(site.base_layer, pregate, rank=site.rank, alpha=site.alpha, shared_A=site.shared_A)
    for p, flag in zip(site.base_layer.parameters(), flags):  # the constructor froze the shared base
        p.requires_grad_(flag)
    new.lora_A, new.lora_B = site.lora_A, site.lora_B  # shared Parameters, not copies
    return new


def _chosen(idx: torch.Tensor, g: torch.Tensor, gate: str, experts: int) -> torch.Tensor:
    """Boolean ``[T, E]``: the experts a decision uses (top-p gives dropped experts weight 0)."""
    used = g > 0 if gate == "top_p" else torch.ones_like(idx, dtype=torch.bool)
    return torch.zeros(idx.shape[0], experts, dtype=torch.bool, device=idx.device).scatter_(1, idx, used)


def _measure(model, approx, emb, sites, ids, spec, r2, calib_tokens) -> ApproximationReport:
    """Routing agreement and output deviation of ``approx`` against ``model`` on held-out ``ids``."""
    pregate = approx.get_submodule(embedding_path(approx)).pregate
    gate_args = (spec["gate"], spec["top_k"], spec["top_p"], spec["entropy_threshold"])
    same = torch.zeros(len(sites), dtype=torch.float64)
    kl = greedy = 0.0
    for chunk in ids.split(_ROWS_PER_FORWARD):
        h0, logits, out = _forward_recorded(model, emb, sites, chunk)
        original = _lm_logits(out).float()
        ours = _chosen(*pregate.decide(h0), spec["gate"], spec["experts"])
        for i, site_logits in enumerate(logits):
            theirs = _chosen(*route(site_logits, *gate_args), spec["gate"], spec["experts"])
            same[i] += float((ours == theirs).all(dim=-1).sum())
        approximated = _lm_logits(approx(input_ids=chunk)).float()
        lp, lq = F.log_softmax(original, dim=-1), F.log_softmax(approximated, dim=-1)
        kl += float((lp.exp() * (lp - lq)).sum(dim=-1).clamp_min(0).sum())
        greedy += float((original.argmax(-1) == approximated.argmax(-1)).sum())
    pregate.reset()
    n = ids.numel()
    return ApproximationReport(
        sites=list(sites), agreement=(same / n).tolist(), kl=kl / n, greedy_agreement=greedy / n,
        calibration_tokens=calib_tokens, held_out_tokens=n, fit_r2=r2,
        experts=spec["experts"], top_k=spec["top_k"], gate=spec["gate"],
    )


def _lm_logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]
