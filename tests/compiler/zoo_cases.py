"""Tiny configurations of every zoo model, shared by the whole-model tests (fast on 2 cores)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from pockprop import models


@dataclass(frozen=True)
class ZooCase:
    name: str
    build: Callable[[], torch.nn.Module]
    input_shape: tuple[int, ...]
    partial: tuple[str, ...]  # a partly frozen selection: gradients must flow through frozen layers
    earliest: str  # module path of the earliest trainable layer in `partial`


CASES = [
    ZooCase("mobilenet_v2", lambda: models.mobilenet_v2(num_classes=10, width_mult=0.25), (2, 3, 32, 32),
            ("features.14.*", "classifier.*"), "features.14"),
    ZooCase("resnet18", lambda: models.resnet18(num_classes=10, width=8), (2, 3, 32, 32),
            ("layer3.1.*", "fc.*"), "layer3.1"),
    # 64x64 so the last feature map is 2x2: at 1x1 a pooled feature is a single ReLU output, and one that
    # sits at float32 noise (1e-7) after a step makes AdamW's normalized update depend on rounding.
    ZooCase("resnet26", lambda: models.resnet26(num_classes=10, width=8), (2, 3, 64, 64),
            ("layer4.0.conv2.*", "layer4.0.bn2.*", "fc.*"), "layer4.0.conv2"),
    ZooCase("mcunet", lambda: models.mcunet(num_classes=10, width_mult=0.35), (2, 3, 32, 32),
            ("blocks.8.*", "classifier.*"), "blocks.8"),
    ZooCase("mlp", lambda: models.mlp(in_features=64, hidden=(32, 16), num_classes=10), (4, 64),
            ("layers.2.*",), "layers.2"),
]
IDS = [c.name for c in CASES]


def build(case: ZooCase, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = case.build()
    # Non-trivial BatchNorm statistics, so frozen-statistics batch norm is really exercised.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.4, 1.0)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def batch(case: ZooCase, step: int, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(case.input_shape, generator=gen)
    y = torch.randint(0, num_classes, (case.input_shape[0],), generator=gen)
    return x, y


def torch_optimizer(spec: dict[str, Any], params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kw = {k: v for k, v in spec.items() if k != "name"}
    return torch.optim.SGD(params, **kw) if spec["name"] == "sgd" else torch.optim.AdamW(params, **kw)
