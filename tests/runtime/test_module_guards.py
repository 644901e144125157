"""guards="module-tags": Dynamo skips unchanged module subtrees, and nothing that changes in place
goes unnoticed (adafuse_compile/runtime/module_guards.py). Each test changes the model after
compiling and compares with eager; several pin Dynamo behaviour the mode relies on."""

import gc
import weakref

import pytest
import torch

import adafuse_compile
from adafuse_compile.models import add_lora_moe, tiny_llama
from adafuse_compile.runtime import module_guards


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def mole_model():
    torch.manual_seed(0)
    return add_lora_moe(tiny_llama(), experts=4, top_k=2, rank=4).eval()


def tags_compile(model):
    return adafuse_compile.compile(model, guards="module-tags", inner="eager")


def run(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def assert_matches_eager(compiled, model, ids):
    torch.testing.assert_close(run(compiled, ids), run(model, ids), rtol=1e-5, atol=1e-5)


def cache_entries(model_cls) -> list:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return _debug_get_cache_entry_list(model_cls.forward.__code__)


def tag_roots(model_cls) -> list[tuple[str, bool]]:
    """(source, tag matching disabled) of every tag-safe root of the model's forward's guards."""
    found = []

    def visit(node):
        if node.is_tag_safe_root():
            found.append((node.get_source(), node.is_recursive_dict_tag_matching_disabled()))
        for child in node.get_child_managers():
            visit(child)

    for entry in cache_entries(model_cls):
        visit(entry.guard_manager.root)
    return found


class Scaled(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.lin(x))


class Toy(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.scaled = Scaled(fn)
        self.out = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.out(self.scaled(x))


def closure(k):
    def scale(x):
        return x * k

    return scale


class Tripled(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) * 3


def test_same_logits_and_module_subtrees_skipped():
    model = mole_model()
    compiled = tags_compile(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    for _ in range(3):
        assert_matches_eager(compiled, model, ids)
    roots = tag_roots(type(model))
    assert roots, "no module subtree is skipped: the mode would cost without gaining"
    assert not any(disabled for _, disabled in roots)


def test_default_mode_keeps_full_guards():
    model = mole_model()
    compiled = adafuse_compile.compile(model, inner="eager")
    ids = torch.randint(0, model.config.vocab_size, (1, 3))
    run(compiled, ids)
    assert tag_roots(type(model)) == []
    assert getattr(torch._dynamo.config, module_guards.TAGS_SETTING) is False  # restored after the call


def test_class_changed_in_place_raises_once_then_recompiles():
    model = mole_model()
    compiled = tags_compile(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 3))
    for _ in range(2):
        run(compiled, ids)
    site = model.model.layers[1].self_attn.q_proj.base_layer
    assert type(site) is torch.nn.Linear
    site.__class__ = Tripled
    with pytest.raises(adafuse_compile.ClassChangedError, match=r"model\.layers\.1\.self_attn\.q_proj"):
        run(compiled, ids)
    assert_matches_eager(compiled, model, ids)  # the new class, recompiled


@pytest.mark.parametrize("change", ["dtype", "strides", "shape", "requires_grad"])
def test_tensor_changed_in_place_is_seen_by_dynamo(change):
    """Dynamo checks a skipped subtree's tensors on its fast path (torch 2.13); the mode relies on it."""
    toy = Toy(closure(2.0))
    compiled = tags_compile(toy)
    x = torch.randn(3, 8)
    for _ in range(3):
        compiled(x)
    assert [r for r in tag_roots(Toy) if not r[1]], "the subtree must be on the fast path before the change"
    graphs = len(cache_entries(Toy))
    lin = toy.out
    if change == "dtype":
        for p in toy.parameters():
            p.data = p.data.double()
        x = x.double()
    elif change == "strides":
        lin.weight.data = lin.weight.data.t().contiguous().t()
    elif change == "shape":  # 4 outputs instead of 8
        lin.weight.data, lin.bias.data = torch.randn(4, 8), torch.randn(4)
    else:
        lin.weight.requires_grad_(False)
    torch.testing.assert_close(compiled(x), toy(x))
    # The graph runs torch ops on whatever tensors it gets, so the values alone would not show a
    # missed guard: Dynamo must have recompiled for the new metadata.
    assert len(cache_entries(Toy)) == graphs + 1


def test_closure_cell_rebound():
    """Functions are never skipped (assume_dunder_attributes_remain_unchanged=False): a closure's
    cell changed after compiling is seen."""
    toy = Toy(closure(2.0))
    compiled = tags_compile(toy)
    x = torch.randn(3, 8)
    for _ in range(3):
        compiled(x)
    toy.scaled.fn.__closure__[0].cell_contents = 5.0
    torch.testing.assert_close(compiled(x), toy(x))


def test_hook_added_after_compiling():
    """Stricter than Dynamo's default, which skips hook guards and would ignore this hook."""
    toy = Toy(closure(2.0))
    compiled = tags_compile(toy)
    x = torch.randn(3, 8)
    for _ in range(3):
        compiled(x)
    toy.out.register_forward_hook(lambda mod, args, out: out + 1)
    torch.testing.assert_close(compiled(x), toy(x))


def test_frame_without_graph_of_ours_keeps_full_guards():
    """Only a graph of ours checks classes, so a frame compiled without one (or whose graph came
    from another frame's unfinished compile) keeps its full guards."""
    with torch._dynamo.config.patch(module_guards.SETTINGS):
        setattr(torch._dynamo.config, module_guards.TAGS_SETTING, True)
        assert module_guards.ModuleTagGuards(torch.nn.Linear(2, 2))([]) == []
        assert getattr(torch._dynamo.config, module_guards.TAGS_SETTING) is False


def test_two_models_of_one_class_keep_their_fast_paths():
    """Another model's calls check this model's cache entries first (same forward code) and fail:
    that must not turn their fast path off."""
    a, b = mole_model(), mole_model()
    ca, cb = tags_compile(a), adafuse_compile.compile(b, inner="eager")
    ids = torch.randint(0, a.config.vocab_size, (1, 3))
    for _ in range(3):
        assert_matches_eager(ca, a, ids)
        assert_matches_eager(cb, b, ids)
    roots = tag_roots(type(a))
    assert roots and not any(disabled for _, disabled in roots)


def test_needs_the_api():
    model = mole_model()
    compiled = torch.compile(model, backend="adafuse", options={"guards": "module-tags", "inner": "eager"})
    with pytest.raises(Exception, match=r"adafuse_compile\.compile"):
        run(compiled, torch.randint(0, model.config.vocab_size, (1, 3)))


def test_unknown_mode():
    with pytest.raises(ValueError, match="guards"):
        adafuse_compile.compile(mole_model(), guards="none")


def test_model_can_be_freed():
    model = mole_model()
    compiled = tags_compile(model)
    run(compiled, torch.randint(0, model.config.vocab_size, (1, 3)))
    ref = weakref.ref(model)
    del model, compiled
    gc.collect()
    assert ref() is None
