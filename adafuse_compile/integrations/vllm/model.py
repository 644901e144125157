"""A Mixture-of-LoRA-Experts Llama in vLLM's terms, written so the ``adafuse`` backend fuses it.

vLLM imports this module (and with it vLLM's layers) only when a checkpoint's ``config.json``
names :data:`~.checkpoint.ARCHITECTURE`. The model is Hugging Face's Llama with our adapters
(:mod:`adafuse_compile.models`): each adapted linear computes

    y = x W^T + scaling * sum_k g_k (x A_{idx_k}^T) B_{idx_k}^T

with ``(idx, g)`` from its own router (``add_lora_moe``) or from one pre-gate on the token
embeddings (``add_pregated_lora_moe``), written in plain torch ops the way
:class:`adafuse_compile.models.layers.MoLELinearBase` writes it (gather the chosen experts,
``einsum``), so the backend's site finder reads it as it reads our model zoo.

Why it differs from vLLM's own ``llama.py``:

- q/k/v and gate/up are separate linears, not vLLM's merged ``qkv_proj``/``gate_up_proj``: with a
  router per projection, q, k and v take different decisions, and one merged linear would need
  three decisions on slices of one output, which is not one site.
- The adapted linears keep their weights as ``F.linear`` (``_cpu_skip_gemm_dispatch``): vLLM's
  CPU path otherwise prepacks the weight for oneDNN and removes it, and the backend would see
  no linear to fuse the adapter into. Linears without adapters keep vLLM's fast path.

Tensor parallelism follows vLLM's sharding of the base weight, so each rank's adapter is a
site on that rank's shard:

- Column-parallel sites (q, k, v, gate, up): ``W`` and ``B`` are split on the output
  dimension, ``A`` and the router are whole; the input is replicated, so the decision and the
  adapter are local and exact.
- Row-parallel sites (o, down): ``W`` and ``A`` are split on the input dimension, ``B`` is
  whole; each rank adds its partial adapter ``(x_r A_r^T) B^T`` to its partial base output and
  the layer's one all-reduce sums both (``x A^T = sum_r x_r A_r^T``). The router needs the
  whole input: its logits are summed the same way (``x R^T = sum_r x_r R_r^T``) with an
  all-reduce of ``[T, E]`` floats, E values per token instead of the all-gather of the hidden
  input (``in/tp`` per token per rank). The logits equal the single-rank ones up to the order
  of the sum, as the base linear's output already does under tensor parallelism. A pre-gated
  model needs neither: its decision is made once on the replicated embeddings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from itertools import chain, islice

import torch
import torch.nn.functional as F
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import (get_pp_group, get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_reduce)
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.utils import AutoWeightsLoader, make_layers, maybe_prefix

from ...models.layers import PreGate, route
from .checkpoint import ADAPTER_FILE, load_adapter_tensors, read_adapter_sites
from .serving import ServingSettings, first_compile

log = logging.getLogger("adafuse_compile")

Decision = tuple[torch.Tensor, torch.Tensor]

_PREGATE_FILE_PREFIX = "model.embed_tokens.pregate."  # where add_pregated_lora_moe registers it
_PREGATE_PREFIX = "model.pregate."


def _sharded_loader(dim: int | None, rank: int, size: int):
    """A vLLM ``weight_loader`` that keeps this rank's slice of ``dim`` (``None``: the whole)."""

    def load(param: nn.Parameter, loaded: torch.Tensor) -> None:
        if dim is not None and size > 1:
            shard = param.shape[dim]
            if loaded.shape[dim] != shard * size:
                raise ValueError(f"adapter tensor of shape {tuple(loaded.shape)} does not split into {size} "
                                 f"shards of {shard} on dim {dim}")
            loaded = loaded.narrow(dim, rank * shard, shard)
        if tuple(loaded.shape) != tuple(param.shape):
            raise ValueError(f"adapter tensor of shape {tuple(loaded.shape)} does not fit parameter "
                             f"{tuple(param.shape)}")
        param.data.copy_(loaded)

    return load


