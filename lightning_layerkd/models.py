"""CIFAR-style ResNets built from torchvision's residual blocks.

The stem is a 3x3 stride-1 convolution with no max-pool, so a 32x32 image reaches ``layer1`` at
full resolution (``layer1..layer4`` at 32, 16, 8, 4). Attribute names follow torchvision's
``ResNet`` (``conv1``, ``bn1``, ``relu``, ``layer1``..``layer4``, ``avgpool``, ``fc``), so module
paths such as ``"layer2.0.conv1"`` mean the same thing in both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

__all__ = ["CifarResNet", "resnet", "resnet10", "resnet18", "resnet34", "resnet50"]

Block = type[BasicBlock] | type[Bottleneck]

_DEPTHS: dict[int, tuple[Block, list[int]]] = {
    10: (BasicBlock, [1, 1, 1, 1]),
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
}


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
        out = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        layers += [block(out, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

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
