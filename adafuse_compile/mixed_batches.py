"""Mixed-adapter batches of PEFT LoRA models: a new mix of adapters without a recompile.

PEFT serves a batch whose rows use different adapters with ``model(..., adapter_names=[...])``:
hooks hand the list of names to every LoRA layer, which slices each adapter's rows with
Python index lists (``result[rows] += lora(x[rows])``). Under ``torch.compile`` those lists
are constants of the graph, so every new composition of a batch is a new graph (a recompile,
tens of seconds), and the slices hide the adapters from the passes.

:func:`adafuse_compile.compile` turns the names into a tensor instead: a gate ``[batch, tokens,
adapters]`` that is 1 where a row uses an adapter (0 for ``"__base__"``), set on each LoRA
layer for the duration of the call. The layers then compute ``base(x) + sum_e gate[..., e] *
scaling_e * B_e A_e x``: the same products for the rows of each adapter, plus exact zeros for
the others. That is a dense decision read from elsewhere (X-LoRA's form), which the passes
prove and fuse like any other; a new composition is new gate values, not a new graph.

Only plain LoRA on ``nn.Linear`` layers takes this path: with DoRA or another LoRA variant,
LoRA on embeddings or convolutions, merged or disabled adapters, PEFT's own path runs
(correct, recompiling per composition), and the log says why.
"""

from __future__ import annotations

import contextlib
import logging
import types

import torch

log = logging.getLogger("adafuse_compile")

__all__ = ["GATE_ATTR", "MixedBatches"]

GATE_ATTR = "adafuse_mixed_gate"  # the gate a LoRA layer reads while a mixed batch is served


class MixedBatches:
    """The gated path of a PEFT LoRA model's layers (installed once), and the gate of a call."""

    def __init__(self, model: torch.nn.Module) -> None:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora import Linear as LoraLinear

        lora = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self.layers = [m for m in lora if type(m) is LoraLinear]
        self.adapters = sorted({name for m in lora for name in m.lora_A.keys()})
        self.reason = None
        if len(self.layers) != len(lora) or any(m.lora_embedding_A for m in lora):
            self.reason = "LoRA on layers other than nn.Linear"
        elif any(getattr(m, "lora_variant", None) for m in self.layers):
            self.reason = "a LoRA variant (DoRA, aLoRA, ...)"
        if self.reason is None:
            for layer in self.layers:
                if "forward" not in layer.__dict__:  # installed once per layer
                    layer.forward = types.MethodType(_gated_forward(self.adapters, type(layer).forward), layer)
        else:
            log.info("adafuse: mixed-adapter batches run PEFT's own path (one graph per composition): %s",
                     self.reason)

    @staticmethod
    def applies_to(model: torch.nn.Module) -> bool:
        try:
            from peft.tuners.lora import LoraLayer
        except ImportError:
            return False
        return any(isinstance(m, LoraLayer) for m in model.modules())

    def gate(self, adapter_names, tokens: int) -> torch.Tensor:
        """``[len(adapter_names), tokens, adapters]``: 1 where a row uses an adapter."""
        unknown = sorted({n for n in adapter_names if n != "__base__"} - set(self.adapters))
        if unknown:  # PEFT's own check, message included
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
        weight = self.layers[0].lora_A[next(iter(self.layers[0].lora_A))].weight if self.layers else None
        index = {name: e for e, name in enumerate(self.adapters)}
        gate = torch.zeros(len(adapter_names), tokens, len(self.adapters),
                           dtype=weight.dtype if weight is not None else torch.float32,
                           device=weight.device if weight is not None else None)
        for row, name in enumerate(adapter_names):
            if name != "__base__":
                gate[row, :, index[name]] = 1
        return gate

    @contextlib.contextmanager
    def serving(self, adapter_names, tokens: int):
        """The layers read the gate of ``adapter_names`` (PEFT's path if :attr:`reason` is set)."""
        if self.reason is not None:
            yield {"adapter_names": adapter_names}
            return
        gate = self.gate(adapter_names, tokens)
        for layer in self.layers:
            setattr(layer, GATE_ATTR, gate)
        try:
            yield {}
        finally:
            for layer in self.layers:
                layer.__dict__.pop(GATE_ATTR, None)


def _gated_forward(adapters: list[str], peft_forward):
    def forward(self, x, *args, **kwargs):
        gate = self.__dict__.get(GATE_ATTR)
        if gate is None or self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
            return peft_forward(self, x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        # Each adapter's scaling rides on the gate: one decision [..., adapters] for the site.
        scales = torch.tensor([float(self.scaling.get(name, 0.0)) for name in adapters], dtype=gate.dtype,
                              device=gate.device)
        weights = gate * scales
        for e, name in enumerate(adapters):
            if name not in self.lora_A.keys():
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            h = lora_B(lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype))))
            result = result + (h * weights[..., e:e + 1]).to(dtype)
        return result

    return forward
