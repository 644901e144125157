"""adafuse_compile: a torch.compile backend for Mixture-of-LoRA-Experts (MoLE) models.

``torch.compile(model, backend="adafuse")`` works after installation without importing this
package (entry point ``torch_dynamo_backends``). Importing it registers the backend only when
that entry point is absent (a source checkout on ``PYTHONPATH``): registering twice would trip
torch's duplicate-name assertion when Dynamo later loads the entry point.
"""

from __future__ import annotations

from importlib import metadata

from . import kernels  # registers torch.ops.adafuse.*
from .api import compile, refresh
from .backend import adafuse_backend
from .explain import ExplainReport, explain
from .runtime.merge_state import MergedGroup
from .runtime.module_guards import ClassChangedError
from .options import AdafuseOptions
from .pregate import ApproximationReport, approximate_pregate

__all__ = ["AdafuseOptions", "ApproximationReport", "ClassChangedError", "ExplainReport", "MergedGroup",
           "adafuse_backend", "approximate_pregate", "compile", "explain", "kernels", "refresh"]
__version__ = "0.1.0"


def _register_backend_without_entry_point() -> None:
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    has_entry_point = any(
        ep.name == "adafuse" for ep in metadata.entry_points(group="torch_dynamo_backends")
    )
    if not has_entry_point and "adafuse" not in _COMPILER_FNS:
        register_backend(adafuse_backend, name="adafuse")


_register_backend_without_entry_point()
