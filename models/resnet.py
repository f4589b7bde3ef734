"""ResNet-18/26/50 with torchvision's architecture and module names.

One implementation, ``ResNet(block, layers, num_classes, width)``, serves both
block types so that the basic and bottleneck variants cannot drift apart.
Names follow torchvision (``conv1, bn1, relu, maxpool, layer1..layer4,
avgpool, fc``; blocks ``conv1, bn1, ..., downsample``) so layer paths in
pockprop configs read the same as for a torchvision checkpoint.

``width`` is the channel count of the stem and ``layer1`` (64 in the paper);
later stages use 2x, 4x, 8x of it. Bottleneck blocks put the stride on the
3x3 convolution (torchvision's "v1.5"), not on the first 1x1.

Parameter counts at width 64 / 1000 classes: resnet18 11,689,512,
resnet50 25,557,032 (both identical to torchvision); resnet26 is
resnet50's bottleneck design with two blocks per stage.
"""

from __future__ import annotations

from typing import Type, Union

import torch
from torch import nn

from pockprop.models._common import init_conv_bn_linear

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet26", "resnet50"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()  # out-of-place: see models/__init__.py
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand by 4, plus shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


Block = Type[Union[BasicBlock, Bottleneck]]


class ResNet(nn.Module):
    """ResNet (He et al. 2016) in torchvision's layout, with a configurable base width."""

    def __init__(self, block: Block, layers: list[int] | tuple[int, ...], num_classes: int = 1000,
                 width: int = 64) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must list 4 stage depths, got {list(layers)}")
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        # torchvision leaves the fc at PyTorch's default init, so do we.
        init_conv_bn_linear(self, linear_std=None)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        # A projection shortcut is needed whenever the block changes resolution or channels.
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(num_classes: int = 1000, width: int = 64) -> ResNet:
    """ResNet-18: BasicBlock, [2, 2, 2, 2]."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, width=width)


def resnet26(num_classes: int = 1000, width: int = 64) -> ResNet:
    """ResNet-26: Bottleneck, [2, 2, 2, 2] (1 stem + 8 blocks x 3 convs + fc = 26 layers)."""
    return ResNet(Bottleneck, [2, 2, 2, 2], num_classes=num_classes, width=width)


def resnet50(num_classes: int = 1000, width: int = 64) -> ResNet:
    """ResNet-50: Bottleneck, [3, 4, 6, 3]."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, width=width)


# Default full input shape (batch first), read by models.ZOO.
resnet18.default_input_shape = (8, 3, 128, 128)  # type: ignore[attr-defined]
resnet26.default_input_shape = (8, 3, 128, 128)  # type: ignore[attr-defined]
resnet50.default_input_shape = (8, 3, 128, 128)  # type: ignore[attr-defined]
