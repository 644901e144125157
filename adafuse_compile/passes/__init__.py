"""FX graph passes of the adafuse backend, each one rewrite, each usable on any GraphModule.

:class:`PassManager` only orders and runs passes; the backend builds it from the options.
Passes, in order: :class:`NormalizeLinearsPass` (``nn.Linear`` modules -> ``F.linear``; apply it
first to a ``symbolic_trace`` graph), :class:`SliceLinearRowsPass` (a linear read in row slices
computes those rows only), :class:`MaskedAccumulatePass` (``acc[mask] += v``, ``mask`` boolean ->
an accumulating ``index_put_``), :class:`FoldStaticLoRAPass` (static LoRA into the base weight),
:class:`FuseMoLEPass` (find sites, prove each rewrite, one fused op per site),
:class:`RouteIntoSitesPass` (a site's own top-k router into its op, CPU ``op`` lowering),
:class:`HoistRoutersPass` (routers reading one tensor: one batched matmul, bitwise-equal logits),
:class:`MergeSwitchPass` (the sites of one pre-gate decision: a group that merges or fuses per step).
"""

from .dispatch import BatchTokenDispatchPass
from .fold_lora import FoldStaticLoRAPass
from .fuse_mole import FuseMoLEPass, SiteReport
from .hoist_routers import HoistRoutersPass
from .manager import GraphPass, PassManager
from .merge_switch import GroupReport, MergeSwitchPass
from .normalize import MaskedAccumulatePass, NormalizeLinearsPass, SliceLinearRowsPass
from .route import RouteIntoSitesPass
from .sites import Site, find_sites

__all__ = ["BatchTokenDispatchPass", "MaskedAccumulatePass", "FoldStaticLoRAPass", "FuseMoLEPass", "GraphPass", "GroupReport", "HoistRoutersPass", "MergeSwitchPass", "NormalizeLinearsPass", "PassManager", "RouteIntoSitesPass", "Site",
           "SliceLinearRowsPass",
           "SiteReport", "find_sites"]
