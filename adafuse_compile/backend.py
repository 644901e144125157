"""The ``adafuse`` torch.compile backend: adafuse passes on the Dynamo graph, then an inner compiler.

Registered under the name ``adafuse`` through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="adafuse")`` works after ``pip install`` with no import.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import threading
from typing import Any, Callable, Mapping

import torch
import torch.fx
from torch._dynamo.exc import RestartAnalysis

from .kernels import opaque_cuda_kernels
from .kernels.cpu_extension import load_cpu_kernels
from .options import AdafuseOptions
from .passes import (BatchTokenDispatchPass, FoldStaticLoRAPass, FuseMoLEPass, HoistRoutersPass, MaskedAccumulatePass,
                     MergeSwitchPass, NormalizeLinearsPass, PassManager, RouteIntoSitesPass, SliceLinearRowsPass)
from .passes import GroupReport, SiteReport
from .passes.hoist_routers import HoistedGroup
from .passes.manager import DERIVED_INPUTS, KEEPALIVE, copy_graph
from .runtime.module_guards import CheckedGraph, require_installed

log = logging.getLogger("adafuse_compile")

__all__ = ["Rewrite", "adafuse_backend", "ambient_options", "backend_with_mode", "build_pass_manager", "capture_rewrites",
           "compile_rewritten", "rewrite"]


@dataclasses.dataclass
class Rewrite:
    """What the passes made of one Dynamo graph: the graph, what it needs at run time, and the
    passes' reports (read by ``explain``, ``adafuse-bench`` and the examples)."""

    original: torch.fx.GraphModule  # the graph Dynamo captured (left as it was)
    graph: torch.fx.GraphModule  # the rewritten copy
    derived_inputs: list  # computed from the graph's inputs before each call (freeze=True)
    state: list  # run-time state the graph's ops reach by id (switched groups), kept alive
    sites: list[SiteReport]
    groups: list[GroupReport]  # sites sharing one pre-gate decision
    hoisted: list[HoistedGroup]  # routers batched into one matmul
    error: str | None = None  # why the graph was compiled unrewritten, if it was

    def counts(self) -> dict[str, int]:
        """Sites per status (``fused``, ``folded``, ``left``)."""
        return dict(collections.Counter(s.status for s in self.sites))


_CAPTURES = threading.local()


@contextlib.contextmanager
def capture_rewrites():
    """Collect the :class:`Rewrite` of every graph the backend compiles in this thread meanwhile::

        with capture_rewrites() as rewrites:
            fast(x)
        print(sum(r.counts().get("fused", 0) for r in rewrites))
    """
    found: list[Rewrite] = []
    stack = _CAPTURES.__dict__.setdefault("stack", [])
    stack.append(found)
    try:
        yield found
    finally:
        stack.remove(found)


_AMBIENT = threading.local()


@contextlib.contextmanager
def ambient_options(options: Mapping[str, Any] | AdafuseOptions | None):
    """Options for the backend calls made in this thread meanwhile that come with none.

    An engine that compiles by backend name passes no options of ours: vLLM calls
    ``torch.compile(..., backend="adafuse")`` and gives its options only to Inductor. An
    integration that knows the user's options (vLLM: ``additional_config={"adafuse": {...}}``)
    wraps the engine's first forward in this. Options given to the backend explicitly win.
    """
    opts = AdafuseOptions.from_dict(options)
    previous = getattr(_AMBIENT, "options", None)
    _AMBIENT.options = opts
    try:
        yield opts
    finally:
        _AMBIENT.options = previous


def _publish(rw: Rewrite) -> None:
    for found in getattr(_CAPTURES, "stack", ()):
        found.append(rw)


