"""How many times :func:`adafuse_compile.refresh` was called in this process.

Every cache of values computed from weights (derived inputs, merged copies) keys on it beside
the tensors' identities and version counters, so one increment invalidates them all, in every
thread, without a registry of caches to walk.
"""

from __future__ import annotations

__all__ = ["advance", "current"]

_count = 0


def current() -> int:
    return _count


def advance() -> None:
    global _count
    _count += 1
