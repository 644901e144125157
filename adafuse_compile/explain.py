"""``adafuse_compile.explain(model, *args, **kwargs)``: which sites were found, what was done, why not."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from .api import DYNAMO_SETTINGS, serving_mixed_batch
from .backend import Rewrite, rewrite
from .branches import BranchReport, skip_branches_when_compiling
from .options import AdafuseOptions
from .passes import GroupReport, SiteReport
from .passes.hoist_routers import HoistedGroup

log = logging.getLogger("adafuse_compile")

__all__ = ["ExplainReport", "explain"]


@dataclasses.dataclass
class ExplainReport:
    """Per-site outcome of the adafuse passes on every graph Dynamo captured."""

    sites: list[SiteReport]
    graphs: int
    graph_breaks: int
    break_reasons: list[str]
    groups: list[GroupReport] = dataclasses.field(default_factory=list)  # sites sharing one pre-gate decision
    hoisted_routers: list[HoistedGroup] = dataclasses.field(default_factory=list)  # routers batched into one matmul
    branches: list[BranchReport] = dataclasses.field(default_factory=list)  # expert loops skipping empty experts
    split: list[SiteReport] = dataclasses.field(default_factory=list)  # adapter modules a graph break splits

    def count(self, status: str) -> int:
        return sum(s.status == status for s in self.sites)

    def __str__(self) -> str:
        head = (f"adafuse: {len(self.sites)} site(s) in {self.graphs} graph(s), "
                f"{self.graph_breaks} graph break(s); "
                + ", ".join(f"{st} {self.count(st)}" for st in ("fused", "folded", "left")))
        rows = [("site", "status", "E", "k", "r", "gate", "reason")]
        for s in self.sites:
            rows.append((s.path, s.status, _fmt(s.experts), _fmt(s.k), _fmt(s.rank),
                         s.gate or "-", s.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = [head, ""]
        if not self.sites:
            lines.append("no adapter site found: no linear on a parameter is followed by an add of a term computed "
                         "from its input in any captured graph"
                         + (" (the graph breaks below may have split the adapters)" if self.graph_breaks else ""))
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if self.hoisted_routers:
            counts = ", ".join(sorted({str(h.tokens) for h in self.hoisted_routers}))
            lines.append(f"routers hoisted: {sum(len(h.routers) for h in self.hoisted_routers)} router(s) in "
                         f"{len(self.hoisted_routers)} batched matmul(s); logits checked bitwise equal to the "
                         f"separate linears at the graphs' static token count(s) ({counts}) on this machine's "
                         "current BLAS and thread count"
                         + (f"; selection batched for {sum(h.selection > 0 for h in self.hoisted_routers)} of "
                            "them (each router's rows checked bitwise equal to its own call's)"
                            if any(h.selection for h in self.hoisted_routers) else ""))
        for grp in self.groups:
            lines.append(f"group on decision ({grp.decision}): {len(grp.sites)} site(s), strategy {grp.strategy}; "
                         f"cost model: {grp.estimate}")
        for sp in self.split:
            lines.append(f"left, split by a graph break: {sp.path}: {sp.reason}")
        for b in self.branches:
            lines.append(f"{b.cls}: " + (f"branch-free when compiling ({b.modules} module(s)): " if b.installed else "")
                         + b.reason)
        for reason in self.break_reasons:
            lines.append(f"graph break: {reason}")
        if self.graph_breaks:
            lines.append("adapter code Dynamo did not capture in a graph runs eagerly and is not rewritten; "
                         "adafuse_compile.compile() captures data-dependent dispatch (nonzero/where)")
        return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else str(v)


def explain(model: torch.nn.Module, *args, options=None, plain_torch_compile: bool = False,
            **kwargs) -> ExplainReport:
    """Capture ``model(*args, **kwargs)`` with Dynamo, run the adafuse passes, and report.

    The captured graphs are rewritten but never compiled: each graph runs once unrewritten (as
    eager would) so that Dynamo can continue past graph breaks. Capture uses the Dynamo
    settings of :func:`adafuse_compile.compile` (data-dependent dispatch such as ``nonzero`` is
    captured, and a PEFT ``adapter_names=`` batch is served by a gate tensor), so the report says
    what that compile does; ``plain_torch_compile=True`` reports
    what ``torch.compile(model, backend="adafuse")`` does instead (such dispatch breaks the graph). Call it in the grad mode you will
    run the compiled model in (sites needing gradients are left). ``options`` are the backend's.
    It resets Dynamo (``torch._dynamo.reset()``) before and after, so that every frame is
    captured afresh: models compiled earlier in the process recompile on their next call.
    ``pregate="approximate"`` raises ``ValueError`` as the backend does: explain the model that
    :func:`adafuse_compile.approximate_pregate` returns instead.
    """
    opts = AdafuseOptions.from_dict(options)
    if opts.pregate == "approximate":  # explain reports on the model it is given, never a changed one
        from .pregate import APPROXIMATE_NEEDS_MODEL

        raise ValueError(APPROXIMATE_NEEDS_MODEL)
    rewrites: list[Rewrite] = []

    ended_by_breaks = []  # why each captured graph ended where a break split the frame

    def collect(gm, example_inputs):
        reason = getattr(gm, "compile_subgraph_reason", None)
        if reason is not None and reason.graph_break:
            ended_by_breaks.append(reason)
        rewrites.append(rewrite(gm, example_inputs, opts))
        return gm.forward  # run the captured graph as it was

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    branches = [] if plain_torch_compile else skip_branches_when_compiling(model)
    try:
        mixed = contextlib.nullcontext(kwargs) if plain_torch_compile else serving_mixed_batch(model, [], args, kwargs)
        with torch._dynamo.config.patch({} if plain_torch_compile else DYNAMO_SETTINGS), mixed as kwargs:
            torch.compile(model, backend=collect)(*args, **kwargs)
        # A break Dynamo cannot split a frame at (one inside a loop) skips the whole frame: it
        # is counted as "unimplemented", not as a graph break, and the frame runs eagerly.
        skipped = {f"frame skipped, runs eagerly: {r.splitlines()[0]}": n for r, n in counters["unimplemented"].items()}
        breaks = {**counters["graph_break"], **skipped}
    finally:
        torch._dynamo.reset()
    report = ExplainReport([s for rw in rewrites for s in rw.sites], len(rewrites), sum(breaks.values()),
                           sorted(breaks), [g for rw in rewrites for g in rw.groups],
                           [h for rw in rewrites for h in rw.hoisted], branches)
    found = {s.path for s in report.sites}
    report.split = [s for s in _split_adapters(model, ended_by_breaks) if s.path not in found]
    for s in report.sites:
        log.info("adafuse explain: %s %s: %s", s.path, s.status, s.reason)
    return report


def _split_adapters(model: torch.nn.Module, reasons) -> list[SiteReport]:
    """Adapter-like modules (a direct ``nn.Linear`` child and parameters besides it) whose own
    ``forward`` is where a graph break split a frame: the code after the break ran eagerly, so
    the site was never one graph. The break's innermost frame inside some module's forward names
    the module (every instance of its class: they all run that code)."""
    forwards: dict = {}
    for path, module in model.named_modules():
        code = getattr(getattr(type(module), "forward", None), "__code__", None)
        if code is not None:
            forwards.setdefault(code, []).append((path, module))
    spans = {code: (code.co_firstlineno, max((line for _, _, line in code.co_lines() if line), default=0))
             for code in forwards}
    split: dict[str, SiteReport] = {}
    for reason in reasons:
        for frame in reversed(reason.user_stack):  # innermost first
            code = next((c for c, (lo, hi) in spans.items()
                         if c.co_filename == frame.filename and lo <= (frame.lineno or 0) <= hi), None)
            if code is None:
                continue
            why = reason.reason.strip().splitlines()[0]
            for path, module in forwards[code]:
                if _adapter_like(module) and path not in split:
                    split[path] = SiteReport(path or "<root>", "left", (
                        f"a graph break in its forward ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}: {why}): "
                        "the code after it runs eagerly, so the adapter is never one graph to rewrite"))
            break
    return list(split.values())


def _adapter_like(module: torch.nn.Module) -> bool:
    linears = [c for c in module.children() if type(c) is torch.nn.Linear]
    if not linears:
        return False
    inside = {id(p) for lin in linears[:1] for p in lin.parameters()}
    return any(id(p) not in inside for p in module.parameters())