class _Router(nn.Module):
    """Holds a site's router weight under the name the adapter file uses (``router.weight``)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight


class _MoLEAdapter:
    """The adapter half of a site, mixed into vLLM's parallel linears.

    ``split`` is the dimension of the full ``x`` this rank holds a shard of: ``None`` for
    column-parallel sites (the input is replicated), ``"in"`` for row-parallel ones.
    """

    def _init_adapter(self, path: str, cfg: dict | None, tensors: dict, split_in: bool,
                      params_dtype: torch.dtype) -> None:
        self.site_path = path
        self.site = cfg
        if cfg is None:
            return
        if cfg.get("kind") not in ("LoRAMoELinear", "PreGatedLoRAMoELinear"):
            raise ValueError(f"adapter site {path}: kind {cfg.get('kind')!r} is not served by vLLM "
                             "(LoRAMoELinear and PreGatedLoRAMoELinear are)")
        rank, size = self.tp_rank, self.tp_size
        a_shape, _ = tensors[f"{path}.lora_A"]
        b_shape, _ = tensors[f"{path}.lora_B"]
        experts_a, r, in_full = a_shape
        experts, out_full, _ = b_shape
        self.experts, self.rank_r, self.k = experts, r, experts if cfg["gate"] == "dense" else cfg["top_k"]
        self.scaling = float(cfg["scaling"])
        self.gate, self.top_k = cfg["gate"], cfg["top_k"]
        self.top_p, self.entropy_threshold = cfg["top_p"], cfg["entropy_threshold"]
        in_dim = in_full // size if split_in else in_full
        out_dim = out_full if split_in else out_full // size
        if (in_dim, out_dim) != (self.weight.shape[1], self.weight.shape[0]):
            raise ValueError(f"adapter site {path}: experts of shape A {a_shape} / B {b_shape} do not fit the "
                             f"linear's shard {tuple(self.weight.shape)} at tensor-parallel size {size}")
        self.lora_A = nn.Parameter(torch.empty(experts_a, r, in_dim, dtype=params_dtype), requires_grad=False)
        self.lora_A.weight_loader = _sharded_loader(2 if split_in else None, rank, size)
        self.lora_B = nn.Parameter(torch.empty(experts, out_dim, r, dtype=params_dtype), requires_grad=False)
        self.lora_B.weight_loader = _sharded_loader(None if split_in else 1, rank, size)
        self.router = None
        if cfg["kind"] == "LoRAMoELinear":
            r_shape, r_dtype = tensors[f"{path}.router.weight"]
            weight = nn.Parameter(torch.empty(r_shape[0], in_dim, dtype=r_dtype), requires_grad=False)
            weight.weight_loader = _sharded_loader(1 if split_in else None, rank, size)
            self.router = _Router(weight)
        # Keep the base weight and compute it with F.linear, so that the backend sees the site.
        self._cpu_skip_gemm_dispatch = True

    def _route(self, x: torch.Tensor, partial: bool) -> Decision:
        """This site's own decision; ``partial``: ``x`` is this rank's input shard, so the
        logits are summed over the ranks first."""
        rd = self.router.weight.dtype
        logits = F.linear(x.to(rd), self.router.weight)
        if partial and self.tp_size > 1:
            logits = tensor_model_parallel_all_reduce(logits)
        return route(logits, self.gate, self.top_k, self.top_p, self.entropy_threshold)

    def _delta(self, x: torch.Tensor, idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``scaling * sum_k g_k (x A_{idx_k}^T) B_{idx_k}^T``, as ``MoLELinearBase.lora_delta``."""
        xt = x.reshape(-1, x.shape[-1])
        idx, g = idx.reshape(-1, self.k), g.reshape(-1, self.k)
        if self.lora_A.shape[0] == 1:  # HydraLoRA: one A, idx selects only the B
            h = (xt @ self.lora_A[0].T).unsqueeze(1)
        else:
            h = torch.einsum("ti,tkri->tkr", xt, self.lora_A[idx])
        h = h * g.to(x.dtype).unsqueeze(-1)
        delta = torch.einsum("tkr,tkor->to", h, self.lora_B[idx])
        return (self.scaling * delta).reshape(*x.shape[:-1], self.lora_B.shape[1])


class MoLEColumnParallelLinear(_MoLEAdapter, ColumnParallelLinear):
    """vLLM's column-parallel linear plus this rank's slice of the experts' ``B`` (see module doc)."""

    def __init__(self, input_size: int, output_size: int, *, site: str, cfg: dict | None, tensors: dict,
                 params_dtype: torch.dtype, prefix: str) -> None:
        super().__init__(input_size, output_size, bias=False, params_dtype=params_dtype, prefix=prefix,
                         return_bias=False)
        self._init_adapter(site, cfg, tensors, split_in=False, params_dtype=params_dtype)

    def forward(self, x: torch.Tensor, decision: Decision | None = None) -> torch.Tensor:
        y = self.quant_method.apply(self, x, self.bias)
        if self.site is None:
            return y
        idx, g = self._route(x, partial=False) if self.router is not None else decision
        return y + self._delta(x, idx, g)


