"""Tiny Mixture-of-LoRA-Experts models built with the real third-party packages (a helper, not a test file).

Each builder returns a :class:`RealModel`, one uniform shape for all packages:

* ``model``: an ``nn.Module`` whose ``forward(**inputs)`` returns one tensor, the logits
  ``[batch, seq, vocab]``. For transformers models it is a thin wrapper that calls the package's
  model with ``use_cache=False`` and returns ``.logits``; for MoE-PEFT it builds the package's
  ``LLMModelInput`` (one adapter over the whole batch) inside ``forward`` and returns that
  adapter's logits, because MoE-PEFT's own ``LLMModel.forward`` takes a dataclass that it
  mutates (it sets ``batch_tokens_`` to ``None``), so that object cannot be reused as an input.
* ``inputs``: a dict of keyword tensors (``{"input_ids": LongTensor[2, 8]}``), so that
  ``model(**inputs)``, ``adafuse_compile.explain(model, **inputs)`` and
  ``adafuse_compile.compile(model)(**inputs)`` all work.
* ``run(model=None)``: ``model(**inputs)`` under ``torch.no_grad()`` (``model`` defaults to
  ``self.model``; pass the compiled module to run that instead).
* ``package_model``: the package's own object (MoE-PEFT ``LLMModel``, or the transformers
  ``LlamaForCausalLM`` with the adapters injected), for inspection.

All models are tiny (hidden 64, 2 layers, vocab 128, 4 heads), fp32, in eval mode (including the
adapter modules the packages keep in plain dicts, which ``Module.eval()`` never reaches), and
deterministic: every random draw happens under a fixed seed inside ``torch.random.fork_rng``, so
the caller's global RNG is left as it was. The packages zero-initialise LoRA B (except
eulerforge, which draws it with std 0.01); the builders overwrite every LoRA A and B and every
router with seeded normal draws large enough that the adapters change the logits and that the
routers pick different experts for different tokens.

Only the inference path is built: no model is downloaded and no training state is created.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
import types
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "MOE_PEFT_KINDS",
    "PEFT_TARGETS",
    "RealModel",
    "arrow_model",
    "eulerforge_model",
    "mixlora_model",
    "moe_peft_model",
    "poly_model",
    "save_lora_adapters",
    "tiny_llama_config",
    "xlora_model",
]

VOCAB = 128
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
EXPERTS = 4
TOP_K = 2
RANK = 4
ALPHA = 8
# The packages assert ``lora_dropout > 0``; the dropout modules are put in eval mode, so it is inert.
DROPOUT = 0.05
BATCH, SEQ = 2, 8

MOE_PEFT_KINDS = ("mola", "loramoe", "mixlora", "mixlora_top_p")
MLP_PROJ = ["gate_proj", "down_proj", "up_proj"]
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", *MLP_PROJ]


@dataclasses.dataclass
class RealModel:
    """A package's model, its example inputs and how to run it (see the module docstring)."""

    name: str
    model: nn.Module
    inputs: dict[str, torch.Tensor]
    package_model: Any = None

    def run(self, model: nn.Module | Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        with torch.no_grad():
            return (self.model if model is None else model)(**self.inputs)


def tiny_llama_config(**overrides):
    """A transformers ``LlamaConfig`` of the size above (``rope_theta`` set as an attribute too)."""
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                  num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                  max_position_embeddings=64, rope_theta=10000.0, hidden_act="silu", pad_token_id=0)
    kwargs.update(overrides)
    config = LlamaConfig(**kwargs)
    # transformers 5 keeps rope_theta only inside config.rope_parameters; MoE-PEFT reads config.rope_theta.
    if not hasattr(config, "rope_theta"):
        config.rope_theta = kwargs["rope_theta"]
    return config


def _input_ids(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen)}


def _tiny_hf_llama():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_llama_config()).eval()


def _lora_init_(a: torch.Tensor, b: torch.Tensor) -> None:
    """Seeded nonzero LoRA weights, ``a`` of shape [r, in] and ``b`` of shape [out, r]."""
    with torch.no_grad():
        a.normal_(0.0, 1.0 / math.sqrt(a.shape[1]))
        b.normal_(0.0, 1.0 / math.sqrt(b.shape[1]))


def _router_init_(w: torch.Tensor) -> None:
    """Router weights [E, in] giving logits of std ~2 on RMS-normalised inputs (distinct choices per token)."""
    with torch.no_grad():
        w.normal_(0.0, 2.0 / math.sqrt(w.shape[1]))