def build_pass_manager(opts: AdafuseOptions, example_inputs=None) -> PassManager:
    """The passes the options enable, in order."""
    passes = [NormalizeLinearsPass(), SliceLinearRowsPass(), MaskedAccumulatePass()]
    if opts.fuse:
        passes.append(BatchTokenDispatchPass(freeze=opts.freeze))
    if opts.fold and opts.freeze:
        passes.append(FoldStaticLoRAPass())
    if opts.fuse:
        lowering = resolve_lowering(opts, example_inputs)
        passes.append(FuseMoLEPass(lowering=lowering, strict=opts.strict, freeze=opts.freeze))
        if lowering == "op" and not _on_cuda(example_inputs):
            passes.append(RouteIntoSitesPass())
    if opts.hoist:
        passes.append(HoistRoutersPass(freeze=opts.freeze))
    if opts.fuse:
        passes.append(MergeSwitchPass(opts.strategy))
    return PassManager(passes, strict=opts.strict)


def resolve_lowering(opts: AdafuseOptions, example_inputs=None) -> str:
    """``"auto"``: the custom op (C++ kernel on CPU, Triton on CUDA), except for Inductor on a
    CPU without the C++ kernels, where Inductor's own code for the gathered form beats the op's
    pure-torch fallback.

    Measured (small model, 16 decode steps, ``adafuse-bench --configs
    backbone-inductor,mole-inductor,mole-fused,mole-decomposed``), ratio to the backbone,
    decomposed vs op: stacked experts batch 1 1.20 vs 1.17, MoLA-style per-expert loops batch 8
    1.69 vs 1.44 (plain Inductor 1.24 and 1.61); compile 4.7 vs 4.4 s and 19.8 vs 9.5 s.
    """
    if opts.lowering != "auto":
        return opts.lowering
    if opts.inner == "inductor" and not _on_cuda(example_inputs):
        return "op" if load_cpu_kernels() else "decomposed"
    return "op"


def _on_cuda(example_inputs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs or ())


def _inner_compiler(name: str) -> Callable:
    if name == "eager":
        return lambda gm, example_inputs: gm.forward
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(name)


def adafuse_backend(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    *,
    options: Mapping[str, Any] | AdafuseOptions | None = None,
    mode: str | None = None,
) -> Callable:
    """Dynamo backend entry: rewrite ``gm`` with the adafuse passes, then compile it with ``inner``.

    ``mode`` is accepted for ``torch.compile``'s signature and passed to Inductor. Without
    ``options``, those of an enclosing :func:`ambient_options` apply.
    """
    opts = AdafuseOptions.from_dict(options if options is not None else getattr(_AMBIENT, "options", None))
    if opts.pregate == "approximate":  # needs the model, not a graph: adafuse_compile.compile does it
        from .pregate import APPROXIMATE_NEEDS_MODEL

        raise ValueError(APPROXIMATE_NEEDS_MODEL)
    if opts.guards == "module-tags":
        require_installed()
    if opts.strategy != "fused" and _cudagraphs(mode) and _on_cuda(example_inputs):
        log.warning("adafuse: strategy=%r is not captured by CUDA graphs (mode=%r): fusing every step instead. "
                    "Its per-step choice runs on the host and its merged weights outlive a replay (on an H200 "
                    "the pre-gated model failed with 'accessing tensor output of CUDAGraphs that has been "
                    "overwritten')", opts.strategy, mode)
        opts = dataclasses.replace(opts, strategy="fused")
    try:
        rw = rewrite(gm, example_inputs, opts)
        try:
            compiled = compile_rewritten(rw, example_inputs, opts, mode)
        except RestartAnalysis:
            raise
        except Exception:
            if not _on_cuda(example_inputs) or opts.strict:
                raise
            # The fused sites' Triton kernels are compiled into Inductor's code on CUDA; should
            # that fail, the opaque op (which launches the same kernels itself) still fuses them.
            log.warning("adafuse: compiling the fused kernels into the graph failed; calling them as opaque ops",
                        exc_info=True)
            with opaque_cuda_kernels():
                compiled = compile_rewritten(rw, example_inputs, opts, mode)
    except RestartAnalysis:
        # Dynamo's own control flow, not a failure: Inductor asks Dynamo to trace the frame again
        # (e.g. with float scalars made tensors under dynamic=True), and the backend is called
        # again with the new graph. Caught below, it left every site of such graphs unrewritten.
        raise
    except Exception as e:
        # Anything of ours (a pass, a derived input, the inner compiler on the rewritten graph):
        # the unrewritten graph is always a correct answer.
        if opts.strict:
            raise
        log.warning("adafuse: rewriting failed; compiling the graph unrewritten", exc_info=True)
        rw = Rewrite(gm, gm, [], [], [], [], [], error=f"{type(e).__name__}: {e}")
        compiled = compile_rewritten(rw, example_inputs, opts, mode)
    _publish(rw)
    return CheckedGraph(compiled) if opts.guards == "module-tags" else compiled


