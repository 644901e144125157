"""``adafuse_compile.compile``: torch.compile with the adafuse backend and the Dynamo settings
that let data-dependent adapter dispatch land in one graph, scoped to this model."""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["compile"]

# Token-dispatch adapters (MixLoRA, MoLA: ``torch.where(mask)`` + ``index_add_``) call nonzero,
# whose output size depends on the data. By default Dynamo breaks the graph there, and a break
# inside the expert loop makes it run the whole forward eagerly (MEASUREMENTS.md: 18 breaks, 68
# fragments per step on an 8-layer model). Capturing such ops gives one graph the passes can
# rewrite: after fusion the nonzero calls are gone.
_DYNAMO_SETTINGS = {"capture_dynamic_output_shape_ops": True}


def compile(model: torch.nn.Module, *, dynamic: bool | None = None, fullgraph: bool = False,
            mode: str | None = None, **options: Any) -> torch.nn.Module:
    """``torch.compile(model, backend="adafuse", options=options)``, plus scoped Dynamo settings.

    The settings apply whenever the returned module runs (and so whenever Dynamo compiles or
    recompiles it), not globally: other models compiled in the same process are unaffected.
    ``options`` are the backend's (see :class:`adafuse_compile.AdafuseOptions`).
    """
    compiled = torch.compile(model, backend="adafuse", options=options or None, dynamic=dynamic,
                             fullgraph=fullgraph, mode=mode)
    forward = compiled.forward

    @functools.wraps(forward)
    def forward_with_settings(*args, **kwargs):
        with torch._dynamo.config.patch(_DYNAMO_SETTINGS):
            return forward(*args, **kwargs)

    compiled.forward = forward_with_settings
    return compiled