class _Logits(nn.Module):
    """``inner(input_ids=..., use_cache=False).logits``: a transformers causal LM as a tensor function."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=input_ids, use_cache=False).logits


# ----------------------------------------------------------------------------------------------
# MoE-PEFT (moe_peft 2.0.2): MoLA, LoRAMoE, MixLoRA (top-k) and MixLoRA-dynamic (top-p)
# ----------------------------------------------------------------------------------------------

def _import_moe_peft():
    """Import ``moe_peft``, stubbing ``datasets``/``evaluate`` if they are not installed.

    ``moe_peft/__init__.py`` imports its dispatcher and tasks, which ``import datasets`` and
    ``import evaluate`` at module level, but only call ``datasets.load_dataset`` and
    ``evaluate.load`` when loading training or evaluation data, never on the inference path
    used here. Neither is a dependency of this project, so when one is missing a minimal module
    is put in ``sys.modules`` whose functions raise ``ModuleNotFoundError`` if anything calls them.
    The stubs are taken out of ``sys.modules`` again once ``moe_peft`` is imported (its modules
    keep their reference): left there, a stub (``__spec__`` None) makes ``importlib.util.find_spec``
    raise ``ValueError`` for the rest of the process, and so ``transformers.utils.is_datasets_available()``.
    """
    if "moe_peft" in sys.modules:
        return sys.modules["moe_peft"]
    stubbed = []
    for name, funcs in (("datasets", ("load_dataset",)), ("evaluate", ("load",))):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            stub = types.ModuleType(name)
            stub.__doc__ = "stub installed by tests/e2e/real_packages.py: moe_peft imports it at top level"

            def _missing(*args, _name=name, **kwargs):
                raise ModuleNotFoundError(f"{_name} is not installed (stubbed for moe_peft's import)")

            for func in funcs:
                setattr(stub, func, _missing)
            sys.modules[name] = stub
            stubbed.append(name)
    try:
        return importlib.import_module("moe_peft")
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)


_MOE_PEFT_ADAPTERS = {
    # MoLA: a router and E LoRA experts beside every targeted linear (attention and MLP).
    "mola": dict(peft_type="MOLA", num_experts=EXPERTS, top_k=TOP_K, target_modules=ALL_PROJ),
    # LoRAMoE: dense softmax over E LoRA experts beside the MLP linears. Attention targets would
    # get a plain LoRA through MoE-PEFT's LoraFunction, which applies F.dropout in training mode
    # whenever the LoRA weights require grad (and skips the LoRA when they do not): not usable
    # for a deterministic forward, so only the MLP is targeted.
    "loramoe": dict(peft_type="LORAMOE", num_experts=EXPERTS, target_modules=MLP_PROJ),
    # MixLoRA: one router per MLP block, top-k experts, each expert a LoRA on gate/up/down
    # (attention LoRA left out for the LoraFunction reason above).
    "mixlora": dict(peft_type="MIXLORA", routing_strategy="mixlora", num_experts=EXPERTS, top_k=TOP_K,
                    target_modules=MLP_PROJ),
    # MixLoRA with dynamic top-p routing (sort + cumsum of the router probabilities).
    "mixlora_top_p": dict(peft_type="MIXLORA", routing_strategy="mixlora-dynamic", num_experts=EXPERTS,
                          top_p=0.75, target_modules=MLP_PROJ),
}


class _MoePeftLogits(nn.Module):
    """MoE-PEFT's ``LLMModel`` as ``input_ids -> logits`` for one adapter over the whole batch."""

    def __init__(self, llm: nn.Module, adapter_name: str, output_router_logits: bool) -> None:
        super().__init__()
        self.llm = llm
        self.adapter_name = adapter_name
        self.output_router_logits = output_router_logits

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        from moe_peft.common import LLMBatchConfig, LLMModelInput

        batch = LLMModelInput(
            batch_configs_=[LLMBatchConfig(adapter_name_=self.adapter_name, batch_start_idx_=0,
                                           batch_end_idx_=input_ids.shape[0])],
            batch_tokens_=input_ids,
            output_router_logits_=self.output_router_logits,
            inference_mode_=True,
            efficient_operator_=True,  # the default unless MOE_PEFT_EVALUATE_MODE is set
        )
        return self.llm(batch)[0].logits


