"""Reference MoLE model zoo: LoRA-MoE layers, gate variants, seeded Llama backbones, adapter I/O.

These are the eager models the compiler is measured against and must reproduce exactly.
"""

from .io import adapter_state, load_adapters, save_adapters
from .layers import (
    GATES,
    LoRAMoELinear,
    MoLELinearBase,
    PreGate,
    PreGatedEmbedding,
    PreGatedLoRAMoELinear,
    gate_k,
    route,
)
from .llama import (
    DEFAULT_TARGETS,
    SIZES,
    adapter_sites,
    add_lora_moe,
    add_pregated_lora_moe,
    find_pregate,
    tiny_llama,
)

__all__ = [
    "GATES",
    "DEFAULT_TARGETS",
    "SIZES",
    "LoRAMoELinear",
    "MoLELinearBase",
    "PreGate",
    "PreGatedEmbedding",
    "PreGatedLoRAMoELinear",
    "adapter_sites",
    "adapter_state",
    "add_lora_moe",
    "add_pregated_lora_moe",
    "find_pregate",
    "gate_k",
    "load_adapters",
    "route",
    "save_adapters",
    "tiny_llama",
]
