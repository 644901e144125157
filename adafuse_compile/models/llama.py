"""Random, seeded Llama backbones and the two ways of putting LoRA-MoE adapters on them.

``tiny_llama`` builds a ``transformers`` ``LlamaForCausalLM`` from a config (no downloads), so
tests and benchmarks run on the real model code the compiler must handle. ``add_lora_moe`` gives
every target linear its own router (MixLoRA/MoLA style: the slow baseline AdaFuse accelerates);
``add_pregated_lora_moe`` gives them one shared token-level gate on the embeddings (AdaFuse).
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Iterable

import torch
from torch import nn

from .layers import GATES, LoRAMoELinear, MoLELinearBase, PreGate, PreGatedEmbedding, PreGatedLoRAMoELinear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

SIZES: dict[str, dict] = {
    # GQA in tiny so q/k/v have different shapes; Llama-2-like MHA in the bigger ones
    # (the paper's model), intermediate = 2.6875 x hidden as in Llama-2-7B (4096 -> 11008).
    "tiny": dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
    ),
    "small": dict(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048,
    ),
    "medium": dict(
        hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048,
    ),
}


def tiny_llama(size: str = "tiny", seed: int = 0, **overrides):
    """A randomly initialized ``LlamaForCausalLM`` of a preset ``size``, in eval mode.

    ``overrides`` are ``LlamaConfig`` fields (e.g. ``num_hidden_layers=1``), plus ``dtype`` to
    cast the model. The global RNG is left untouched, so building a model never perturbs tests.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {tuple(SIZES)}")
    dtype = overrides.pop("dtype", None)
    config = LlamaConfig(**{**SIZES[size], **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    if model.generation_config.pad_token_id is None:  # silences generate()'s warning
        model.generation_config.pad_token_id = config.eos_token_id
    return model.eval()


def adapter_sites(model: nn.Module) -> list[str]:
    """Module paths of every adapted linear (both variants), in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, MoLELinearBase)]


def find_pregate(model: nn.Module) -> PreGate | None:
    """The model's PreGate, or ``None`` if it has no pre-gated adapters."""
    for m in model.modules():
        if isinstance(m, PreGate):
            return m
    return None


def _site_seed(seed: int, name: str) -> int:
    """Per-site seed from the module path: adapters do not depend on traversal order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _matching_linears(model: nn.Module, targets: Iterable[str] | str) -> list[tuple[str, nn.Linear]]:
    """``(name, linear)`` for each ``nn.Linear`` whose last name part (or full path) is a target."""
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets:
        raise ValueError("targets is empty")
    if adapter_sites(model) or find_pregate(model) is not None:
        raise ValueError("model already has LoRA-MoE adapters; adapt a fresh backbone")
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and (name.rsplit(".", 1)[-1] in targets or name in targets)
    ]
    if not found:
        linear_kinds = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no nn.Linear matched targets {targets}; the model's linears are named {linear_kinds}")
    return found


def _check_args(experts: int, top_k: int, rank: int, gate: str, alpha: float) -> None:
    if gate not in GATES:
        raise ValueError(f"unknown gate {gate!r}; expected one of {GATES}")
    if experts < 1:
        raise ValueError(f"experts must be >= 1, got {experts}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be in [1, experts={experts}], got {top_k}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _freeze_backbone(model: nn.Module) -> None:
    """PEFT's convention: only adapter parameters train."""
    adapter_params = set()
    for m in model.modules():
        if isinstance(m, (MoLELinearBase, PreGate)):
            adapter_params.update(id(p) for n, p in m.named_parameters() if not n.startswith("base_layer."))
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter_params)


def add_lora_moe(
    model: nn.Module,
    targets: Iterable[str] | str = DEFAULT_TARGETS,
    experts: int = 8,
    top_k: int = 2,
    rank: int = 8,
    alpha: float = 16.0,
    gate: str = "softmax_topk",
    shared_A: bool = False,
    seed: int = 0,
    *,
    top_p: float = 0.75,
    entropy_threshold: float | None = None,
    router_dtype: torch.dtype = torch.float32,
    init_ratio: float = 0.2,
    freeze_base: bool = True,
) -> nn.Module:
    """Wrap every target ``nn.Linear`` in place in a :class:`LoRAMoELinear` with its own router.

    Returns ``model``. The backbone is frozen (``freeze_base``), adapters are trainable.
    """
    _check_args(experts, top_k, rank, gate, alpha)
    for name, lin in _matching_linears(model, targets):
        site = LoRAMoELinear(
            lin, experts=experts, rank=rank, alpha=alpha, top_k=top_k, gate=gate, shared_A=shared_A,
            top_p=top_p, entropy_threshold=entropy_threshold, seed=_site_seed(seed, name),
            init_ratio=init_ratio, router_dtype=router_dtype,
        )
        replace_module(model, name, site)
    if freeze_base:
        _freeze_backbone(model)
    return model


def embedding_path(model: nn.Module) -> str:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, m in model.named_modules():
        if m is emb or (emb is None and name.endswith("embed_tokens") and isinstance(m, nn.Embedding)):
            return name
    raise ValueError("cannot find the model's token embedding (get_input_embeddings / embed_tokens)")


class _InputsEmbedsHook:
    """Backbone forward pre-hook: keep the decision right when the embedding is bypassed.

    The backbone's forward gets ``input_ids`` (then the PreGatedEmbedding decides) or
    ``inputs_embeds`` (then the embedding never runs, so this hook decides from them). Resetting
    first means a layer never silently reuses the previous forward's decision. An object, not a
    closure, so that ``copy.deepcopy(model)`` gives the copy's hook the copy's PreGate.
    """

    def __init__(self, pregate: PreGate, position: int | None) -> None:
        self.pregate = pregate
        self.position = position

    def __call__(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None and self.position is not None and len(args) > self.position:
            embeds = args[self.position]
        if embeds is None:
            self.pregate.reset()
        else:
            self.pregate(embeds)
        return None


def _install_inputs_embeds_hook(backbone: nn.Module, pregate: PreGate):
    try:
        pos = list(inspect.signature(backbone.forward).parameters).index("inputs_embeds")
    except ValueError:
        pos = None
    return backbone.register_forward_pre_hook(_InputsEmbedsHook(pregate, pos), with_kwargs=True)


def attach_pregate(model: nn.Module, emb_name: str, pregate: PreGate) -> None:
    """Make computing the embeddings compute ``pregate``'s decision: the embedding at
    ``emb_name`` becomes a :class:`PreGatedEmbedding`, and a backbone pre-hook covers
    ``inputs_embeds`` calls (shared by :func:`add_pregated_lora_moe` and approximate pre-gating)."""
    replace_module(model, emb_name, PreGatedEmbedding(model.get_submodule(emb_name), pregate))
    backbone = getattr(model, "base_model", model)
    pregate._hook_handle = _install_inputs_embeds_hook(backbone, pregate)


def add_pregated_lora_moe(
    model: nn.Module,
    targets: Iterable[str] | str = DEFAULT_TARGETS,
    experts: int = 8,
    top_k: int = 2,
    rank: int = 8,
    alpha: float = 16.0,
    gate: str = "softmax_topk",
    shared_A: bool = False,
    seed: int = 0,
    *,
    top_p: float = 0.75,
    entropy_threshold: float | None = None,
    router_dtype: torch.dtype = torch.float32,
    init_ratio: float = 0.2,
    normalize: bool = True,
    freeze_base: bool = True,
) -> nn.Module:
    """AdaFuse's variant: one :class:`PreGate` on the token embeddings drives every site.

    The embedding becomes a :class:`PreGatedEmbedding` (same weight Parameter, so backbone keys
    and tying are unchanged) that stores the decision on the PreGate; each
    :class:`PreGatedLoRAMoELinear` holds an unregistered reference to that PreGate and reads it.
    A pre-hook on the backbone covers ``inputs_embeds`` calls and clears stale decisions.
    Returns ``model``.
    """
    _check_args(experts, top_k, rank, gate, alpha)
    found = _matching_linears(model, targets)
    emb_name = embedding_path(model)
    emb = model.get_submodule(emb_name)
    pregate = PreGate(
        emb.embedding_dim, experts=experts, top_k=top_k, gate=gate, top_p=top_p,
        entropy_threshold=entropy_threshold, normalize=normalize, router_dtype=router_dtype,
        seed=_site_seed(seed, "pregate"), device=emb.weight.device,
    )
    for name, lin in found:
        site = PreGatedLoRAMoELinear(
            lin, pregate, rank=rank, alpha=alpha, shared_A=shared_A, seed=_site_seed(seed, name),
            init_ratio=init_ratio,
        )
        replace_module(model, name, site)
    attach_pregate(model, emb_name, pregate)
    if freeze_base:
        _freeze_backbone(model)
    return model
