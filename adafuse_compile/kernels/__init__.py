"""Fused ops for LoRA-MoE adapters, registered as ``torch.ops.adafuse.*`` on import.

Each op has a pure-torch reference (:mod:`.reference`), a fake impl for tracing, a fast CPU
impl and a Triton kernel for CUDA (``*_triton.py``, imported only when a CUDA tensor arrives). On
CUDA, compiled graphs call ``adafuse::lora_moe_linear_cuda``, a ``torch.library.triton_op``
whose kernels Inductor launches itself.
"""

from .lora_moe_linear import (check_lora_moe_args, lora_moe_linear, lora_moe_linear_lists, opaque_cuda_kernels,
                              routed_lora_moe_linear)
from .merge_ops import merge_rebase_, merge_switch_, switch_coefficients

__all__ = [
    "check_lora_moe_args",
    "lora_moe_linear",
    "lora_moe_linear_lists",
    "opaque_cuda_kernels",
    "routed_lora_moe_linear",
    "merge_rebase_",
    "merge_switch_",
    "switch_coefficients",
]
