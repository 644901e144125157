"""The ``adafuse`` torch.compile backend: adafuse passes on the Dynamo graph, then an inner compiler.

Registered under the name ``adafuse`` through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="adafuse")`` works after ``pip install`` with no import.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch
import torch.fx

from .options import AdafuseOptions
from .passes import FoldStaticLoRAPass, FuseMoLEPass, HoistRoutersPass, MergeSwitchPass, PassManager
from .passes.manager import DERIVED_INPUTS, KEEPALIVE, copy_graph

log = logging.getLogger("adafuse_compile")

__all__ = ["adafuse_backend", "build_pass_manager", "compile_rewritten", "rewrite"]


def build_pass_manager(opts: AdafuseOptions, example_inputs=None) -> PassManager:
    """The passes the options enable, in order."""
    passes = []
    if opts.fold and opts.freeze:
        passes.append(FoldStaticLoRAPass())
    if opts.fuse:
        passes.append(FuseMoLEPass(lowering=resolve_lowering(opts, example_inputs), strict=opts.strict,
                                   freeze=opts.freeze))
    if opts.hoist:
        passes.append(HoistRoutersPass(freeze=opts.freeze))
    if opts.fuse:
        passes.append(MergeSwitchPass(opts.strategy))
    return PassManager(passes, strict=opts.strict)


def resolve_lowering(opts: AdafuseOptions, example_inputs=None) -> str:
    """``"auto"``: Inductor's own code for CPU graphs (it fuses the gathers into its kernels;
    the opaque op costs a dispatcher call per site), the custom op everywhere else."""
    if opts.lowering != "auto":
        return opts.lowering
    on_cpu = not any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs or ())
    return "decomposed" if opts.inner == "inductor" and on_cpu else "op"


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

    ``mode`` is accepted for ``torch.compile``'s signature and passed to Inductor.
    """
    opts = AdafuseOptions.from_dict(options)
    if opts.pregate == "approximate":  # needs the model, not a graph: adafuse_compile.compile does it
        from .pregate import APPROXIMATE_NEEDS_MODEL

        raise ValueError(APPROXIMATE_NEEDS_MODEL)
    try:
        return compile_rewritten(rewrite(gm, example_inputs, opts), example_inputs, opts, mode)
    except Exception:
        # Anything of ours (a pass, a derived input, the inner compiler on the rewritten graph):
        # the unrewritten graph is always a correct answer.
        if opts.strict:
            raise
        log.warning("adafuse: rewriting failed; compiling the graph unrewritten", exc_info=True)
        return compile_rewritten(gm, example_inputs, opts, mode)


def rewrite(gm: torch.fx.GraphModule, example_inputs: list[Any], opts: AdafuseOptions,
            manager: PassManager | None = None) -> torch.fx.GraphModule:
    """A rewritten copy of ``gm``. Dynamo keeps using its own graph (its placeholders must stay
    as it made them), and passes may add inputs (see ``DERIVED_INPUTS``). ``manager`` defaults
    to the one the options build; pass one to read its passes' reports afterwards."""
    manager = manager or build_pass_manager(opts, example_inputs)
    return manager(torch.fx.GraphModule(gm, copy_graph(gm)), example_inputs)


def compile_rewritten(gm: torch.fx.GraphModule, example_inputs: list[Any], opts: AdafuseOptions,
                      mode: str | None = None) -> Callable:
    """The inner compiler on a rewritten graph, fed the derived inputs the passes added."""
    derived = gm.meta.get(DERIVED_INPUTS, [])
    keepalive = gm.meta.get(KEEPALIVE, [])
    if derived:
        example_inputs = [*example_inputs, *(d(example_inputs) for d in derived)]
    if opts.inner == "inductor" and mode is not None:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, example_inputs, config_patches=list_mode_options(mode))
    else:
        compiled = _inner_compiler(opts.inner)(gm, example_inputs)
    return _with_derived_inputs(compiled, derived, keepalive) if derived or keepalive else compiled


def _with_derived_inputs(compiled: Callable, derived: list, keepalive: list) -> Callable:
    """Call ``compiled`` with the passes' derived inputs appended (Dynamo passes only the
    originals); the closure also keeps the graph's run-time state (``keepalive``) alive."""

    def run(*args):
        return compiled(*args, *(d(args) for d in derived))

    run.adafuse_state = keepalive
    return run
