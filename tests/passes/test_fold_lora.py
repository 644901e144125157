"""FoldStaticLoRAPass: static LoRA folded into the base weight, refolded when weights change."""

import pytest
import torch

import adafuse_compile
from adafuse_compile.models.styles import StyledMLP
from adafuse_compile.testing import compile_and_capture, count_fused


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_new_adapter_weights_are_used_by_the_next_call(inner):
    torch.manual_seed(0)
    model = StyledMLP("peft").eval()
    x = torch.randn(4, 48)
    with torch.no_grad():
        torch._dynamo.reset()
        fast = torch.compile(model, backend="adafuse", options={"inner": inner, "strict": True})
        torch.testing.assert_close(fast(x), model(x))
        model.fc1.lora_B["default"].weight.mul_(3.0)  # in place: bumps the version counter
        torch.testing.assert_close(fast(x), model(x))
        state = {k: v * 0.5 for k, v in model.state_dict().items() if "lora_A" in k}
        model.load_state_dict(state, strict=False)  # copy_ into the same tensors
        torch.testing.assert_close(fast(x), model(x))
        model.fc2.base_layer.weight.add_(0.1)  # the base weight too
        torch.testing.assert_close(fast(x), model(x))
    torch._dynamo.reset()


def test_fold_is_skipped_for_unchanged_weights():
    from adafuse_compile.passes.fold_lora import FoldedWeights

    W, A, B = torch.randn(6, 5), torch.randn(2, 5), torch.randn(6, 2)
    folder = FoldedWeights((0, 1, 2), n_A=1, A_layout="list", B_layout="list", scale=2.0)
    first = folder([W, A, B])
    torch.testing.assert_close(first, W + 2.0 * B @ A)
    assert folder([W, A, B]) is first  # cached: no work per call
    B.mul_(2)
    torch.testing.assert_close(folder([W, A, B]), W + 2.0 * B @ A)
    assert folder([W, A.clone(), B]) is not first  # a different tensor object refolds


def test_fold_option_off_fuses_static_lora_instead():
    model = StyledMLP("peft").eval()
    x = torch.randn(3, 48)
    with torch.no_grad():
        out, (gm,) = compile_and_capture(model, x, options={"fold": False})
        torch.testing.assert_close(out, model(x))
        report = adafuse_compile.explain(model, x, options={"fold": False})
    assert count_fused(gm) == 2
    assert [s.status for s in report.sites] == ["fused", "fused"]


def test_training_mode_dropout_is_not_folded():
    """With dropout active the adapter is random: no canonical form, the site is left."""
    model = StyledMLP("peft", lora_dropout=0.5).train()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 48)
    with torch.no_grad():
        report = adafuse_compile.explain(model, x)
    assert [s.status for s in report.sites] == ["left", "left"]
