"""The reference MoLE model zoo: gates, layers vs. the kernel reference, Llama adapters, I/O."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adafuse_compile.kernels.reference import lora_moe_linear_ref, merged_delta_ref
from adafuse_compile.models import (
    GATES,
    LoRAMoELinear,
    MoLELinearBase,
    PreGate,
    PreGatedEmbedding,
    PreGatedLoRAMoELinear,
    adapter_sites,
    add_lora_moe,
    add_pregated_lora_moe,
    find_pregate,
    load_adapters,
    route,
    save_adapters,
    tiny_llama,
)

FAST = settings(max_examples=20, deadline=None)
VOCAB = 512


def _ids(batch=2, seq=6, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def backbone():
    return tiny_llama("tiny", seed=0)


@pytest.fixture(scope="module")
def mole(backbone):
    return add_lora_moe(copy.deepcopy(backbone), seed=0)


@pytest.fixture(scope="module")
def pregated(backbone):
    return add_pregated_lora_moe(copy.deepcopy(backbone), seed=0)


# ---------------------------------------------------------------------------------- route()


@st.composite
def _routing_case(draw):
    experts = draw(st.integers(1, 8))
    top_k = draw(st.integers(1, experts))
    gate = draw(st.sampled_from(GATES))
    lead = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.sampled_from([0.1, 1.0, 4.0]))
    logits = torch.randn(*lead, experts, generator=torch.Generator().manual_seed(seed)) * spread
    top_p = draw(st.sampled_from([0.3, 0.5, 0.75, 0.9, 1.0]))
    return logits, gate, top_k, top_p


@FAST
@given(_routing_case())
def test_route_shapes_and_weights(case):
    logits, gate, top_k, top_p = case
    experts = logits.shape[-1]
    idx, g = route(logits, gate, top_k, top_p=top_p)
    k = experts if gate == "dense" else top_k
    assert idx.shape == g.shape == (*logits.shape[:-1], k)
    assert idx.dtype == torch.int64 and g.dtype == torch.float32
    assert ((idx >= 0) & (idx < experts)).all()
    assert (g >= 0).all()
    # the chosen experts of a token are distinct
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()
    probs = torch.softmax(logits.float(), -1)
    if gate in ("softmax_topk", "topk_softmax", "dense"):
        torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[:-1]))
        # the top-k really are the most probable experts
        assert torch.allclose(probs.gather(-1, idx).sum(-1), probs.topk(k, -1).values.sum(-1))
    if gate == "dense":
        assert (idx == torch.arange(experts)).all()
        torch.testing.assert_close(g, probs)


@FAST
@given(_routing_case(), st.sampled_from([None, 0.5, 1.0, 1.5]))
def test_top_p_keeps_minimal_prefix_not_renormalized(case, entropy_threshold):
    logits, _, top_k, top_p = case
    idx, g = route(logits, "top_p", top_k, top_p=top_p, entropy_threshold=entropy_threshold)
    probs = torch.softmax(logits.float(), -1)
    chosen = probs.gather(-1, idx)
    kept = g > 0
    assert kept[..., 0].all(), "top-p always keeps at least one expert"
    # kept experts carry their raw probability: no renormalization
    torch.testing.assert_close(g[kept], chosen[kept])
    # kept experts form a prefix of the sorted top-k
    assert (kept.int().diff(dim=-1) <= 0).all()
    entropy = torch.special.entr(probs).sum(-1)
    n_kept = kept.sum(-1)
    cum = chosen.cumsum(-1)
    for pos in torch.cartesian_prod(*[torch.arange(s) for s in logits.shape[:-1]]).reshape(-1, logits.dim() - 1):
        pos = tuple(pos.tolist())
        n = int(n_kept[pos])
        if entropy_threshold is not None and entropy[pos] > entropy_threshold:
            assert n == top_k, "high-entropy tokens keep all k"
            continue
        # smallest prefix reaching top_p (or all k if the top-k mass is below top_p)
        assert n == top_k or cum[pos][n - 1] >= top_p - 1e-6
        assert n == 1 or cum[pos][n - 2] < top_p


def test_top_p_drops_experts_on_peaked_logits():
    logits = torch.tensor([[8.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    idx, g = route(logits, "top_p", 3, top_p=0.5)
    assert g[0, 0] > 0.99 and (g[0, 1:] == 0).all()
    assert (g[1] > 0).sum() == 2  # 0.25 + 0.25 reaches 0.5
    _, g = route(logits, "top_p", 3, top_p=0.5, entropy_threshold=1.0)  # uniform row: entropy ln 4
    assert (g[1] > 0).all() and (g[0, 1:] == 0).all()


def test_softmax_topk_equals_topk_softmax():
    """softmax -> top-k -> renormalize is mathematically top-k -> softmax (only rounding differs)."""
    logits = torch.randn(5, 7, 8, generator=torch.Generator().manual_seed(1)) * 3
    i1, g1 = route(logits, "softmax_topk", 3)
    i2, g2 = route(logits, "topk_softmax", 3)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(g1, g2)


def test_route_rejects_bad_arguments():
    logits = torch.randn(3, 4)
    with pytest.raises(ValueError, match="top_k"):
        route(logits, "softmax_topk", 5)
    with pytest.raises(ValueError, match="top_k"):
        route(logits, "softmax_topk", 0)
    with pytest.raises(ValueError, match="unknown gate"):
        route(logits, "switch", 1)
    with pytest.raises(ValueError, match="top_p"):
        route(logits, "top_p", 2, top_p=0.0)


def test_routing_runs_in_float32_in_a_bf16_layer():
    base = nn.Linear(32, 24, dtype=torch.bfloat16)
    layer = LoRAMoELinear(base, experts=6, rank=4, top_k=2, seed=3)
    layer.to(torch.bfloat16)  # even a router cast to bf16 routes in float32
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    idx, g = layer.route(x)
    assert g.dtype == torch.float32
    ref_idx, ref_g = route(F.linear(x.float(), layer.router.weight.float()), "softmax_topk", 2)
    assert torch.equal(idx, ref_idx) and torch.equal(g, ref_g)
    assert layer(x).dtype == torch.bfloat16


# --------------------------------------------------------------------- layers vs. reference


@FAST
@given(
    gate=st.sampled_from(GATES),
    shared_A=st.booleans(),
    bias=st.booleans(),
    experts=st.integers(1, 6),
    rank=st.integers(1, 5),
    data=st.data(),
)
def test_lora_moe_linear_matches_reference_float64(gate, shared_A, bias, experts, rank, data):
    top_k = data.draw(st.integers(1, experts))
    in_f, out_f = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    lead = tuple(data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    seed = data.draw(st.integers(0, 2**20))
    base = nn.Linear(in_f, out_f, bias=bias, dtype=torch.float64)
    layer = LoRAMoELinear(
        base, experts=experts, rank=rank, alpha=2 * rank + 1, top_k=top_k, gate=gate,
        shared_A=shared_A, seed=seed, router_dtype=torch.float64, entropy_threshold=1.0,
    )
    assert layer.lora_A.shape == (1 if shared_A else experts, rank, in_f)
    assert layer.lora_B.shape == (experts, out_f, rank)
    x = torch.randn(*lead, in_f, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    idx, g = layer.route(x)
    y = layer(x)
    ref = lora_moe_linear_ref(
        x.reshape(-1, in_f), base.weight, base.bias, layer.lora_A, layer.lora_B,
        idx.reshape(-1, idx.shape[-1]), g.reshape(-1, g.shape[-1]), layer.scaling,
    ).reshape(*lead, out_f)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    # an explicit decision overrides the router
    flipped = (idx.flip(-1), g)
    torch.testing.assert_close(
        layer(x, decision=flipped),
        lora_moe_linear_ref(
            x.reshape(-1, in_f), base.weight, base.bias, layer.lora_A, layer.lora_B,
            flipped[0].reshape(-1, idx.shape[-1]), g.reshape(-1, g.shape[-1]), layer.scaling,
        ).reshape(*lead, out_f),
        rtol=1e-12, atol=1e-12,
    )


def test_shared_A_uses_one_A_for_all_experts():
    base = nn.Linear(16, 8, dtype=torch.float64)
    layer = LoRAMoELinear(base, experts=4, rank=3, top_k=4, gate="dense", shared_A=True, seed=0)
    assert layer.lora_A.shape == (1, 3, 16)
    x = torch.randn(5, 16, dtype=torch.float64)
    idx, g = layer.route(x)
    # HydraLoRA: y = base + s * sum_e g_e B_e (A x)
    h = x @ layer.lora_A[0].T
    manual = base(x) + layer.scaling * torch.einsum("tr,te,eor->to", h, g.double(), layer.lora_B)
    torch.testing.assert_close(layer(x), manual)
    assert "shared_A=True" in repr(layer)


def test_adapters_change_the_output_and_repr():
    base = nn.Linear(32, 32)
    layer = LoRAMoELinear(base, experts=4, rank=4, top_k=2, seed=0)
    x = torch.randn(8, 32)
    delta = (layer(x) - base(x)).norm() / base(x).norm()
    assert 0.02 < delta < 2.0
    r = repr(layer)
    assert "experts=4" in r and "rank=4" in r and "gate=softmax_topk" in r and "base_layer" in r
    with pytest.raises(ValueError, match="decision shapes"):
        layer(x, decision=(torch.zeros(8, 3, dtype=torch.long), torch.zeros(8, 3)))


@pytest.mark.parametrize("gate", GATES)
def test_layers_trace_without_graph_breaks(gate):
    torch._dynamo.reset()
    layer = LoRAMoELinear(nn.Linear(16, 12), experts=4, rank=2, top_k=2, gate=gate, seed=0, entropy_threshold=1.0)
    x = torch.randn(2, 3, 16)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


def test_pregated_linear_reads_the_shared_decision():
    pregate = PreGate(16, experts=5, top_k=2, gate="topk_softmax", seed=0).double()
    sites = [PreGatedLoRAMoELinear(nn.Linear(16, o, dtype=torch.float64), pregate, rank=3, seed=i) for i, o in enumerate((16, 7))]
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="pre-gate decision"):
        sites[0](x)
    idx, g = pregate(x)
    assert pregate.decision is not None and pregate.decision[0] is idx
    assert "pregate" not in dict(sites[0].named_children())  # not registered: one owner
    for site in sites:
        ref = lora_moe_linear_ref(
            x.reshape(-1, 16), site.base_layer.weight, site.base_layer.bias, site.lora_A, site.lora_B,
            idx.reshape(-1, 2), g.reshape(-1, 2), site.scaling,
        ).reshape(2, 4, -1)
        torch.testing.assert_close(site(x), ref, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- llama models


def test_tiny_llama_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = tiny_llama(seed=3, num_hidden_layers=1), tiny_llama(seed=3, num_hidden_layers=1)
    assert torch.equal(torch.get_rng_state(), state)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert not torch.equal(a.lm_head.weight, tiny_llama(seed=4, num_hidden_layers=1).lm_head.weight)
    with pytest.raises(ValueError, match="unknown size"):
        tiny_llama("huge")


@pytest.mark.parametrize("variant", ["mole", "pregated"])
def test_adapters_change_logits_and_freeze_the_backbone(backbone, mole, pregated, variant):
    model = mole if variant == "mole" else pregated
    ids = _ids()
    with torch.no_grad():
        ref = backbone(ids).logits
        out = model(ids).logits
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0.01 < rel < 1.5, rel
    sites = adapter_sites(model)
    assert len(sites) == 2 * 7
    bb = dict(backbone.named_modules())
    for name in sites:
        site = model.get_submodule(name)
        assert isinstance(site, MoLELinearBase)
        assert torch.equal(site.base_layer.weight, bb[name].weight)  # untouched
        assert not site.base_layer.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or "router" in n) for n in trainable)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n and "router" not in n)
    if variant == "mole":
        assert "model.layers.0.self_attn.q_proj.router.weight" in trainable
    else:
        assert "model.embed_tokens.pregate.router.weight" in trainable
        assert not any(n.endswith(".router.weight") and "pregate" not in n for n in trainable)
        assert "model.embed_tokens.weight" in dict(model.named_parameters())  # backbone keys unchanged


def test_adapters_are_trainable(mole):
    model = copy.deepcopy(mole)
    ids = _ids(batch=1, seq=5)
    loss = model(ids, labels=ids).loss
    loss.backward()
    site = model.get_submodule("model.layers.1.mlp.down_proj")
    assert site.lora_A.grad is not None and site.lora_B.grad.abs().sum() > 0
    assert site.router.weight.grad is not None  # gradients reach the router through g
    assert site.base_layer.weight.grad is None


def test_add_lora_moe_rejects_bad_arguments(backbone):
    with pytest.raises(ValueError, match="no nn.Linear matched"):
        add_lora_moe(copy.deepcopy(backbone), targets=("qkv",))
    with pytest.raises(ValueError, match="top_k"):
        add_lora_moe(copy.deepcopy(backbone), experts=2, top_k=3)
    with pytest.raises(ValueError, match="unknown gate"):
        add_pregated_lora_moe(copy.deepcopy(backbone), gate="hash")
    with pytest.raises(ValueError, match="rank"):
        add_lora_moe(copy.deepcopy(backbone), rank=0)
    twice = add_lora_moe(copy.deepcopy(backbone), targets="q_proj")
    with pytest.raises(ValueError, match="already has"):
        add_pregated_lora_moe(twice)


@pytest.mark.parametrize("gate", GATES)
def test_every_gate_and_shared_A_build_on_llama(backbone, gate):
    model = add_lora_moe(copy.deepcopy(backbone), targets=("v_proj", "up_proj"), experts=4, top_k=2, rank=4, gate=gate, shared_A=gate == "dense", entropy_threshold=1.0)
    pre = add_pregated_lora_moe(copy.deepcopy(backbone), targets=("v_proj", "up_proj"), experts=4, top_k=2, rank=4, gate=gate, entropy_threshold=1.0)
    ids = _ids(batch=1, seq=4)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all() and torch.isfinite(pre(ids).logits).all()
    assert find_pregate(pre).decision[0].shape == (1, 4, 4 if gate == "dense" else 2)
    assert adapter_sites(model) == adapter_sites(pre) and len(adapter_sites(model)) == 4


def test_pregate_decides_once_and_every_site_uses_it(pregated):
    pregate = find_pregate(pregated)
    assert isinstance(pregated.model.embed_tokens, PreGatedEmbedding)
    calls, seen = [], []
    h1 = pregate.register_forward_hook(lambda m, a, out: calls.append(out))
    hooks = [
        pregated.get_submodule(n).register_forward_pre_hook(lambda m, a: seen.append((m.pregate, m.pregate.decision)))
        for n in adapter_sites(pregated)
    ]
    try:
        ids = _ids()
        with torch.no_grad():
            pregated(ids)
    finally:
        h1.remove()
        for h in hooks:
            h.remove()
    assert len(calls) == 1
    assert len(seen) == len(adapter_sites(pregated))
    assert all(p is pregate and d is calls[0] for p, d in seen)
    expected = pregate.decide(pregated.model.embed_tokens.weight[ids])
    assert torch.equal(calls[0][0], expected[0]) and torch.equal(calls[0][1], expected[1])


def test_pregated_one_layer_equals_manual_computation():
    model = add_pregated_lora_moe(tiny_llama(num_hidden_layers=1), seed=5)
    pregate = find_pregate(model)
    ids = _ids(batch=1, seq=5, seed=2)
    captured = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: captured.__setitem__(n, (a[0], out)))
        for n in adapter_sites(model)
    ]
    with torch.no_grad():
        logits = model(ids).logits
    for h in hooks:
        h.remove()
    idx, g = pregate.decide(model.model.embed_tokens.weight[ids])
    assert len(captured) == 7
    for name, (x, y) in captured.items():
        site = model.get_submodule(name)
        ref = lora_moe_linear_ref(
            x.reshape(-1, x.shape[-1]), site.base_layer.weight, None, site.lora_A, site.lora_B,
            idx.reshape(-1, 2), g.reshape(-1, 2), site.scaling,
        )
        torch.testing.assert_close(y.reshape(ref.shape), ref)
    # decide once, apply everywhere: for one token, the model IS the backbone with every
    # site's chosen experts merged into its weight (what the fused merge kernel exploits)
    one = ids[:, :1]
    with torch.no_grad():
        out1 = model(one).logits
        i1, g1 = pregate.decision
        merged = tiny_llama(num_hidden_layers=1)
        for name in adapter_sites(model):
            site = model.get_submodule(name)
            merged.get_submodule(name).weight += merged_delta_ref(site.lora_A, site.lora_B, site.scaling, i1[0, 0], g1[0, 0])
        torch.testing.assert_close(merged(one).logits, out1, rtol=1e-4, atol=1e-5)
    assert logits.shape == (1, 5, VOCAB)


@pytest.mark.parametrize("copied", [False, True])
def test_inputs_embeds_and_stale_decisions(pregated, copied):
    model = copy.deepcopy(pregated) if copied else pregated
    if copied:  # the copy's sites and hook must follow the copy's PreGate
        with torch.no_grad():
            find_pregate(model).router.weight.mul_(-1)
        assert all(model.get_submodule(n).pregate is find_pregate(model) for n in adapter_sites(model))
    ids = _ids(seed=4)
    other = _ids(seed=5)
    emb = model.get_input_embeddings()
    with torch.no_grad():
        by_ids = model(ids).logits
        model(other)  # leaves the other batch's decision behind
        embeds = F.embedding(ids, emb.weight)  # not emb(ids): that would decide for ids itself
        by_embeds = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(by_embeds, by_ids, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["mole", "pregated"])
def test_greedy_generate_matches_uncached_argmax_loop(mole, pregated, variant):
    model = mole if variant == "mole" else pregated
    ids = _ids(batch=1, seq=4, seed=7)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        seq = ids
        for _ in range(4):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert out.shape == (1, 8)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("variant", ["mole", "pregated"])
def test_compiled_eager_backend_matches_eager_without_graph_breaks(mole, pregated, variant):
    model = mole if variant == "mole" else pregated
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)  # fullgraph: breaks raise
    ids = _ids(seed=9)
    with torch.no_grad():
        expected = model(ids).logits
        expected_decision = find_pregate(model).decision if variant == "pregated" else None
        got = compiled(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert len(graphs) == 1
    if variant == "pregated":
        # the side effect (decision stored on the PreGate) is replayed by Dynamo
        d = find_pregate(model).decision
        assert d is not expected_decision
        assert torch.equal(d[0], expected_decision[0]) and torch.equal(d[1], expected_decision[1])
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------ I/O


@pytest.mark.parametrize("variant", ["mole", "pregated"])
def test_save_load_roundtrip_restores_outputs_exactly(tmp_path, backbone, variant):
    add = add_lora_moe if variant == "mole" else add_pregated_lora_moe
    src = add(copy.deepcopy(backbone), seed=1, gate="dense", shared_A=True, experts=3)
    dst = add(copy.deepcopy(backbone), seed=2, gate="dense", shared_A=True, experts=3)
    ids = _ids()
    with torch.no_grad():
        want = src(ids).logits
        assert not torch.equal(dst(ids).logits, want)
    path = tmp_path / "adapters.safetensors"
    save_adapters(src, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert keys and all(("lora_" in k or "router" in k) for k in keys)
    assert not any("base_layer" in k or "embed_tokens.weight" == k.split("model.")[-1] for k in keys)
    load_adapters(dst, path)
    with torch.no_grad():
        assert torch.equal(dst(ids).logits, want)


def test_load_adapters_rejects_mismatches(tmp_path, backbone):
    src = add_lora_moe(copy.deepcopy(backbone), targets=("q_proj", "v_proj"), rank=4)
    path = tmp_path / "a.safetensors"
    save_adapters(src, path)
    with pytest.raises(ValueError, match="shapes differ|configs differ"):
        load_adapters(add_lora_moe(copy.deepcopy(backbone), targets=("q_proj", "v_proj"), rank=2, alpha=8), path)
    with pytest.raises(ValueError, match="configs differ"):
        load_adapters(add_lora_moe(copy.deepcopy(backbone), targets=("q_proj", "v_proj"), rank=4, gate="dense"), path)
    fewer = add_lora_moe(copy.deepcopy(backbone), targets=("q_proj",), rank=4)
    with pytest.raises(KeyError, match="unexpected"):
        load_adapters(fewer, path)
    load_adapters(fewer, path, strict=False)  # common keys only
    assert torch.equal(fewer.model.layers[0].self_attn.q_proj.lora_B, src.model.layers[0].self_attn.q_proj.lora_B)
    with pytest.raises(KeyError, match="missing"):
        load_adapters(add_lora_moe(copy.deepcopy(backbone), targets=("q_proj", "v_proj", "k_proj"), rank=4), path)
    with pytest.raises(ValueError, match="no LoRA-MoE adapters"):
        load_adapters(copy.deepcopy(backbone), path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not an adafuse_compile adapter file"):
        load_adapters(src, tmp_path / "foreign.safetensors")
