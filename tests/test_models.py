"""Model shapes, Opacus compatibility and exact per-sample gradients."""

import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.validators import ModuleValidator
from torch import nn

from dpstudy.errors import ConfigError
from dpstudy.losses import SegmentationLoss
from dpstudy.privacy.conv_grad_sample import conv2d_grad_sample, use_native_conv_grad_sample
from dpstudy.models import (
    MODELS, NestedUNet, UNet, build_model, check_image_size, count_parameters, size_divisor,
)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("base_width, depth", [(4, 1), (8, 3)])
def test_output_is_logits_of_input_size(name, base_width, depth):
    model = build_model(name, base_width=base_width, depth=depth)
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 9, 32, 32)
    assert (out < 0).any()  # raw logits, not probabilities


def test_nested_deep_supervision_averages_heads():
    torch.manual_seed(0)
    model = NestedUNet(base_width=4, depth=2, deep_supervision=True)
    assert len(model.heads) == 2
    x = torch.randn(1, 1, 16, 16)
    out = model(x)
    assert out.shape == (1, 9, 16, 16)
    with torch.no_grad():
        model.heads[1].weight.add_(1.0)
    assert not torch.allclose(model(x), out)  # every head contributes


@pytest.mark.parametrize("model", [UNet(base_width=4, depth=3), NestedUNet(base_width=4, depth=3, deep_supervision=True)])
def test_opacus_compatible_modules_only(model):
    assert ModuleValidator.validate(model, strict=False) == []
    ModuleValidator.validate(model, strict=True)
    forbidden = (nn.ConvTranspose2d, nn.modules.batchnorm._BatchNorm, nn.Softmax, nn.LogSoftmax)
    assert not [m for m in model.modules() if isinstance(m, forbidden)]


@pytest.mark.parametrize(
    "model_fn",
    [lambda: UNet(base_width=4, depth=2), lambda: NestedUNet(base_width=4, depth=2, deep_supervision=True)],
    ids=["unet", "nested_unet"],
)
@pytest.mark.parametrize("mode", ["hooks", "functorch", "native_conv"])
def test_per_sample_gradients_match_single_sample_backward(model_fn, mode):
    torch.manual_seed(0)
    model = model_fn()
    x = torch.randn(3, 1, 16, 16)
    y = torch.randint(0, 9, (3, 16, 16))
    loss_fn = SegmentationLoss()
    expected = []
    for i in range(3):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        expected.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()

    gsm = GradSampleModule(model, force_functorch=mode == "functorch")  # loss_reduction="mean"
    if mode == "native_conv":
        use_native_conv_grad_sample(gsm)
    loss_fn(gsm(x), y).backward()
    for k, p in enumerate(model.parameters()):
        for i in range(3):
            torch.testing.assert_close(p.grad_sample[i], expected[i][k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 5), stride=2, padding=(0, 2), bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=3, dilation=2, padding=2, groups=2),
    dict(in_channels=4, out_channels=6, kernel_size=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding="same"),    # Opacus's path
])
def test_native_conv_grad_sample_equals_opacus_unfold(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs)
    x = torch.randn(5, 4, 13, 11)
    backprops = torch.randn_like(conv(x))
    ours, ref = conv2d_grad_sample(conv, [x], backprops), compute_conv_grad_sample(conv, [x], backprops)
    assert ours.keys() == ref.keys()
    for p in ref:
        assert ours[p].shape == (5, *p.shape)
        torch.testing.assert_close(ours[p], ref[p], atol=1e-4, rtol=1e-4)


def test_native_conv_sampler_is_per_model_not_global():
    gsm = GradSampleModule(UNet(base_width=4, depth=2))
    use_native_conv_grad_sample(gsm)
    assert gsm.GRAD_SAMPLERS[nn.Conv2d] is conv2d_grad_sample
    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] is compute_conv_grad_sample
    assert GradSampleModule(UNet(base_width=4, depth=2)).GRAD_SAMPLERS[nn.Conv2d] is (
        compute_conv_grad_sample)


def test_parameter_count_by_hand():
    # depth 1, width 4: encoder 196 + 896, up 36, decoder 448, head 45
    assert count_parameters(UNet(base_width=4, depth=1)) == 1621


def test_size_divisor_and_image_size_check():
    assert size_divisor(4) == 16
    check_image_size((496, 768), 4)
    with pytest.raises(ConfigError, match=r"\(100, 130\).*16.*\(96, 128\) or \(112, 144\)"):
        check_image_size((100, 130), 4)
    with pytest.raises(ConfigError, match=r"nearest valid sizes: \(16, 16\)$"):
        check_image_size((8, 8), 4)
    with pytest.raises(ConfigError, match="depth 2"):
        UNet(base_width=4, depth=2)(torch.zeros(1, 1, 18, 16))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"name": "resnet"}, "unet, nested_unet"),
        ({"name": "unet", "base_width": 0}, "base_width"),
        ({"name": "unet", "base_width": 6}, "base_width"),
        ({"name": "nested_unet", "depth": 0}, "depth"),
        ({"name": "unet", "depth": 6}, "depth"),
        ({"name": "unet", "n_classes": 1}, "n_classes"),
    ],
)
def test_build_model_rejects_bad_config(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        build_model(**kwargs)
