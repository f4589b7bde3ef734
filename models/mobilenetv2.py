"""MobileNetV2 with torchvision's architecture and module names.

Matching torchvision's names (``features.17.conv.2``, ``classifier.1`` ...)
lets users address layers in pockprop configs the same way they would in a
torchvision checkpoint, and lets state dicts be loaded across. Parameter
count at width 1.0 / 1000 classes is 3,504,872, identical to torchvision.

Layout::

    features.0        ConvBNReLU6 3x3 stride 2      (Sequential: 0 conv, 1 bn, 2 relu6)
    features.1..17    InvertedResidual, each with ``.conv`` Sequential
                        expand ratio 1: conv.0 dw ConvBNReLU6, conv.1 1x1 conv, conv.2 bn
                        otherwise:      conv.0 expand ConvBNReLU6, conv.1 dw ConvBNReLU6,
                                        conv.2 1x1 project conv, conv.3 bn
    features.18       ConvBNReLU6 1x1 to the last channel count
    (forward)         adaptive avg pool to 1x1, flatten
    classifier        Sequential(Dropout, Linear)
"""

from __future__ import annotations

import torch
from torch import nn

from pockprop.models._common import _make_divisible, init_conv_bn_linear

__all__ = ["ConvBNReLU", "InvertedResidual", "MobileNetV2", "mobilenet_v2"]

# (expand ratio t, output channels c, repeats n, first stride s), torchvision's table.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU6, children named 0, 1, 2.

    A Sequential subclass rather than a custom module so the children keep
    torchvision's integer names (its Conv2dNormActivation is a Sequential too).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(),  # out-of-place: see models/__init__.py
        )
        self.out_channels = out_ch


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), plus skip when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2, got {stride}")
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup

        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))
        layers.extend([
            ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ])
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018), torchvision layout."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2,
                 round_nearest: int = 8) -> None:
        super().__init__()
        input_channel = _make_divisible(32 * width_mult, round_nearest)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)

        features: list[nn.Module] = [ConvBNReLU(3, input_channel, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
        features.append(ConvBNReLU(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)

        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(self.last_channel, num_classes),
        )
        init_conv_bn_linear(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> MobileNetV2:
    """Build a randomly initialised MobileNetV2 (no pretrained weights)."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, dropout=dropout)


# Default full input shape (batch first), read by models.ZOO.
mobilenet_v2.default_input_shape = (8, 3, 128, 128)  # type: ignore[attr-defined]