def moe_peft_model(kind: str = "mola", *, seed: int = 0, output_router_logits: bool = False) -> RealModel:
    """MoE-PEFT's own Llama (``moe_peft.models.LlamaForCausalLM``) with one adapter of ``kind``.

    ``kind`` is one of :data:`MOE_PEFT_KINDS`. The base is a random transformers
    ``LlamaForCausalLM`` converted by ``moe_peft.models.from_pretrained`` (what
    ``LLMModel.from_pretrained`` does after downloading); the adapter is added by
    ``LLMModel.init_adapter`` and its weights are then redrawn (nonzero B, spread routers).
    ``output_router_logits=False`` (default) skips MoE-PEFT's collection of router logits for the
    auxiliary loss, which inference does not need; ``True`` is what its generator leaves on.
    """
    if kind not in _MOE_PEFT_ADAPTERS:
        raise ValueError(f"kind must be one of {MOE_PEFT_KINDS}, not {kind!r}")
    moe_peft = _import_moe_peft()
    from moe_peft.adapters import adapter_factory
    from moe_peft.models import from_pretrained

    adapter_name = f"moe_peft_{kind}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = from_pretrained(_tiny_hf_llama(), attn_impl="eager", use_sliding_window=False, device="cpu")
        llm = moe_peft.LLMModel(base)
        spec = dict(_MOE_PEFT_ADAPTERS[kind])
        peft_type = spec.pop("peft_type")
        config = adapter_factory(peft_type, adapter_name, r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, **spec)
        llm.init_adapter(config)
        for layer in base.layers_:
            attn, mlp = layer.state_dict()
            for linear in {**attn, **mlp}.values():
                for lora in linear.loras_.values():
                    _lora_init_(lora.lora_a_.weight, lora.lora_b_.weight)
                    lora.eval()  # plain dict: Module.eval() never reaches it
                for moe in linear.moes_.values():  # MoLA / LoRAMoE: a router per linear
                    _router_init_(moe.gate_.weight)
            for moe in layer.mlp_.moes_.values():  # MixLoRA: a router per MLP block
                _router_init_(moe.gate_.weight)
    llm.eval()
    model = _MoePeftLogits(llm, adapter_name, output_router_logits).eval()
    return RealModel(f"moe_peft[{kind}]", model, _input_ids(seed), llm)


# ----------------------------------------------------------------------------------------------
# eulerforge 0.1.0: MixtureLoRALinear on the MLP linears of a transformers Llama
# ----------------------------------------------------------------------------------------------

def eulerforge_model(*, seed: int = 0, track_stats: bool = True) -> RealModel:
    """A transformers tiny Llama whose MLP linears are eulerforge ``MixtureLoRALinear`` (E=4, top-2).

    Built by ``build_mixture_lora_for_ffn_layers`` with the ``LlamaAdapter`` backbone, as
    eulerforge's ``mixture_lora`` injection mode does (``aux_loss_coeff=0``, ``track_stats`` on by
    default, as there). Its LoRA B starts at std 0.01; the builder redraws all LoRA weights.
    """
    from eulerforge.adapters.backbones.llama import LlamaAdapter
    from eulerforge.modules.mixture_lora import MixtureLoRALinear, build_mixture_lora_for_ffn_layers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = _tiny_hf_llama()
        _, applied, wrapped = build_mixture_lora_for_ffn_layers(
            hf, LlamaAdapter(), layer_indices=list(range(LAYERS)), num_experts=EXPERTS, top_k=TOP_K, r=RANK,
            alpha=float(ALPHA), dropout=DROPOUT, target_submodule_keywords=MLP_PROJ, aux_loss_coeff=0.0,
            track_stats=track_stats)
        assert wrapped == LAYERS * len(MLP_PROJ), (applied, wrapped)
        for module in hf.modules():
            if isinstance(module, MixtureLoRALinear):
                _router_init_(module.router.weight)
                for expert in module.experts:
                    _lora_init_(expert.loraA, expert.loraB)
    hf.eval()
    return RealModel("eulerforge", _Logits(hf).eval(), _input_ids(seed), hf)


# ----------------------------------------------------------------------------------------------
# mixlora 0.2.3 (TUDB-Labs): inject_adapter_in_model on a transformers Llama
# ----------------------------------------------------------------------------------------------

