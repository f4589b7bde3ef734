"""experiments/reference.py: the PyTorch full fine-tuning reference runs the device's recipe (frozen statistics:
the same weights as the device runtime's run) and, in train mode, updates the BatchNorm statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments import accuracy
from experiments.drift import make_task
from experiments.reference import finetune_torch, table

CFG = accuracy.Config(width=4, resolution=16, pretrain_epochs=1, epochs=1, seeds=(0,), lrs=(0.01,), batch=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref"))
    task = make_task("output", CFG.resolution, CFG.channels, seed=0)
    state = accuracy.pretrain(task, CFG, out)
    train = (task.target.x[:64], task.target.y[:64])
    return out, state, train


def test_frozen_statistics_reproduce_the_device_run(setup):
    out, state, train = setup
    art = accuracy.compile_scheme(state, "full", CFG, f"{out}/full")
    _, trainer = accuracy.finetune(art["dir"], train, CFG, seed=0, lr=0.01)
    model = finetune_torch(state, train, CFG, seed=0, lr=0.01, bn_train=False)
    device = trainer.full_parameters()
    for name, p in model.named_parameters():
        np.testing.assert_allclose(device[name], p.detach().numpy(), rtol=1e-3, atol=1e-5, err_msg=name)
    for name, b in model.named_buffers():  # eval mode throughout: the statistics are the pre-trained ones
        if "running" in name:
            np.testing.assert_array_equal(b.numpy(), state[name])


def test_train_mode_updates_the_statistics(setup):
    _, state, train = setup
    model = finetune_torch(state, train, CFG, seed=0, lr=0.01, bn_train=True)
    assert not model.training
    moved = [n for n, b in model.named_buffers() if "running_mean" in n and not np.allclose(b.numpy(), state[n])]
    assert moved
    text = table([{"task": "output", "rows": {"torch-bn-train": {"mean": 90.0, "std": 1.0, "lr": 0.03}}}])
    assert "| output | torch-bn-train | 90.0 ± 1.0 | 0.03 |" in text
