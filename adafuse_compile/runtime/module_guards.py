"""``guards="module-tags"``: Dynamo skips the guards of module subtrees whose dicts are unchanged;
adafuse checks what that skip would miss.

Why. Dynamo guards every module, attribute and parameter the forward touched, at every call. A
model written with one ``nn.Linear`` per expert has ~18 tensors per adapted linear, and its guard
tree costs more than its adapters: "TorchDynamo Cache Lookup" per batch-1 decode step (torch.profiler,
24 steps) 0.82 ms on the small MoLA-style model and 2.78 ms on the medium one, against 0.53 ms for
the medium backbone; with this setting 0.30 and 0.94 ms.

Dynamo's ``use_recursive_dict_tags_for_guards`` skips a module's subtree while every dict in it
(``__dict__``, ``_parameters``, ``_buffers``, ``_modules``, hook dicts, nested dicts of plain
values) is the one it saw, unchanged: adding, removing or replacing a parameter, submodule, hook or
attribute writes a dict, and ``eval()`` writes ``training``. Hooks are guarded in this mode,
unlike Dynamo's default (``skip_nnmodule_hook_guards``), so a hook registered after compiling
applies. What the skip alone would miss, each checked with torch 2.13 in
``tests/runtime/test_module_guards.py``, and how this mode covers it:

- a tensor's metadata changed in place (``p.data = p.data.half()``, ``requires_grad_``): Dynamo
  still checks the subtree's tensors on its fast path (the tests pin that);
- a closure cell or a function's ``__code__``/``__defaults__`` rebound: the settings turn off
  ``assume_dunder_attributes_remain_unchanged``, so functions (and the cells under them) are
  never part of a skipped subtree;
- ``module.__class__ = Other``: each compiled graph, before it runs, checks the types of the
  objects Dynamo type-checked through a module (recorded by :class:`ModuleTagGuards`, a
  ``guard_filter_fn`` that keeps every guard), in one pass of C-level ``map``; on a change it
  raises :class:`ClassChangedError` before computing anything, after writing every module's
  ``__dict__``, so that the next call runs Dynamo's full guards and recompiles;
- a frame cached without a graph of ours (Python side effects only: nothing would run that
  check): the filter sets the tag setting per frame, and Dynamo reads it after the filter
  (``CheckFunctionManager`` filters, rebuilds, then finalizes the guards), so such a frame keeps
  its full guards. (A frame with nothing to run is not cached at all.)
"""

from __future__ import annotations

import collections
import contextlib
import logging
import operator
import re
import threading
import weakref
from typing import Any, Callable, Sequence

import torch

__all__ = ["SETTINGS", "CheckedGraph", "ClassChangedError", "ModuleTagGuards", "TAGS_SETTING",
           "require_installed"]

log = logging.getLogger("adafuse_compile")

TAGS_SETTING = "use_recursive_dict_tags_for_guards"
# The Dynamo settings of a call compiled in this mode: tags off until the frame's filter turns them
# on; functions never skipped (their __code__, __defaults__ and closure cells can be rebound); and
# module hooks guarded, which Dynamo skips by default (a hook registered after compiling would be
# ignored, also by plain torch.compile): under tags those guards are one more dict each, so free.
SETTINGS = {TAGS_SETTING: False, "assume_dunder_attributes_remain_unchanged": False,
            "skip_nnmodule_hook_guards": False}
_TYPE_CHECKED = ("TYPE_MATCH", "TENSOR_MATCH")
# Values whose __class__ cannot be assigned (and most cannot be weakly referenced).
_FIXED_CLASS = {type(None), bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset,
                collections.OrderedDict, torch.dtype, torch.device}
_PENDING = threading.local()  # the graph the backend just compiled, until the frame's guards are built
_INSTALLED = threading.local()  # a ModuleTagGuards filter is installed for the call in progress


class ClassChangedError(RuntimeError):
    """A module (or tensor) a compiled graph was specialized on had its ``__class__`` reassigned."""