def _cudagraphs(mode: str | None) -> bool:
    if mode is None:
        return False
    from torch._inductor import list_mode_options

    return bool(list_mode_options(mode).get("triton.cudagraphs"))


def backend_with_mode(mode: str | None):
    """``backend=`` for ``torch.compile(..., options=...)`` with Inductor's ``mode``: torch.compile
    refuses ``mode=`` together with ``options=``, so the mode goes to :func:`adafuse_backend` itself."""
    return "adafuse" if mode is None else functools.partial(adafuse_backend, mode=mode)


def rewrite(gm: torch.fx.GraphModule, example_inputs: list[Any], opts: AdafuseOptions) -> Rewrite:
    """The passes the options enable, on a copy of ``gm`` (Dynamo keeps using its own graph: its
    placeholders must stay as it made them, and passes may add inputs)."""
    manager = build_pass_manager(opts, example_inputs)
    graph = manager(torch.fx.GraphModule(gm, copy_graph(gm)), example_inputs)
    keep_dynamo_inputs(gm, graph)
    sites, groups, hoisted = [], [], []
    for p in manager.passes:
        if isinstance(p, (BatchTokenDispatchPass, FoldStaticLoRAPass, FuseMoLEPass)):
            sites.extend(p.reports)
        elif isinstance(p, MergeSwitchPass):
            groups.extend(p.reports)
        elif isinstance(p, HoistRoutersPass):
            hoisted.extend(p.hoisted)
    return Rewrite(gm, graph, graph.meta.get(DERIVED_INPUTS, []), graph.meta.get(KEEPALIVE, []), sites, groups,
                   hoisted)


def keep_dynamo_inputs(original: torch.fx.GraphModule, rewritten: torch.fx.GraphModule) -> None:
    """Carry what Dynamo tells AOTAutograd about a graph's inputs over to its rewritten copy: the
    graph's meta, ``_param_name_to_source`` and each placeholder's ``_dynamo_source`` (an input
    a pass added has none). AOTAutograd reads them to know which inputs are parameters, which
    Inductor's CUDA graphs then treat as static. Without them every parameter was copied into
    the graph's buffers at each replay: 125 device copies, 1.2 ms of a 2.5 ms decode step on an
    H200 (issue 13, gpu_check.py --profile)."""
    if "dynamo_compile_id" not in original.meta:  # not a Dynamo graph (symbolic_trace, export)
        return
    for key, value in original.meta.items():
        rewritten.meta.setdefault(key, value)
    if hasattr(original, "_param_name_to_source"):
        rewritten._param_name_to_source = original._param_name_to_source
    sources = {n.name: getattr(n, "_dynamo_source", None) for n in original.graph.find_nodes(op="placeholder")}
    for node in rewritten.graph.find_nodes(op="placeholder"):
        node._dynamo_source = sources.get(node.name)


