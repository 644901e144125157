"""Saving and loading adapter weights only, with safetensors (never pickle).

Keys are module paths plus parameter names (``model.layers.0.self_attn.q_proj.lora_A``), so a
file fits exactly the sites of the model it came from; the backbone is not stored. Site configs
(gate, top_k, scaling...) go in the metadata and are checked too: loading experts trained under
another gate or scaling would silently change the model.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from .layers import MoLELinearBase, PreGate

FORMAT = "adafuse_compile.mole/1"


def _site_config(m: nn.Module) -> dict:
    cfg = {k: getattr(m, k) for k in ("experts", "top_k", "gate", "top_p", "entropy_threshold")}
    if isinstance(m, MoLELinearBase):
        cfg.update(kind=type(m).__name__, rank=m.rank, scaling=m.scaling, shared_A=m.shared_A)
    else:
        cfg.update(kind="PreGate", normalize=m.normalize)
    return cfg


def adapter_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """``(tensors, configs)``: every adapter tensor by full key, every site's config by path."""
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, dict] = {}
    for name, m in model.named_modules():
        if not isinstance(m, (MoLELinearBase, PreGate)):
            continue
        configs[name] = _site_config(m)
        for key, t in m.state_dict(keep_vars=True).items():
            if not key.startswith("base_layer."):
                tensors[f"{name}.{key}" if name else key] = t
    return tensors, configs


def save_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's adapter tensors (lora_A/B, routers, pre-gate) to a safetensors file."""
    from safetensors.torch import save_file

    tensors, configs = adapter_state(model)
    if not tensors:
        raise ValueError("model has no LoRA-MoE adapters to save")
    out = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    save_file(out, os.fspath(path), metadata={"format": FORMAT, "sites": json.dumps(configs, sort_keys=True)})


def load_adapters(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load adapter tensors saved by :func:`save_adapters` into ``model``'s matching sites.

    Shape and site-config mismatches always raise (they would give wrong outputs); with
    ``strict`` missing or unexpected keys raise too, otherwise only the common keys load.
    Tensors are cast to each parameter's dtype and device. Returns ``model``.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an adafuse_compile adapter file (format={meta.get('format')!r})")
        saved = {k: f.get_tensor(k) for k in f.keys()}
    saved_cfg = json.loads(meta.get("sites", "{}"))
    own, own_cfg = adapter_state(model)
    if not own:
        raise ValueError("model has no LoRA-MoE adapters to load into; add them first")

    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    if strict and (missing or unexpected):
        raise KeyError(
            f"adapter keys do not match {path}: missing {missing[:5]}{'...' if len(missing) > 5 else ''} "
            f"({len(missing)}), unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )
    bad_cfg = [
        f"{site}: file {saved_cfg[site]} vs model {cfg}"
        for site, cfg in own_cfg.items()
        if site in saved_cfg and saved_cfg[site] != json.loads(json.dumps(cfg))
    ]
    if bad_cfg:
        raise ValueError("adapter configs differ: " + "; ".join(bad_cfg[:3]))
    common = [k for k in own if k in saved]
    bad_shape = [f"{k}: file {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}" for k in common if saved[k].shape != own[k].shape]
    if bad_shape:
        raise ValueError("adapter shapes differ: " + "; ".join(bad_shape[:5]))
    with torch.no_grad():
        for k in common:
            own[k].copy_(saved[k].to(device=own[k].device, dtype=own[k].dtype))
    return model
