"""Bad input to the compiler gets a clear CompileError naming what the user wrote."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pockprop.compiler.compile import compile
from pockprop.errors import CompileError, UnsupportedOpError


class Inner(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x, dim=1).values  # no rule for cummax


class Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.ReLU(), Inner())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sort(self.block(self.fc(x)), dim=1).values  # and none for sort


def test_unsupported_ops_are_all_named_with_module_path() -> None:
    with pytest.raises(UnsupportedOpError) as info:
        compile(Unsupported(), (torch.randn(2, 4),), optimizer="sgd")
    msg = str(info.value)
    assert "aten.cummax.default" in msg and "block.1" in msg
    assert "aten.sort" in msg
    assert "docs/ops.md" in msg
    assert "Traceback" not in msg
    assert set(info.value.ops) == {"aten.cummax.default", "aten.sort.default"} or len(info.value.ops) == 2


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("kwargs,needle", [
    ({"trainable": ["nothing.*"]}, "'nothing.*' matches no parameter"),
    ({"trainable": ["2.wieght"]}, "similar names: 2.weight"),
    ({"loss": "hinge"}, "unknown loss 'hinge'"),
    ({"optimizer": {"name": "rmsprop"}}, "unknown optimizer 'rmsprop'"),
    ({"optimizer": {"name": "sgd", "lr": 0.1, "betas": (0.9, 0.9)}}, "does not take betas"),
    ({"optimizer": {"name": "sgd", "lr": -1}}, "lr must be > 0"),
    ({"optimizer": {"name": "sgd", "nesterov": True}}, "nesterov needs momentum"),
    ({"loss": "mse", "label_smoothing": 0.1}, "label_smoothing applies to cross_entropy only"),
    ({"labels": torch.zeros(2, dtype=torch.int64), "loss": "mse"}, "do not match predictions"),
])
def test_bad_options(kwargs: dict, needle: str) -> None:
    with pytest.raises(CompileError) as info:
        compile(_mlp(), (torch.randn(2, 4),), **kwargs)
    assert needle in str(info.value)


def test_buffer_pattern_is_rejected() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 5, 5))
    with pytest.raises(CompileError, match="matches only buffers"):
        compile(model, (torch.randn(2, 3, 5, 5),), trainable=["1.running_*"])


def test_export_failure_is_a_compile_error() -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[x > 0]  # output shape depends on the data

    with pytest.raises(CompileError):
        compile(DataDependent(), (torch.randn(2, 4),))


def test_reading_max_pool_indices_is_unsupported_not_wrong() -> None:
    class Unpool(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, idx = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
            return y * idx.float()

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)
            self.pool = Unpool()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pool(self.conv(x)).flatten(1)

    with pytest.raises(UnsupportedOpError, match="max_pool2d_with_indices.*output 1.*pool"):
        compile(Wrapped(), (torch.randn(2, 1, 4, 4),))
