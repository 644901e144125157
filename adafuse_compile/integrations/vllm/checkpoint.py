"""The on-disk form of a MoLE Llama that vLLM serves: a Hugging Face directory plus our adapters.

Kept free of vLLM so that the training side (and the tests' Hugging Face reference) can write
and read it without the engine installed.
"""

from __future__ import annotations

import json
import os
import pathlib

import torch
from torch import nn

from ...models.io import FORMAT, adapter_state, save_adapters

ARCHITECTURE = "AdafuseMoLELlamaForCausalLM"
"""The ``architectures`` entry of ``config.json`` that makes vLLM load :mod:`.model`."""

ADAPTER_FILE = "adafuse_adapters.safetensors"
"""The adapters, in :func:`adafuse_compile.models.io.save_adapters`'s format, beside the backbone."""


def save_mole_checkpoint(model: nn.Module, path: str | os.PathLike) -> pathlib.Path:
    """Write ``model`` (a transformers ``LlamaForCausalLM`` with adapters from
    :func:`adafuse_compile.models.add_lora_moe` or ``add_pregated_lora_moe``) as a directory vLLM
    serves with this plugin: ``config.json`` (architecture :data:`ARCHITECTURE`), the backbone as
    ``model.safetensors`` under the plain Llama names (the adapted linears' ``base_layer`` level
    removed) and the adapters as :data:`ADAPTER_FILE`.

    The backbone keeps the Hugging Face names so that the same directory is an ordinary Llama
    checkpoint for every other tool; the adapters stay in their own file, whose metadata carries
    each site's configuration (gate, k, scaling), checked when it is read.
    """
    from safetensors.torch import save_file

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    adapters, _ = adapter_state(model)
    if not adapters:
        raise ValueError("model has no LoRA-MoE adapters; use save_pretrained for a plain Llama")
    save_adapters(model, out / ADAPTER_FILE)
    backbone, seen = {}, {}
    for key, tensor in model.state_dict().items():
        if key in adapters:
            continue
        name = key.replace(".base_layer.", ".")
        # safetensors refuses tensors sharing memory (tied embeddings): store tied ones once,
        # as transformers does, and let the config's tie_word_embeddings say they are tied.
        ptr = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if ptr in seen and getattr(model.config, "tie_word_embeddings", False):
            continue
        seen[ptr] = name
        backbone[name] = tensor.detach().to("cpu").contiguous()
    save_file(backbone, os.fspath(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["architectures"] = [ARCHITECTURE]
    if config.get("dtype") is None:  # vLLM's "auto" dtype reads it; an unset one means float32 here
        config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_adapter_sites(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """``(configs, tensors)`` of an adapter file: each site's configuration by module path (as
    :func:`adafuse_compile.models.io.save_adapters` wrote it) and each tensor's full, unsharded
    shape and dtype by key. Reads the header only; the tensors are loaded with the weights."""
    from safetensors import safe_open

    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an adafuse_compile adapter file (format={meta.get('format')!r})")
        tensors = {}
        for k in f.keys():
            sl = f.get_slice(k)
            if sl.get_dtype() not in _DTYPES:
                raise ValueError(f"{path}: tensor {k} has dtype {sl.get_dtype()}, expected one of {sorted(_DTYPES)}")
            tensors[k] = (tuple(sl.get_shape()), _DTYPES[sl.get_dtype()])
    return json.loads(meta.get("sites", "{}")), tensors


def load_adapter_tensors(path: str | os.PathLike):
    """Every tensor of an adapter file, as ``(key, tensor)`` pairs (vLLM's weight iterator form)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        for key in f.keys():
            yield key, f.get_tensor(key)

