from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightning_layerkd.layers.discovery import (
    LayerInfo,
    find_crucial_layers,
    format_candidates,
    trace_feature_maps,
)
from lightning_layerkd.layers.specs import conversion_conv, resolve_module
from lightning_layerkd.models import resnet

LAYERS = [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3"), ("layer4", "layer4")]


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32)


def plain_cnn(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=1, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
        nn.BatchNorm2d(4 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, 10),
    )


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --- trace_feature_maps ------------------------------------------------------------------------


def test_trace_records(x: torch.Tensor) -> None:
    infos = trace_feature_maps(resnet(18, width=8), x)
    by_path = {info.path: info for info in infos}
    assert [info.order for info in infos] == sorted(info.order for info in infos)
    assert "fc" not in by_path  # 2-D output
    assert by_path["avgpool"].shape == (2, 64, 1, 1)
    assert by_path["conv1"] == LayerInfo("conv1", (2, 8, 32, 32), 1, 0, True, True, True, 0, 1)
    assert by_path["layer1"].num_convs == 4 and not by_path["layer1"].modified_in_place
    # a module finishes after its children; the trace runs on two samples at most
    assert by_path["layer1.0"].finish < by_path["layer1"].finish < by_path["layer2"].finish
    relu = by_path["relu"]
    assert (relu.has_params, relu.is_leaf, relu.has_conv) == (False, True, False)
    layer2 = by_path["layer2"]
    assert layer2.shape == (2, 16, 16, 16) and layer2.spatial == (16, 16)
    assert (layer2.depth, layer2.has_params, layer2.is_leaf, layer2.has_conv) == (
        1,
        True,
        False,
        True,
    )
    assert by_path["layer2.0.downsample.0"].depth == 4
    # a module starts before its children; a block's shared ReLU is recorded once (first call)
    assert by_path["layer2"].order < by_path["layer2.0"].order < by_path["layer2.0.conv1"].order
    assert sum(info.path == "layer1.0.relu" for info in infos) == 1