class CheckedGraph:
    """A compiled graph that checks, before each call, the classes of the objects Dynamo
    type-checked through a module. The backend wraps each graph it compiles in this mode; the
    frame's guard filter then attaches the objects."""

    def __init__(self, compiled: Callable):
        self.compiled = compiled
        self.refs: list[weakref.ref] = []
        self.types: list[type] = []
        self.names: list[str] = []
        self.model: weakref.ref | None = None
        _PENDING.graph = (_compile_id(), self)

    def __call__(self, *args):
        # ~40 ns an object; a dead reference (the object was replaced, so Dynamo's own guards ran
        # on that subtree) reads as NoneType and takes the slow path, which skips it.
        if list(map(type, map(operator.call, self.refs))) != self.types:
            self._check_each()
        return self.compiled(*args)

    def __getattr__(self, name: str) -> Any:  # the inner compiled callable's attributes
        return getattr(self.__dict__["compiled"], name)

    def _check_each(self) -> None:
        for ref, expected, name in zip(self.refs, self.types, self.names, strict=True):
            obj = ref()
            if obj is not None and type(obj) is not expected:
                self._fail(name, expected, type(obj))

    def _fail(self, name: str, expected: type, actual: type):
        model = self.model() if self.model is not None else None
        if model is not None:
            for m in model.modules():  # every subtree's tag changes: the next call runs all guards
                m.__dict__["_adafuse_invalidate"] = None
                del m.__dict__["_adafuse_invalidate"]
        raise ClassChangedError(
            f"adafuse (guards='module-tags'): {name} changed its class in place since this graph was "
            f"compiled ({expected.__qualname__} -> {actual.__qualname__}), which module tags do not see. "
            "Nothing was computed; call again to recompile, or compile without guards='module-tags' to have "
            "Dynamo check every object at every call.")


class ModuleTagGuards:
    """The ``guard_filter_fn`` of one ``adafuse_compile.compile(model, guards="module-tags")``: it
    keeps every guard, gives the frame's graph the objects to type-check, and turns tag skipping
    on for that frame only when there is such a graph."""

    def __init__(self, model: torch.nn.Module):
        self.model = weakref.ref(model)

    @staticmethod
    @contextlib.contextmanager
    def installed():
        """Around each call of the forward compiled with this filter (the backend checks it)."""
        previous = getattr(_INSTALLED, "on", False)
        _INSTALLED.on = True
        try:
            yield
        finally:
            _INSTALLED.on = previous

    def __call__(self, entries: Sequence[Any]) -> list[bool]:
        compile_id, graph = getattr(_PENDING, "graph", None) or (None, None)
        _PENDING.graph = None
        checked = self._checked(entries) if graph is not None and compile_id == _compile_id() else None
        if checked is not None:
            graph.refs, graph.types, graph.names = checked
            graph.model = self.model
        else:
            log.debug("adafuse: guards='module-tags' not applied to this frame (no graph of ours, or an "
                      "object whose class it cannot watch)")
        setattr(torch._dynamo.config, TAGS_SETTING, checked is not None)
        return [True] * len(entries)

    @staticmethod
    def _checked(entries) -> tuple[list, list, list] | None:
        """Weak references, classes and names of the objects to type-check; ``None`` if one
        cannot be weakly referenced."""
        refs, types, names, seen = [], [], [], set()
        for e in entries:
            if e.guard_type in _TYPE_CHECKED and e.has_value and id(e.value) not in seen \
                    and type(e.value) not in _FIXED_CLASS and _in_module_tree(e):
                seen.add(id(e.value))
                try:
                    refs.append(weakref.ref(e.value))
                except TypeError:
                    return None
                types.append(type(e.value))
                names.append(_readable(e.name))
        return refs, types, names


def _readable(name: str) -> str:
    """``args[0]._modules['model']._parameters['w']`` -> ``args[0].model.w``."""
    return re.sub(r"\._(?:modules|parameters|buffers)\['([^']*)'\]", r".\1", name)


def require_installed() -> None:
    """Raise unless a :class:`ModuleTagGuards` filter is installed for the call being compiled."""
    if not getattr(_INSTALLED, "on", False):
        raise ValueError("guards='module-tags' needs the guard filter that adafuse_compile.compile(model, "
                         "guards='module-tags') installs; torch.compile(options=...) cannot install it")


def _compile_id():
    """Dynamo's id of the frame compile in progress: its backend call and guard filter share it."""
    from torch._guards import CompileContext

    return CompileContext.current_compile_id()


def _in_module_tree(entry) -> bool:
    """Whether the guarded object is a module or was reached through one (only module subtrees
    are ever skipped: inputs and globals keep their guards)."""
    from torch._dynamo.source import NNModuleSource

    if isinstance(entry.value, torch.nn.Module):
        return True
    source = entry.orig_guard.originating_source
    while source is not None:
        if isinstance(source, NNModuleSource):
            return True
        source = getattr(source, "base", None)
    return False
