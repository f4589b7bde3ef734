"""A small MCUNet / ProxylessNAS-style mobile CNN.

Not a reproduction of a published checkpoint: a hand-written network in the
spirit of MCUNet-in1 / ProxylessNAS-mobile, with the features that matter for
on-device training graphs -- mixed depthwise kernel sizes, mixed expand ratios,
residual adds, ReLU6 -- at well under 1M parameters. Module names follow the
ProxylessNAS/MCUNet code base so layer paths read the same as there.

Layout (width 1.0; t = expand ratio, k = depthwise kernel, s = stride)::

    first_conv          3x3 s2 ConvBNReLU6, 3 -> 16
    block  t  k   c    s  residual
    0      1  3   16   1  yes
    1      3  5   24   2  no
    2      3  3   24   1  yes
    3      6  7   40   2  no
    4      3  5   40   1  yes
    5      4  5   80   2  no
    6      3  5   80   1  yes
    7      4  3   96   1  no   (80 -> 96)
    8      3  5   96   1  yes
    9      4  7   160  2  no
    10     3  5   160  1  yes
    feature_mix_layer   1x1 ConvBNReLU6, 160 -> 384
    (forward)           adaptive avg pool to 1x1, flatten
    classifier          Sequential(Dropout, Linear 384 -> num_classes)

Overall stride 32. Each ``blocks.N.mobile_inverted_conv`` holds
``inverted_bottleneck`` (1x1 expand; absent when t == 1), ``depth_conv`` and
``point_linear`` (1x1 project, no activation), each a Sequential with children
named ``conv``, ``bn`` and (except ``point_linear``) ``act``. ``first_conv``
and ``feature_mix_layer`` use the same ``conv, bn, act`` naming.

Parameters at width 1.0 / 1000 classes: 966,872 (581,872 in the backbone and
head conv, 385,000 in the classifier).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from pockprop.models._common import _make_divisible, init_conv_bn_linear

__all__ = ["MBInvertedConvLayer", "MobileInvertedResidualBlock", "MCUNet", "mcunet", "BLOCK_SETTING"]

FIRST_CHANNELS = 16
LAST_CHANNELS = 384
# (expand ratio t, kernel size k, output channels c, stride s), one row per block.
BLOCK_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 3, 16, 1),
    (3, 5, 24, 2),
    (3, 3, 24, 1),
    (6, 7, 40, 2),
    (3, 5, 40, 1),
    (4, 5, 80, 2),
    (3, 5, 80, 1),
    (4, 3, 96, 1),
    (3, 5, 96, 1),
    (4, 7, 160, 2),
    (3, 5, 160, 1),
)


def conv_bn(in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
            act: bool = True) -> nn.Sequential:
    """Conv2d (no bias) -> BatchNorm2d [-> ReLU6] with children named conv/bn/act."""
    layers: list[tuple[str, nn.Module]] = [
        ("conv", nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups,
                           bias=False)),
        ("bn", nn.BatchNorm2d(out_ch)),
    ]
    if act:
        layers.append(("act", nn.ReLU6()))  # out-of-place: see models/__init__.py
    return nn.Sequential(OrderedDict(layers))


class MBInvertedConvLayer(nn.Module):
    """1x1 expand -> kxk depthwise -> 1x1 linear project (MobileNetV2 block body)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int,
                 expand_ratio: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.expand_ratio = expand_ratio
        if expand_ratio == 1:
            mid_ch = in_ch
            # Registered as None so the name is known but no module/parameters exist.
            self.inverted_bottleneck = None
        else:
            mid_ch = _make_divisible(in_ch * expand_ratio, 8)
            self.inverted_bottleneck = conv_bn(in_ch, mid_ch, 1)
        self.depth_conv = conv_bn(mid_ch, mid_ch, kernel_size, stride, groups=mid_ch)
        self.point_linear = conv_bn(mid_ch, out_ch, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inverted_bottleneck is not None:
            x = self.inverted_bottleneck(x)
        return self.point_linear(self.depth_conv(x))


class MobileInvertedResidualBlock(nn.Module):
    """``MBInvertedConvLayer`` plus an identity shortcut when stride is 1 and channels match."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int,
                 expand_ratio: int) -> None:
        super().__init__()
        self.mobile_inverted_conv = MBInvertedConvLayer(in_ch, out_ch, kernel_size, stride,
                                                        expand_ratio)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mobile_inverted_conv(x)
        return x + out if self.use_residual else out


class MCUNet(nn.Module):
    """Tiny mobile CNN; see the module docstring for the block table."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        in_ch = _make_divisible(FIRST_CHANNELS * width_mult, 8)
        self.first_conv = conv_bn(3, in_ch, 3, stride=2)
        blocks = []
        for t, k, c, s in BLOCK_SETTING:
            out_ch = _make_divisible(c * width_mult, 8)
            blocks.append(MobileInvertedResidualBlock(in_ch, out_ch, k, s, t))
            in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        # Like MobileNetV2, never shrink the head below its width-1.0 size.
        last_ch = _make_divisible(LAST_CHANNELS * max(1.0, width_mult), 8)
        self.feature_mix_layer = conv_bn(in_ch, last_ch, 1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_ch, num_classes))
        init_conv_bn_linear(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.first_conv(x))
        x = self.feature_mix_layer(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, (1, 1)), 1)
        return self.classifier(x)


def mcunet(num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> MCUNet:
    """Build a randomly initialised MCUNet-style network (no pretrained weights)."""
    return MCUNet(num_classes=num_classes, width_mult=width_mult, dropout=dropout)


# Default full input shape (batch first), read by models.ZOO.
mcunet.default_input_shape = (8, 3, 128, 128)  # type: ignore[attr-defined]
