"""Greedy decoding with a static KV cache: the loop that ``adafuse-bench`` times and compares.

One :class:`GreedyDecoder` holds one model, one forward (eager or compiled) and one batch. The
prompt is prefilled once, eagerly: only the one-token decode graph is compiled (a compiled
prefill would be a second graph per configuration and batch, doubling compile time for a step
that is not timed). Every :meth:`GreedyDecoder.decode` then decodes the same N tokens again from
the end of the prompt; the static cache's entries past the current position are masked, so
repeats give the same tokens and can be timed back to back (:meth:`GreedyDecoder.rewind`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

__all__ = ["DecodeResult", "GreedyDecoder", "compare_to_reference"]


@dataclasses.dataclass
class DecodeResult:
    """Tokens ``[B, N]`` chosen by argmax at each decode step; logits ``[N, B, V]`` if kept."""

    tokens: torch.Tensor
    logits: torch.Tensor | None = None


class GreedyDecoder:
    """Decode ``new_tokens`` greedy tokens after a prefilled prompt, as often as asked.

    ``forward`` is ``model.forward`` or a compiled version of it (``torch.compile`` of the bound
    method: compiling the module and calling ``generate`` would run uncompiled).
    """

    def __init__(self, model: torch.nn.Module, forward: Callable, prompt: torch.Tensor, new_tokens: int):
        from transformers import StaticCache

        if new_tokens < 1:
            raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
        self.forward = forward
        self.new_tokens = new_tokens
        length = prompt.shape[1]
        self.cache = StaticCache(config=model.config, max_cache_len=length + new_tokens)
        # One tensor per position, made once: the timed loop allocates nothing of its own.
        self.positions = [torch.tensor([length + i], device=prompt.device) for i in range(new_tokens)]
        with torch.inference_mode():
            out = model(prompt, past_key_values=self.cache, cache_position=torch.arange(length, device=prompt.device),
                        use_cache=True)
            # The token the prompt predicts. Made in inference mode like every later step's
            # token: a normal tensor has another dispatch key set, and Dynamo would recompile.
            self.first = out.logits[:, -1].argmax(-1, keepdim=True)
        self.length = length

    def rewind(self) -> None:
        """Forget the decoded tokens: the cache holds the prompt only again.

        transformers 5 static caches count their own length (``cumulative_length``, a tensor
        at a static address, so reset in place) and ignore ``cache_position``; older versions
        write where ``cache_position`` says, which :meth:`decode` passes as well.
        """
        for layer in getattr(self.cache, "layers", ()):
            counter = getattr(layer, "cumulative_length", None)
            if isinstance(counter, torch.Tensor):
                counter.fill_(self.length)
            if hasattr(layer, "cumulative_length_int"):  # sliding-window layers
                layer.cumulative_length_int = self.length

    @torch.inference_mode()
    def decode(self, teacher: torch.Tensor | None = None, keep_logits: bool = False) -> DecodeResult:
        """One greedy decode of ``new_tokens`` steps from the end of the prompt.

        With ``teacher`` (``[B, N]`` tokens of a reference run), step ``i`` is fed the
        reference's token ``i - 1`` instead of its own: outputs are then compared on identical
        inputs, and one flipped argmax does not make every later step differ.
        """
        self.rewind()
        token, chosen, logits = self.first, [], []
        for i, position in enumerate(self.positions):
            step = self.forward(token, past_key_values=self.cache, cache_position=position, use_cache=True)
            last = step.logits[:, -1]
            chosen.append(last.argmax(-1, keepdim=True))
            if keep_logits:
                logits.append(last.float().clone())
            # A fresh contiguous copy: a column of ``teacher`` keeps the strides of [B, N] (even a
            # plain clone does), and Dynamo guards on strides: it would recompile.
            token = chosen[-1] if teacher is None else teacher[:, i : i + 1].clone(memory_format=torch.contiguous_format)
        return DecodeResult(torch.cat(chosen, dim=1), torch.stack(logits) if keep_logits else None)


def compare_to_reference(result: DecodeResult, reference: DecodeResult) -> dict:
    """Token equality and max |logit difference| of a teacher-forced run against its reference.

    Returns ``tokens_equal``, ``first_mismatch`` (``None`` or ``{"step", "row", "got",
    "expected"}``) and ``max_logit_diff``.
    """
    diff = (result.tokens != reference.tokens).nonzero()
    first = None
    if len(diff):
        row, step = (int(v) for v in diff[diff[:, 1].argmin()])
        first = {"step": step, "row": row, "got": int(result.tokens[row, step]),
                 "expected": int(reference.tokens[row, step])}
    max_diff = None
    if result.logits is not None and reference.logits is not None:
        max_diff = float((result.logits - reference.logits).abs().max())
    return {"tokens_equal": first is None, "first_mismatch": first, "max_logit_diff": max_diff}
