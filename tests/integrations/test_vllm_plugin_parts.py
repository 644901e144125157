"""The parts of the vLLM integration that need no vLLM: the checkpoint format, and the list of
graph functions marked cacheable for vLLM's AOT compile (tests/vllm runs the engine)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adafuse_compile.integrations.vllm import ARCHITECTURE, read_adapter_sites, save_mole_checkpoint
from adafuse_compile.integrations.vllm.serving import cacheable_graph_ops, module_path
from adafuse_compile.models import add_lora_moe, add_pregated_lora_moe, tiny_llama
from adafuse_compile.options import AdafuseOptions
from adafuse_compile.passes import graph_ops


@pytest.mark.parametrize("adapt", [add_lora_moe, add_pregated_lora_moe])
def test_checkpoint_is_a_plain_llama_plus_our_adapter_file(adapt, tmp_path):
    model = adapt(tiny_llama("tiny"), experts=4, top_k=2, rank=4).eval()
    save_mole_checkpoint(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE] and config["model_type"] == "llama"
    backbone = load_file(tmp_path / "model.safetensors")
    assert not any("base_layer" in k or "lora_" in k or "router" in k for k in backbone)
    state = model.state_dict()
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(backbone[f"{q}.weight"], state[f"{q}.base_layer.weight"])
    configs, tensors = read_adapter_sites(tmp_path / "adafuse_adapters.safetensors")
    assert configs[q]["kind"] in ("LoRAMoELinear", "PreGatedLoRAMoELinear")
    assert tensors[f"{q}.lora_A"] == ((4, 4, 64), torch.float32)
    assert sum(c["kind"] != "PreGate" for c in configs.values()) == 14


def test_every_stateless_graph_op_is_marked_cacheable():
    """A graph op missing here makes AOTAutograd refuse the graph, and vLLM's AOT compile then
    keys it by a seeded "nonce" shared by every rank and run (the wrong tokens of issue 15)."""
    stateful = {"group_decision", "group_site"}  # reach a merge group of this process by id
    helpers = {"is_call"}  # never in a graph
    marked = cacheable_graph_ops()
    for name in set(graph_ops.__all__) - stateful - helpers:
        assert f"adafuse_compile.passes.graph_ops.{name}" in marked, name
    assert not any(k.rsplit(".", 1)[1] in stateful for k in marked)
    assert len(set(marked.values())) == 1 and len(next(iter(marked.values()))) == 32


def test_aot_incompatible_options_are_refused():
    from adafuse_compile.integrations.vllm.serving import _check_aot_compatible

    _check_aot_compatible(AdafuseOptions())
    for bad in ({"freeze": True}, {"freeze": True, "strategy": "merge"}, {"inner": "eager"}):
        with pytest.raises(ValueError, match="VLLM_USE_AOT_COMPILE=0"):
            _check_aot_compatible(AdafuseOptions.from_dict(bad))


def test_module_path_from_dynamo_names():
    assert module_path("l_self_modules_layers_modules_0_modules_self_attn_modules_q_proj_parameters_weight_") == \
        "model.layers.0.self_attn.q_proj"
    assert module_path("weird") == "weird"
