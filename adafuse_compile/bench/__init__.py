"""Benchmark tooling (on top of everything else): ``adafuse-bench`` (:mod:`.cli`), its report
(:mod:`.report`), interleaved timing (:mod:`.timing`) and greedy decoding on a static cache
(:mod:`.decoding`)."""

from .cli import main

__all__ = ["main"]
