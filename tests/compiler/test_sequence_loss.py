"""A sequence model trained with cross-entropy over (N, T, V) logits and padded labels (-100), through
the device runtime, against PyTorch's Hugging Face-style loss."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pockprop.compiler.compile import compile
from pockprop.errors import DataError
from pockprop.runtime.trainer import Trainer
from tests.compiler.torch_ref import assert_trains_like_torch

N, T, D, V = 3, 4, 6, 5


class Tagger(nn.Module):
    """Per-token logits (N, T, V) from per-token features (N, T, D)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(D, 8), nn.Linear(8, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def _build() -> nn.Module:
    torch.manual_seed(0)
    return Tagger()


def _batches(steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    out = []
    for step in range(steps):
        y = torch.randint(0, V, (N, T), generator=gen)
        y[step % N, T - 1 - step:] = -100  # padded ends of different lengths
        out.append((torch.randn(N, T, D, generator=gen), y))
    return out


def _hf_loss(smoothing: float = 0.0):  # type: ignore[no-untyped-def]
    return lambda logits, y: F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), label_smoothing=smoothing)


def test_padded_sequence_steps_match_torch(tmp_path) -> None:
    for opt, smoothing in (({"name": "sgd", "lr": 0.1, "momentum": 0.9}, 0.0),
                           ({"name": "adamw", "lr": 1e-2, "eps": 1e-5}, 0.1)):
        art = assert_trains_like_torch(_build, _batches(), _hf_loss(smoothing), opt, tmp_path / opt["name"],
                                       label_smoothing=smoothing)
        assert art.labels[1].shape == (N, T)
        assert art.manifest().loss["ignore_index"] == -100


def test_all_ignored_batch_is_rejected_and_changes_nothing(tmp_path) -> None:
    x, y = _batches(1)[0]
    art = compile(_build(), (x,), labels=y, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9})
    trainer = Trainer.load(art.save(str(tmp_path / "art")), threads=1)
    before = {k: v.copy() for k, v in trainer.state.items()}
    assert trainer.step(x.numpy(), np.full((N, T), -100)) is None  # torch's loss is NaN here: no step
    assert trainer.rejected == 1 and trainer.steps == 0
    for k, v in trainer.state.items():
        np.testing.assert_array_equal(v, before[k])
    assert trainer.step(x.numpy(), y.numpy()) is not None  # the next batch trains as usual


def test_sequence_labels_are_checked_per_position(tmp_path) -> None:
    x, y = _batches(1)[0]
    art = compile(_build(), (x,), labels=y, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9})
    trainer = Trainer.load(art.save(str(tmp_path / "art")), threads=1)
    bad = y.numpy().copy()
    bad[1, 2] = V
    with pytest.raises(DataError, match=re.escape(f"labels: label {V} at sample 1, position [2] is outside 0..{V - 1}")):
        trainer.step(x.numpy(), bad)
    assert trainer.steps == 0
