"""CIFAR-style ResNets built from torchvision's residual blocks, and the networks of the standard
CIFAR-100 distillation tables (resnet8x4 / resnet32x4, wrn_16_2 / wrn_40_2, resnet20 / resnet56;
:class:`ThreeStageResNet`, :class:`WideResNet`).

The stem is a 3x3 stride-1 convolution with no max-pool, so a 32x32 image reaches ``layer1`` at
full resolution (``layer1..layer4`` at 32, 16, 8, 4). Attribute names follow torchvision's
``ResNet`` (``conv1``, ``bn1``, ``relu``, ``layer1``..``layer4``, ``avgpool``, ``fc``), so module
paths such as ``"layer2.0.conv1"`` mean the same thing in both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

__all__ = [
    "CifarResNet",
    "ThreeStageResNet",
    "WideResNet",
    "resnet",
    "resnet8x4",
    "resnet10",
    "resnet18",
    "resnet20",
    "resnet32x4",
    "resnet34",
    "resnet50",
    "resnet56",
    "wrn_16_2",
    "wrn_40_2",
]

Block = type[BasicBlock] | type[Bottleneck]

_DEPTHS: dict[int, tuple[Block, list[int]]] = {
    10: (BasicBlock, [1, 1, 1, 1]),
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
}


def residual_stage(
    block: Block, inplanes: int, planes: int, blocks: int, stride: int
) -> nn.Sequential:
    """One stage of ``blocks`` residual blocks (He et al. 2016): the first changes the stride and
    the width, with a 1x1 convolution + batch norm shortcut where the shapes differ."""
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, out, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(out, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stride-1 stem, no max-pool, four stages.

    Args:
        block: ``BasicBlock`` or ``Bottleneck`` from ``torchvision.models.resnet``.
        layers: number of blocks in each of the four stages.
        num_classes: size of the output logits.
        width: channels of the stem and of ``layer1``; stages use width, 2x, 4x, 8x (times the
            block's expansion).
        in_channels: channels of the input image.
    """

    def __init__(
        self,
        block: Block,
        layers: list[int],
        num_classes: int = 10,
        width: int = 64,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must list 4 stage depths, got {layers}")
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        stage = residual_stage(block, self.inplanes, planes, blocks, stride)
        self.inplanes = planes * block.expansion
        return stage

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits of shape ``(N, num_classes)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(depth: int, num_classes: int = 10, width: int = 64, in_channels: int = 3) -> CifarResNet:
    """Build a CIFAR ResNet of the given depth.

    Args:
        depth: one of 10, 18, 34 (``BasicBlock``) or 50 (``Bottleneck``).
        num_classes: size of the output logits.
        width: channels of the stem and of ``layer1``.
        in_channels: channels of the input image.

    Raises:
        ValueError: if ``depth`` is not a supported depth.
    """
    if depth not in _DEPTHS:
        raise ValueError(f"unknown ResNet depth {depth!r}; valid depths: {sorted(_DEPTHS)}")
    block, layers = _DEPTHS[depth]
    return CifarResNet(block, layers, num_classes, width, in_channels)


def resnet10(*, num_classes: int = 10, width: int = 64, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-10 (``BasicBlock``, [1, 1, 1, 1])."""
    return resnet(10, num_classes, width, in_channels)


def resnet18(*, num_classes: int = 10, width: int = 64, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-18 (``BasicBlock``, [2, 2, 2, 2])."""
    return resnet(18, num_classes, width, in_channels)


def resnet34(*, num_classes: int = 10, width: int = 64, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-34 (``BasicBlock``, [3, 4, 6, 3])."""
    return resnet(34, num_classes, width, in_channels)


def resnet50(*, num_classes: int = 10, width: int = 64, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-50 (``Bottleneck``, [3, 4, 6, 3])."""
    return resnet(50, num_classes, width, in_channels)


# ---------------------------------------------------------------------- the standard CIFAR tables
class ThreeStageResNet(nn.Module):
    """The three-stage CIFAR ResNet of He et al. (2016, section 4.2) that the CIFAR-100
    distillation tables use (CRD, DKD, DIST, logit standardization): a 3x3 stem, three stages
    of ``(depth - 2) / 6`` basic blocks at 32, 16 and 8 pixels, global average pooling, a linear
    layer. Stages are ``layer1..layer3``; shortcuts that change shape are a 1x1 convolution and
    batch norm.

    Args:
        depth: ``6 n + 2`` (8, 20, 32, 56, 110, ...).
        filters: channels of the stem and of the three stages.
        num_classes: size of the output logits.
        in_channels: channels of the input image.
    """

    def __init__(
        self,
        depth: int,
        filters: tuple[int, int, int, int],
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6 n + 2 with n >= 1 (8, 20, 32, 56), got {depth}")
        blocks = (depth - 2) // 6
        self.inplanes = filters[0]
        self.conv1 = nn.Conv2d(in_channels, filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(filters[1], blocks, stride=1)
        self.layer2 = self._make_layer(filters[2], blocks, stride=2)
        self.layer3 = self._make_layer(filters[3], blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(filters[3], num_classes)
        _init(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        stage = residual_stage(BasicBlock, self.inplanes, planes, blocks, stride)
        self.inplanes = planes
        return stage

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits of shape ``(N, num_classes)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class WideBlock(nn.Module):
    """The pre-activation block of wide ResNets (Zagoruyko & Komodakis 2016): BN-ReLU-conv3x3
    twice; a 1x1 convolution of the pre-activated input where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """Wide ResNet WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis 2016) for 32x32
    images: a 3x3 stem of 16 channels, three stages ``layer1..layer3`` of ``(depth - 4) / 6``
    :class:`WideBlock` at ``16 k``, ``32 k``, ``64 k`` channels, a final BN-ReLU, global average
    pooling and a linear layer. No dropout (the distillation tables train without).

    Args:
        depth: ``6 n + 4`` (16, 28, 40, ...).
        widen_factor: ``k``.
        num_classes: size of the output logits.
        in_channels: channels of the input image.
    """

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int = 100, in_channels: int = 3
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6 n + 4 with n >= 1 (16, 28, 40), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be at least 1, got {widen_factor}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.layer1 = self._make_layer(widths[0], widths[1], blocks, stride=1)
        self.layer2 = self._make_layer(widths[1], widths[2], blocks, stride=2)
        self.layer3 = self._make_layer(widths[2], widths[3], blocks, stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        _init(self)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [WideBlock(in_planes, planes, stride)]
        layers += [WideBlock(planes, planes, 1) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits of shape ``(N, num_classes)``."""
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet8x4(*, num_classes: int = 100, in_channels: int = 3) -> ThreeStageResNet:
    """resnet8x4 of the CIFAR-100 tables: depth 8, filters 32, 64, 128, 256 (1.23 M parameters
    at 100 classes)."""
    return ThreeStageResNet(8, (32, 64, 128, 256), num_classes, in_channels)


def resnet32x4(*, num_classes: int = 100, in_channels: int = 3) -> ThreeStageResNet:
    """resnet32x4 of the CIFAR-100 tables: depth 32, filters 32, 64, 128, 256 (7.43 M)."""
    return ThreeStageResNet(32, (32, 64, 128, 256), num_classes, in_channels)


def resnet20(*, num_classes: int = 100, in_channels: int = 3) -> ThreeStageResNet:
    """ResNet-20 (He et al. 2016): depth 20, filters 16, 16, 32, 64 (0.28 M)."""
    return ThreeStageResNet(20, (16, 16, 32, 64), num_classes, in_channels)


def resnet56(*, num_classes: int = 100, in_channels: int = 3) -> ThreeStageResNet:
    """ResNet-56 (He et al. 2016): depth 56, filters 16, 16, 32, 64 (0.86 M)."""
    return ThreeStageResNet(56, (16, 16, 32, 64), num_classes, in_channels)


def wrn_16_2(*, num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    """WRN-16-2 (0.70 M parameters at 100 classes)."""
    return WideResNet(16, 2, num_classes, in_channels)


def wrn_40_2(*, num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    """WRN-40-2 (2.26 M parameters at 100 classes)."""
    return WideResNet(40, 2, num_classes, in_channels)
