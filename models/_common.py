"""Small helpers shared by the convolutional model families.

Kept private: the public surface of :mod:`models` is the builder functions
and ``ZOO``.
"""

from __future__ import annotations

from torch import nn


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (torchvision's rule).

    Channel counts that are multiples of 8 vectorise well on mobile kernels;
    the 10% guard keeps rounding down from removing too much capacity. Copied
    in behaviour from torchvision so width-multiplied MobileNets match it.
    """
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def init_conv_bn_linear(model: nn.Module, linear_std: float | None = 0.01) -> None:
    """torchvision's MobileNet/ResNet initialisation.

    Kaiming fan-out for convolutions, BatchNorm as identity, and (when
    ``linear_std`` is given) a small normal for Linear layers. Deterministic
    under ``torch.manual_seed`` like any other torch init.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
