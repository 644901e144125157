"""vLLM plugin: serve a Mixture-of-LoRA-Experts Llama under the ``adafuse`` backend.

Installed as the ``vllm.general_plugins`` entry point ``adafuse`` (``pip install
adafuse-compile[vllm]``), vLLM calls :func:`register` in every process it starts (engine core,
each tensor-parallel worker). It makes ``compilation_config={"backend": "adafuse"}`` resolve
(importing ``adafuse_compile`` registers the backend when no entry point is installed) and
registers the architecture :data:`ARCHITECTURE`, implemented in :mod:`.model`.

A checkpoint is a Hugging Face directory: ``config.json`` naming the architecture, the
backbone's safetensors, and the adapters in our format (:data:`ADAPTER_FILE`, written by
:func:`adafuse_compile.models.io.save_adapters`); :func:`save_mole_checkpoint` writes one from
a model of :mod:`adafuse_compile.models`. Only :mod:`.model` imports vLLM, and only when vLLM
loads the architecture.
"""

from __future__ import annotations

import logging

from .checkpoint import ADAPTER_FILE, ARCHITECTURE, read_adapter_sites, save_mole_checkpoint

log = logging.getLogger("adafuse_compile")

__all__ = ["ADAPTER_FILE", "ARCHITECTURE", "read_adapter_sites", "register", "save_mole_checkpoint"]


def register() -> None:
    """The ``vllm.general_plugins`` hook: the ``adafuse`` backend and the MoLE Llama architecture.

    vLLM may call it several times per process (its docs say so); both steps are idempotent.
    The model class is registered by its import path, so vLLM imports it (and its vLLM layers)
    only when a checkpoint names the architecture.
    """
    import adafuse_compile  # noqa: F401  (registers the "adafuse" torch.compile backend if no entry point does)
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "adafuse_compile.integrations.vllm.model:AdafuseMoLELlamaForCausalLM")
        log.debug("adafuse: registered the vLLM architecture %s", ARCHITECTURE)