class MoLERowParallelLinear(_MoLEAdapter, RowParallelLinear):
    """vLLM's row-parallel linear plus this rank's slice of the experts' ``A``; the partial
    adapter output joins the partial base output before the layer's one all-reduce."""

    def __init__(self, input_size: int, output_size: int, *, site: str, cfg: dict | None, tensors: dict,
                 params_dtype: torch.dtype, prefix: str) -> None:
        super().__init__(input_size, output_size, bias=False, params_dtype=params_dtype, reduce_results=False,
                         prefix=prefix, return_bias=False)
        self._init_adapter(site, cfg, tensors, split_in=True, params_dtype=params_dtype)

    def forward(self, x: torch.Tensor, decision: Decision | None = None) -> torch.Tensor:
        y = self.quant_method.apply(self, x, self.bias)
        if self.site is not None:
            idx, g = self._route(x, partial=True) if self.router is not None else decision
            y = y + self._delta(x, idx, g)
        if self.tp_size > 1:
            y = tensor_model_parallel_all_reduce(y)
        return y


class _Sites:
    """The adapter file's sites, looked up by the Hugging Face module path of each linear."""

    def __init__(self, configs: dict, tensors: dict, params_dtype: torch.dtype) -> None:
        self.configs, self.tensors, self.params_dtype = configs, tensors, params_dtype
        self.used: set[str] = set()

    def column(self, prefix: str, input_size: int, output_size: int) -> MoLEColumnParallelLinear:
        return MoLEColumnParallelLinear(input_size, output_size, **self._site(prefix))

    def row(self, prefix: str, input_size: int, output_size: int) -> MoLERowParallelLinear:
        return MoLERowParallelLinear(input_size, output_size, **self._site(prefix))

    def _site(self, prefix: str) -> dict:
        cfg = self.configs.get(prefix)
        if cfg is not None:
            self.used.add(prefix)
        return dict(site=prefix, cfg=cfg, tensors=self.tensors, params_dtype=self.params_dtype, prefix=prefix)


class MoLELlamaAttention(nn.Module):
    def __init__(self, config, sites: _Sites, cache_config, prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
        if heads % tp or kv_heads % tp:
            raise ValueError(f"{heads} attention heads and {kv_heads} key/value heads must both divide by the "
                             f"tensor-parallel size {tp} (separate k/v projections are split, not replicated)")
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.num_heads, self.num_kv_heads = heads // tp, kv_heads // tp
        hidden = config.hidden_size
        self.q_proj = sites.column(f"{prefix}.q_proj", hidden, heads * self.head_dim)
        self.k_proj = sites.column(f"{prefix}.k_proj", hidden, kv_heads * self.head_dim)
        self.v_proj = sites.column(f"{prefix}.v_proj", hidden, kv_heads * self.head_dim)
        self.o_proj = sites.row(f"{prefix}.o_proj", heads * self.head_dim, hidden)
        self.rotary_emb = get_rope(self.head_dim, max_position=getattr(config, "max_position_embeddings", 8192),
                                   is_neox_style=True, rope_parameters=getattr(config, "rope_parameters", None))
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=cache_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, h: torch.Tensor, decision: Decision | None) -> torch.Tensor:
        q, k, v = self.q_proj(h, decision), self.k_proj(h, decision), self.v_proj(h, decision)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v), decision)


class MoLELlamaMLP(nn.Module):
    def __init__(self, config, sites: _Sites, prefix: str) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"activation {config.hidden_act!r} is not supported (Llama's silu is)")
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = sites.column(f"{prefix}.gate_proj", hidden, inter)
        self.up_proj = sites.column(f"{prefix}.up_proj", hidden, inter)
        self.down_proj = sites.row(f"{prefix}.down_proj", inter, hidden)

    def forward(self, x: torch.Tensor, decision: Decision | None) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, decision)) * self.up_proj(x, decision), decision)


