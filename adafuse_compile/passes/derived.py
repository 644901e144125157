"""Graph inputs computed from other graph inputs before each call, cached until those change.

A pass that wants a tensor precomputed from parameters (a folded weight, stacked experts) adds
a placeholder and registers a :class:`DerivedInput` in ``gm.meta[DERIVED_INPUTS]``; the backend
evaluates it on the live inputs before every call. The result is cached by the identity,
version counter and storage pointer of the tensors it reads: in-place updates (``copy_``,
``load_state_dict``) bump the version, ``param.data = new`` changes the storage, and a new tensor
object is a new identity, so a stale value is never used, and an unchanged one costs a check per
tensor. A write through ``.data`` changes none of these: the backend uses derived inputs
only with ``freeze=True``, whose contract is that :func:`adafuse_compile.refresh` is called after
such writes (it advances :mod:`adafuse_compile.runtime.epoch`, part of the cache key).
"""

from __future__ import annotations

import dataclasses
import threading

import torch
import torch.fx as fx

from ..runtime import epoch
from .manager import DERIVED_INPUTS

__all__ = ["DerivedInput", "StackedTensors", "add_derived_input"]


@dataclasses.dataclass
class DerivedInput:
    """``compute(*inputs[positions])``, recomputed only when one of those tensors changed."""

    positions: tuple[int, ...]
    # The tensors last used (held, not ids: a freed tensor's id can come back for a new one).
    _tensors: list = dataclasses.field(default_factory=list, repr=False)
    _versions: tuple = dataclasses.field(default=(), repr=False)
    _value: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def compute(self, *tensors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, inputs) -> torch.Tensor:
        tensors = [inputs[i] for i in self.positions]
        # The storage pointer too: ``param.data = new`` swaps it without bumping ``_version``.
        versions = (epoch.current(), *((t._version, t.data_ptr()) for t in tensors))
        with self._lock:  # two threads calling one compiled graph
            same = len(tensors) == len(self._tensors) and all(a is b for a, b in zip(tensors, self._tensors))
            if not same or versions != self._versions:
                with torch.no_grad():
                    self._value = self.compute(*tensors)
                self._tensors, self._versions = tensors, versions
            return self._value


@dataclasses.dataclass
class StackedTensors(DerivedInput):
    """``torch.stack`` of per-expert matrices: done once, not on every call."""

    def compute(self, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.stack(tensors)


def add_derived_input(gm: fx.GraphModule, derived: DerivedInput, name: str, like: fx.Node | None = None) -> fx.Node:
    """A new last placeholder fed by ``derived``; shape metadata copied from ``like`` (same shape)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        node = gm.graph.placeholder(name)
    if like is not None:  # shape and dtype only: Dynamo reads "grapharg" to know what it passes
        node.meta.update({k: v for k, v in like.meta.items() if k in ("example_value", "val")})
    # A static input for Inductor's CUDA graphs, as Dynamo marks parameters: the cached value keeps
    # its address while its sources are unchanged, so a graph replays without copying it in (and
    # is re-recorded when it changes). Unmarked, every replay copied it.
    node.meta.setdefault("tensor_dict", {})["_dynamo_static_input_type"] = "unguarded"
    gm.meta.setdefault(DERIVED_INPUTS, []).append(derived)
    return node
