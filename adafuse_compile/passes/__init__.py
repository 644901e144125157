"""FX graph passes of the adafuse backend, each one rewrite, each usable on any GraphModule.

:class:`PassManager` only orders and runs passes; the backend builds it from the options.
Site detection, static-LoRA folding, fusion and router hoisting arrive as passes here.
"""

from .manager import GraphPass, PassManager

__all__ = ["GraphPass", "PassManager"]