class MoLELlamaDecoderLayer(nn.Module):
    def __init__(self, config, sites: _Sites, cache_config, prefix: str) -> None:
        super().__init__()
        self.self_attn = MoLELlamaAttention(config, sites, cache_config, f"{prefix}.self_attn")
        self.mlp = MoLELlamaMLP(config, sites, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, h, residual, decision):
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, h, decision)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h, decision), residual


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0})
class MoLELlamaModel(nn.Module):
    """The decoder stack vLLM compiles as one graph (the backend sees every site at once)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", sites: _Sites | None = None,
                 pregate: dict | None = None) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.pregate = None
        if pregate is not None:
            self.pregate = PreGate(config.hidden_size, experts=pregate["experts"], top_k=pregate["top_k"],
                                   gate=pregate["gate"], top_p=pregate["top_p"],
                                   entropy_threshold=pregate["entropy_threshold"], normalize=pregate["normalize"],
                                   router_dtype=pregate["router_dtype"])
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: MoLELlamaDecoderLayer(config, sites, vllm_config.cache_config, prefix),
            prefix=f"{prefix}.layers")
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        # AdaFuse: one decision per token on the (replicated) embeddings, for every site.
        decision = self.pregate.decide(h) if self.pregate is not None else None
        residual = None
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            h, residual = layer(positions, h, residual, decision)
        h, _ = self.norm(h, residual)
        return h


class AdafuseMoLELlamaForCausalLM(nn.Module):
    """The architecture :data:`~.checkpoint.ARCHITECTURE`: a Llama whose adapted linears carry
    LoRA experts from the checkpoint's :data:`~.checkpoint.ADAPTER_FILE`.

    Options for the backend come from ``additional_config={"adafuse": {...}}`` (see
    :class:`.serving.ServingSettings`); they are read here, where vLLM hands the model its
    config, because vLLM calls the backend by name with no options of ours.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        if get_pp_group().world_size > 1:
            raise ValueError(f"{type(self).__name__} does not support pipeline parallelism; use tensor parallelism")
        if vllm_config.quant_config is not None:
            raise ValueError(f"{type(self).__name__} serves unquantized weights only")
        self.config = config
        self.settings = ServingSettings.from_vllm_config(vllm_config)
        directory = vllm_config.model_config.model
        self.adapter_path = os.path.join(directory, ADAPTER_FILE)
        if not os.path.isfile(self.adapter_path):
            raise FileNotFoundError(f"{self.adapter_path} not found: a MoLE checkpoint is a local directory with the "
                                    f"backbone and {ADAPTER_FILE} (adafuse_compile.integrations.vllm."
                                    "save_mole_checkpoint writes one)")
        configs, tensors = read_adapter_sites(self.adapter_path)
        pregate_cfgs = {p: c for p, c in configs.items() if c.get("kind") == "PreGate"}
        site_cfgs = {p: c for p, c in configs.items() if c.get("kind") != "PreGate"}
        pregate = None
        if pregate_cfgs:
            (path, pregate), = pregate_cfgs.items()
            shape, dtype = tensors[f"{path}.router.weight"]
            pregate = {**pregate, "router_dtype": dtype}
        params_dtype = vllm_config.model_config.dtype
        sites = _Sites(site_cfgs, tensors, params_dtype)
        self.model = MoLELlamaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"), sites=sites,
                                    pregate=pregate)
        unused = sorted(set(site_cfgs) - sites.used)
        if unused:
            raise ValueError(f"{len(unused)} adapter site(s) of {self.adapter_path} match no linear of the model "
                             f"(q/k/v/o/gate/up/down_proj are served): {unused[:4]}")
        self.sites = sorted(sites.used)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))
        self._first = first_compile(self.settings, expected_sites=len(self.sites))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if self._first is not None:
            # The first call compiles: the settings' options reach the backend, its rewrites are
            # reported (per rank); later calls go straight to the compiled model.
            with self._first as watch:
                out = self.model(input_ids, positions, inputs_embeds)
            self._first = None if watch.done else self._first
            return out
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The backbone from vLLM's iterator, then the adapters from their own file."""
        def renamed():
            for name, tensor in chain(weights, load_adapter_tensors(self.adapter_path)):
                if name.startswith(_PREGATE_FILE_PREFIX):
                    name = _PREGATE_PREFIX + name[len(_PREGATE_FILE_PREFIX):]
                yield name, tensor

        return AutoWeightsLoader(self).load_weights(renamed())
