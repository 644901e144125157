"""FX graph passes of the adafuse backend, each one rewrite, each usable on any GraphModule.

:class:`PassManager` only orders and runs passes; the backend builds it from the options.
Passes: :class:`FuseMoLEPass` (find sites, verify on probes, one fused op per site). Static-LoRA
folding and router hoisting are to come.
"""

from .fuse_mole import FuseMoLEPass, SiteReport
from .manager import GraphPass, PassManager
from .sites import Site, find_sites

__all__ = ["FuseMoLEPass", "GraphPass", "PassManager", "Site", "SiteReport", "find_sites"]