def mixlora_model(*, seed: int = 0) -> RealModel:
    """A transformers tiny Llama with the ``mixlora`` package's MixLoRA injected (E=4, top-2).

    ``mixlora.inject_adapter_in_model`` is what ``MixLoraModelForCausalLM.from_pretrained`` calls
    after loading the base model and ``adapter_model.bin``; here the weight dict is drawn at
    random under the seed instead of loaded. Targets: a plain LoRA on q/k/v/o (``LoraLinear``
    replacing the attention projections) and per-expert LoRA on gate/up/down inside the
    ``MixLoraSparseMoe`` that replaces each ``mlp.forward``.
    """
    from mixlora import MixLoraConfig, inject_adapter_in_model

    config = MixLoraConfig.from_config({
        "base_model_name_or_path": "tiny-random-llama", "task_type": "CAUSAL_LM", "peft_type": "MIXLORA",
        "r": RANK, "lora_alpha": ALPHA, "lora_dropout": DROPOUT, "target_modules": ALL_PROJ,
        "routing_strategy": "mixlora", "num_experts": EXPERTS, "top_k": TOP_K,
        # MixLoraSparseMoe does ACT2FN[act_fn] only for a str; left None it would call None.
        "act_fn": "silu",
    })
    config.adapter_name_ = "default"
    config.dtype_ = torch.float32
    config.check()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = _tiny_hf_llama()
        weights: dict[str, torch.Tensor] = {}

        def lora(prefix: str, d_in: int, d_out: int) -> None:
            a, b = torch.empty(RANK, d_in), torch.empty(d_out, RANK)
            _lora_init_(a, b)
            weights[f"{prefix}.lora_A.weight"], weights[f"{prefix}.lora_B.weight"] = a, b

        for i, layer in enumerate(hf.model.layers):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                linear = getattr(layer.self_attn, proj)
                lora(f"mixlora.layers.{i}.self_attn.{proj}", linear.in_features, linear.out_features)
            gate = torch.empty(EXPERTS, HIDDEN)
            _router_init_(gate)
            weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = gate
            for proj in MLP_PROJ:
                linear = getattr(layer.mlp, proj)
                for e in range(EXPERTS):
                    lora(f"mixlora.layers.{i}.mlp.{proj}.experts.{e}", linear.in_features, linear.out_features)
        inject_adapter_in_model(hf, config, weights)
    hf.eval()
    for layer in hf.model.layers:  # experts live in plain dicts: Module.eval() never reaches them
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    return RealModel("mixlora", _Logits(hf).eval(), _input_ids(seed), hf)


# ----------------------------------------------------------------------------------------------
# PEFT's own mixtures (peft): X-LoRA and Arrow over saved LoRA adapters, Poly. These return the
# PeftModel itself (called with ``input_ids=``; Poly also ``task_ids=``), on
# ``adafuse_compile.models.tiny_llama("tiny", ...)`` with 2 layers unless ``llama`` says otherwise.
# ----------------------------------------------------------------------------------------------
PEFT_TARGETS = ["q_proj", "v_proj"]


def _peft_base(**llama):
    from adafuse_compile.models import tiny_llama

    return tiny_llama("tiny", **{"num_hidden_layers": 2, **llama})


def save_lora_adapters(root, count: int = 4, *, rank: int = 4, targets=PEFT_TARGETS, **llama) -> list[str]:
    """Paths of ``count`` LoRA adapters (random nonzero weights, adapter ``i`` from seed ``i``)
    saved under ``root``, as PEFT loads them (``init_lora_weights=False`` draws from the global RNG)."""
    import peft

    paths = []
    for i in range(count):
        torch.manual_seed(i)
        model = peft.get_peft_model(_peft_base(**llama), peft.LoraConfig(r=rank, target_modules=targets,
                                                                          init_lora_weights=False))
        model.save_pretrained(f"{root}/a{i}")
        paths.append(f"{root}/a{i}")
    return paths


def xlora_model(paths: list[str], top_k_lora=None, enable_softmax_topk: bool = False, **llama):
    """PEFT X-LoRA over the saved adapters ``paths`` (its classifier of depth 1, seed 0)."""
    import peft

    torch.manual_seed(0)
    base = _peft_base(**llama)
    base.config.use_cache = False  # X-LoRA requires it
    config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size, xlora_depth=1,
                              adapters={str(i): p for i, p in enumerate(paths)}, top_k_lora=top_k_lora,
                              enable_softmax_topk=enable_softmax_topk)
    return peft.get_peft_model(base, config).eval()


def arrow_model(paths: list[str], top_k: int = 2):
    """PEFT Arrow over the saved adapters ``paths``, its prototypes built (by a first forward)."""
    from peft import ArrowConfig
    from peft.tuners.lora.arrow import create_arrow_model

    torch.manual_seed(0)
    model = create_arrow_model(_peft_base(), paths, ArrowConfig(top_k=top_k)).eval()
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long))
    return model


def poly_model():
    """PEFT Poly (4 skills, 3 tasks, one layer) with its Poly weights redrawn (nonzero)."""
    import peft

    torch.manual_seed(0)
    config = peft.PolyConfig(task_type="CAUSAL_LM", r=4, n_tasks=3, n_skills=4, n_splits=1, target_modules=PEFT_TARGETS)
    model = peft.get_peft_model(_peft_base(num_hidden_layers=1), config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "poly" in name:
                p.normal_()
    return model