def test_trace_leaves_model_state_unchanged(x: torch.Tensor) -> None:
    model = resnet(10, width=8)
    model.train()
    model.layer2.eval()  # a mixed train/eval state must survive as it is
    flags = {name: m.training for name, m in model.named_modules()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    trace_feature_maps(model, x)
    assert {name: m.training for name, m in model.named_modules()} == flags
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert hook_count(model) == 0


def test_trace_removes_hooks_on_error() -> None:
    model = resnet(10, width=8)
    with pytest.raises(RuntimeError):
        trace_feature_maps(model, torch.randn(2, 5, 32, 32))  # wrong channel count
    assert hook_count(model) == 0
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("bad", [torch.randn(3), [1, 2, 3], None])
def test_trace_rejects_input_without_batch_dim(bad: object) -> None:
    with pytest.raises(ValueError, match="batch dimension"):
        trace_feature_maps(resnet(10, width=8), bad)  # type: ignore[arg-type]


def test_format_candidates(x: torch.Tensor) -> None:
    infos = trace_feature_maps(resnet(18, width=8), x)
    lines = format_candidates(infos).splitlines()
    assert len(lines) == len(infos)
    assert "  layer1.0.conv1  (2, 8, 32, 32)" in lines


# --- find_crucial_layers -----------------------------------------------------------------------


def test_cifar_resnet18_to_resnet10(x: torch.Tensor) -> None:
    assert find_crucial_layers(resnet(18, width=8), resnet(10, width=8), x) == LAYERS


def test_cifar_resnet50_to_resnet34(x: torch.Tensor) -> None:
    # Bottleneck blocks: layer{i+1}.0.conv1 (stride 1) still outputs layer_i's spatial size,
    # but it is deeper than layer_i, so the group's crucial module is still layer_i.
    assert find_crucial_layers(resnet(50, width=8), resnet(34, width=8), x) == LAYERS


def test_imagenet_resnets() -> None:
    # ImageNet stem at 64x64: conv1 32x32 (a leaf stem, dropped), maxpool + layer1 16x16, ..., 2x2.
    teacher = torchvision.models.resnet50(weights=None, num_classes=10)
    student = torchvision.models.resnet18(weights=None, num_classes=10)
    assert find_crucial_layers(teacher, student, torch.randn(1, 3, 64, 64)) == LAYERS


def test_mixed_stems_pair_by_spatial_size(x: torch.Tensor) -> None:
    # teacher (CIFAR stem): layer1..4 at 32, 16, 8, 4.
    # student (ImageNet stem): conv1 16 (leaf stem, dropped), maxpool + layer1 8, layer2 4,
    # layer3 2 (no teacher match), layer4 1x1 (global, dropped).
    teacher = resnet(50, width=8)
    student = torchvision.models.resnet34(weights=None, num_classes=10)
    assert find_crucial_layers(teacher, student, x) == [("layer1", "layer3"), ("layer2", "layer4")]


def test_plain_sequential_cnn(x: torch.Tensor) -> None:
    # groups: 32x32 -> "0" (a leaf stem, dropped), 16x16 -> "3", 8x8 -> "6", 1x1 (dropped)
    assert find_crucial_layers(plain_cnn(16), plain_cnn(8), x) == [("3", "3"), ("6", "6")]
    assert find_crucial_layers(plain_cnn(16), plain_cnn(8), x, num_layers=1) == [("6", "6")]


def test_num_layers_keeps_deepest(x: torch.Tensor) -> None:
    pairs = find_crucial_layers(resnet(18, width=8), resnet(10, width=8), x, num_layers=2)
    assert pairs == LAYERS[2:]
    pairs = find_crucial_layers(resnet(18, width=8), resnet(10, width=8), x, num_layers=10)
    assert pairs == LAYERS


def test_bad_arguments(x: torch.Tensor) -> None:
    teacher, student = resnet(18, width=8), resnet(10, width=8)
    with pytest.raises(ValueError, match="num_layers must be at least 1, got 0"):
        find_crucial_layers(teacher, student, x, num_layers=0)
    with pytest.raises(ValueError, match=r"batch dimension, \(N, C, H, W\); got .*\(3, 32, 32\)"):
        find_crucial_layers(teacher, student, x[0])  # an unbatched image
    with pytest.raises(ValueError, match="got list"):
        find_crucial_layers(teacher, student, [x])  # type: ignore[arg-type]


def test_no_common_spatial_size(x: torch.Tensor) -> None:
    # The student's only non-stem group is 11x11 (stride 3); the teacher has 32, 16, 8, 4.
    student = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    with pytest.raises(ValueError) as err:
        find_crucial_layers(resnet(10, width=8), student, x)
    msg = str(err.value)
    assert "share an output spatial size" in msg
    assert "11x11: 2" in msg and "32x32: dropped: stem" in msg and "1x1: dropped" in msg
    assert "  2  (2, 16, 11, 11)" in msg
    assert "32x32: layer1" in msg and "4x4: layer4" in msg
    assert "  layer3  (2, 32, 8, 8)" in msg and "  conv1  (2, 8, 32, 32)" in msg


# --- resolve_module ----------------------------------------------------------------------------


def test_resolve_module(x: torch.Tensor) -> None:
    model = resnet(18, width=8)
    assert resolve_module(model, "layer2.0.conv1") is model.layer2[0].conv1
    assert resolve_module(model, "layer3", x, role="teacher") is model.layer3


def test_resolve_module_bad_path_lists_shapes(x: torch.Tensor) -> None:
    model = resnet(18, width=8)
    with pytest.raises(ValueError, match="teacher has no module 'layer5'") as err:
        resolve_module(model, "layer5", x, role="teacher")
    msg = str(err.value)
    assert "Candidate paths with output shapes:" in msg
    assert "  layer1  (2, 8, 32, 32)" in msg and "layer4.1.conv2  (2, 64, 4, 4)" in msg
    assert hook_count(model) == 0


def test_resolve_module_bad_path_without_input() -> None:
    with pytest.raises(ValueError, match="model has no module 'layer1.9'") as err:
        resolve_module(resnet(10, width=8), "layer1.9")
    assert "  layer1.0.conv1\n" in str(err.value)


# --- conversion_conv ---------------------------------------------------------------------------


def test_conversion_conv() -> None:
    model = resnet(18)
    path, conv = conversion_conv(model.layer1, "layer1")  # 64 -> 64 everywhere: the first conv
    assert path == "layer1.0.conv1" and conv is model.layer1[0].conv1
    path, conv = conversion_conv(model.layer2, "layer2")  # 64 -> 128
    assert path == "layer2.0.conv1" and conv is model.layer2[0].conv1
    assert (conv.in_channels, conv.out_channels) == (64, 128)


def test_conversion_conv_skips_same_channel_convs() -> None:
    module = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Sequential(nn.ReLU(), nn.Conv2d(8, 16, 1)))
    path, conv = conversion_conv(module, "block")
    assert path == "block.1.1" and conv is module[1][1]
    conv = nn.Conv2d(4, 4, 1)
    assert conversion_conv(conv, "head") == ("head", conv)
    assert conversion_conv(conv) == ("", conv)


def test_conversion_conv_without_conv() -> None:
    with pytest.raises(
        ValueError, match=r"module 'pool'.*no nn.Conv2d.*\n  0: ReLU\n  1: MaxPool2d"
    ):
        conversion_conv(nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)), "pool")
