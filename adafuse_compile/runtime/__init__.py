"""What compiled graphs call at every step, with state: a pre-gated group's merged weights and
per-step mode (:mod:`.merge_state`), the cost model that chooses it (:mod:`.cost_model`), and the
two custom ops that reach that state by a group id (:mod:`.switched_ops`). Below the passes,
above the stateless kernels."""

from . import switched_ops  # registers torch.ops.adafuse.group_decide / group_site_linear
from .cost_model import CostModel, GroupShape
from .merge_state import MergedGroup, SwitchedGroup

__all__ = ["CostModel", "GroupShape", "MergedGroup", "SwitchedGroup", "switched_ops"]
