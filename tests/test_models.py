from __future__ import annotations

import pytest
import torch
from torchvision.models.resnet import BasicBlock, Bottleneck

from lightning_layerkd.models import (
    CifarResNet,
    ThreeStageResNet,
    WideResNet,
    resnet,
    resnet8x4,
    resnet10,
    resnet18,
    resnet20,
    resnet32x4,
    resnet34,
    resnet50,
    resnet56,
    wrn_16_2,
    wrn_40_2,
)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth", [10, 18, 34, 50])
@pytest.mark.parametrize("width", [8, 16])
def test_output_shape(depth: int, width: int) -> None:
    model = resnet(depth, width=width)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert resnet(depth, num_classes=7, width=width)(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_stage_resolutions_and_attribute_names() -> None:
    model = resnet(18, width=8)
    shapes = {}
    x = model.relu(model.bn1(model.conv1(torch.randn(2, 3, 32, 32))))
    for name in ["layer1", "layer2", "layer3", "layer4"]:
        x = getattr(model, name)(x)
        shapes[name] = tuple(x.shape)
    assert shapes == {
        "layer1": (2, 8, 32, 32),
        "layer2": (2, 16, 16, 16),
        "layer3": (2, 32, 8, 8),
        "layer4": (2, 64, 4, 4),
    }
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert model.conv1.stride == (1, 1) and model.conv1.bias is None


def test_parameter_counts() -> None:
    # Standard CIFAR ResNet-18 (3x3 stem, 1x1-conv + BN projection shortcuts): 11,173,962.
    assert n_params(resnet(18, width=64, num_classes=10)) == 11_173_962
    assert n_params(resnet(34)) == 21_282_122
    assert n_params(resnet(50)) == 23_520_842


def test_blocks_and_convenience_functions() -> None:
    for fn, depth, block, layers in [
        (resnet10, 10, BasicBlock, [1, 1, 1, 1]),
        (resnet18, 18, BasicBlock, [2, 2, 2, 2]),
        (resnet34, 34, BasicBlock, [3, 4, 6, 3]),
        (resnet50, 50, Bottleneck, [3, 4, 6, 3]),
    ]:
        model = fn(num_classes=5, width=8, in_channels=3)
        assert isinstance(model, CifarResNet)
        assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == layers
        assert isinstance(model.layer1[0], block)
        assert n_params(model) == n_params(resnet(depth, num_classes=5, width=8))


def test_width_scales_channels() -> None:
    for width in (8, 16):
        basic = resnet(18, width=width)
        assert basic.conv1.out_channels == width
        assert basic.layer4[-1].conv2.out_channels == 8 * width
        assert basic.fc.in_features == 8 * width
        bottleneck = resnet(50, width=width)
        assert bottleneck.layer1[0].conv1.out_channels == width
        assert bottleneck.fc.in_features == 8 * width * 4


def test_in_channels() -> None:
    model = resnet(10, width=8, in_channels=1)
    assert model.conv1.in_channels == 1
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_kaiming_init() -> None:
    model = resnet(10, width=8)
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)
    # kaiming_normal_(mode="fan_out"): std = sqrt(2 / (out_channels * k * k)).
    w = resnet(18, width=64).layer4[0].conv2.weight
    assert w.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.05)


def test_bad_depth() -> None:
    with pytest.raises(ValueError, match=r"12.*\[10, 18, 34, 50\]"):
        resnet(12)


# ---------------------------------------------------------------------- the standard CIFAR tables
def conv(i: int, o: int, k: int) -> int:
    return i * o * k * k


def bn(c: int) -> int:
    return 2 * c


def three_stage_count(depth: int, filters: tuple[int, ...], classes: int) -> int:
    """Parameters of He et al.'s CIFAR ResNet counted layer by layer from its description."""
    n, total, inplanes = (depth - 2) // 6, conv(3, filters[0], 3) + bn(filters[0]), filters[0]
    for stage, planes in enumerate(filters[1:]):
        for block in range(n):
            i = inplanes if block == 0 else planes
            total += conv(i, planes, 3) + conv(planes, planes, 3) + 2 * bn(planes)
            if block == 0 and (stage > 0 or i != planes):
                total += conv(i, planes, 1) + bn(planes)
        inplanes = planes
    return total + filters[-1] * classes + classes


def wide_count(depth: int, k: int, classes: int) -> int:
    """Parameters of WRN-depth-k counted from Zagoruyko & Komodakis' description."""
    n, widths = (depth - 4) // 6, [16, 16 * k, 32 * k, 64 * k]
    total = conv(3, 16, 3)
    for stage in range(3):
        for block in range(n):
            i, o = (widths[stage] if block == 0 else widths[stage + 1]), widths[stage + 1]
            total += bn(i) + conv(i, o, 3) + bn(o) + conv(o, o, 3)
            if i != o or (block == 0 and stage > 0):
                total += conv(i, o, 1)
    return total + bn(widths[3]) + widths[3] * classes + classes


# (builder, published parameters in millions at 100 classes (CRD, Tian et al. 2020, and the
# DKD / DIST tables), the count from the architecture's description)
STANDARD = [
    (resnet8x4, 1.23, three_stage_count(8, (32, 64, 128, 256), 100)),
    (resnet32x4, 7.43, three_stage_count(32, (32, 64, 128, 256), 100)),
    (resnet20, 0.28, three_stage_count(20, (16, 16, 32, 64), 100)),
    (resnet56, 0.86, three_stage_count(56, (16, 16, 32, 64), 100)),
    (wrn_16_2, 0.70, wide_count(16, 2, 100)),
    (wrn_40_2, 2.26, wide_count(40, 2, 100)),
]


@pytest.mark.parametrize(("build", "published", "counted"), STANDARD)
def test_standard_cifar_networks_have_their_published_parameter_counts(
    build, published: float, counted: int
) -> None:
    model = build()
    assert n_params(model) == counted
    assert round(counted / 1e6, 2) == published
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert build(num_classes=10, in_channels=1)(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("build", [resnet8x4, wrn_16_2])
def test_standard_networks_name_three_stages_at_32_16_8_pixels(build) -> None:
    model, sizes = build(), []
    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    model(torch.randn(2, 3, 32, 32))
    assert sizes == [32, 16, 8]


def test_standard_networks_refuse_depths_they_cannot_build() -> None:
    with pytest.raises(ValueError, match="depth must be 6 n \\+ 2"):
        ThreeStageResNet(10, (16, 16, 32, 64))
    with pytest.raises(ValueError, match="depth must be 6 n \\+ 4"):
        WideResNet(18, 2)
    with pytest.raises(ValueError, match="widen_factor must be at least 1"):
        WideResNet(16, 0)