def compile_rewritten(rw: Rewrite, example_inputs: list[Any], opts: AdafuseOptions,
                      mode: str | None = None) -> Callable:
    """The inner compiler on a rewritten graph, fed the derived inputs the passes added."""
    gm, derived = rw.graph, rw.derived_inputs
    if derived:
        example_inputs = [*example_inputs, *(d(example_inputs) for d in derived)]
    if opts.inner != "inductor":
        compiled = _inner_compiler(opts.inner)(gm, example_inputs)
    else:
        from torch._inductor import config as inductor_config
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = dict(list_mode_options(mode)) if mode is not None else {}
        legacy_cudagraphs = (patches.get("triton.cudagraphs", inductor_config.triton.cudagraphs)
                             and not inductor_config.triton.cudagraph_trees)
        if "dynamo_compile_id" in gm.meta and not legacy_cudagraphs:
            # Inductor's wrapper checks every input's sizes and strides at every call (and each
            # extern op's output). Dynamo's guards have checked the inputs of a graph it made
            # before the call (the inputs the passes add are computed from them), and the checks
            # are not cheap: in the C++ wrapper each builds a std::stringstream and a std::string.
            # Small MoLA model, batch 1, the compiled graph alone in a warm loop, interleaved, 11
            # rounds: 3.80 ms with them, 3.38 ms without (561 checks for 529 inputs); stacked
            # experts (137 inputs) 3.31 against 3.22 ms; whole decode steps in the README. Graphs
            # not from Dynamo keep them, and so do CUDA graphs without trees (the same setting
            # there also checks that a static input has not moved; trees check that themselves).
            patches["size_asserts"] = False
        compiled = None
        if opts.cpp_wrapper and _cpp_wrapper_pays(rw, example_inputs):
            try:
                compiled = compile_fx(gm, example_inputs, config_patches={
                    **patches, "cpp_wrapper": True, "cpp_wrapper_build_separate": True})
            except Exception:  # a graph its C++ wrapper cannot express: the Python wrapper always can
                log.warning("adafuse: Inductor's C++ wrapper failed on this graph; using its Python wrapper",
                            exc_info=True)
        if compiled is None:
            compiled = compile_fx(gm, example_inputs, config_patches=patches)
    return _with_derived_inputs(compiled, derived, rw.state) if derived or rw.state else compiled


def _cpp_wrapper_pays(rw: Rewrite, example_inputs) -> bool:
    """Inductor's C++ wrapper (option ``cpp_wrapper``) for a CPU graph with fused sites (not merge
    groups, whose per-step state lives in Python): the fused ops are extern calls, each ~4-8 us
    from the Python wrapper. Measured (small model, one-token step, interleaved), Python vs C++
    wrapper: stacked batch 1 6.09 vs 5.18 ms, MoLA batch 1 7.17 vs 6.42 ms, MoLA batch 8 15.88
    vs 14.70 ms (the backbone 4.69 / 4.62 / 10.25 ms under default Inductor). Compiling the
    wrapper's C++ is what it costs: medium MoLA model, cold, 137 s against 25 s without it and
    54 s for plain Inductor. Building the wrapper's entry separately from the kernels
    (``cpp_wrapper_build_separate``, at -O1) brought that to 66 s and kept the step gain (small
    MoLA, batch 1, ratio to the backbone: Python wrapper 1.63, C++ 1.49, C++ built separately
    1.41, one interleaved run), so it is built that way; medium stacked experts, cold, 1.08x the
    backbone with it against 1.18x without, compile 23 s against Inductor's 25 s."""
    return (not _on_cuda(example_inputs) and not rw.state
            and any(report.status == "fused" for report in rw.sites))


def _with_derived_inputs(compiled: Callable, derived: list, keepalive: list) -> Callable:
    """Call ``compiled`` with the passes' derived inputs appended (Dynamo passes only the
    originals); the closure also keeps the graph's run-time state (``keepalive``) alive."""

    def run(*args):
        return compiled(*args, *(d(args) for d in derived))

    run.adafuse_state = keepalive
    return run
