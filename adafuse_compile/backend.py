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
from .passes import FuseMoLEPass, PassManager

log = logging.getLogger("adafuse_compile")

__all__ = ["adafuse_backend", "build_pass_manager"]


def build_pass_manager(opts: AdafuseOptions) -> PassManager:
    """The passes the options enable, in order."""
    passes = []
    if opts.fuse:
        passes.append(FuseMoLEPass())
    return PassManager(passes, strict=opts.strict)


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
    gm = build_pass_manager(opts)(gm, example_inputs)
    if opts.inner == "inductor" and mode is not None:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=list_mode_options(mode))
    return _inner_compiler(opts.inner)(gm, example_inputs)
