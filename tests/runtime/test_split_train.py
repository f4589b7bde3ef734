"""The device's side of split training (runtime/split_train.py): plain and local-loss steps, traffic, pruning."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import pockprop
from pockprop.compiler.split import compile_local_head, compile_split, default_head, save_split
from pockprop.errors import CompileError
from pockprop.runtime.split import Part, SplitModel
from pockprop.runtime.split_train import Traffic, local_step, pruned, split_step
from pockprop.runtime.trainer import Trainer

SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9}


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()


X = torch.randn(4, 3, 8, 8)


def _data(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((4, 3, 8, 8)).astype(np.float32), rng.integers(0, 5, 4)) for _ in range(n)]


@pytest.mark.parametrize("cuts", [["1"], ["1", "3"]], ids=["two-part", "u-shaped"])
def test_split_step_equals_the_split_model_and_counts_traffic(tmp_path, cuts):
    save_split(compile_split(cnn(), X, cuts, optimizer=SGD), str(tmp_path / "a"))
    save_split(compile_split(cnn(), X, cuts, optimizer=SGD), str(tmp_path / "b"))
    a, b = SplitModel.load(str(tmp_path / "a")), SplitModel.load(str(tmp_path / "b"))
    traffic = Traffic()
    for x, y in _data():
        np.testing.assert_allclose(split_step(a.parts, x, y, traffic), b.step(x, y), rtol=1e-6)
    act1 = 4 * 6 * 8 * 8 * 4  # bytes of the activation after module 1
    if len(cuts) == 1:  # up: activation and int64 labels; down: the activation's gradient
        assert (traffic.up, traffic.down) == (2 * (act1 + 4 * 8), 2 * act1)
    else:  # up: activation 1 and the gradient of activation 2; down: activation 2 and the gradient of activation 1
        act2 = 4 * 6 * 4 * 4 * 4
        assert (traffic.up, traffic.down) == (2 * (act1 + act2), 2 * (act2 + act1))
    assert traffic.steps == traffic.server_steps == 2 and traffic.device_seconds > 0
    for pa, pb in zip(a.parts, b.parts):
        for k, v in pb.trainer.state_dict().items():
            np.testing.assert_allclose(pa.trainer.state_dict()[k], v, rtol=1e-6, atol=1e-8)


def test_local_step_trains_the_device_part_through_its_own_head(tmp_path):
    """bottom + local head step like the model nn.Sequential(bottom, head) compiled whole; the server steps
    on what it is sent, and nothing comes down."""
    arts = compile_split(cnn(), X, ["1"], optimizer=SGD)
    head_module = default_head(arts[0].train_graph.types[arts[0].output].shape, 5)
    save_split(arts, str(tmp_path / "s"), local_head=compile_local_head(head_module, arts[0], optimizer=SGD))
    bottom, server = Part.load(str(tmp_path / "s/part0")), Part.load(str(tmp_path / "s/part1"))
    head = Part.load(str(tmp_path / "s/local_head"))
    assert head.info.split_id == bottom.info.split_id and head.info.has_labels
    ref = nn.Sequential(*list(cnn())[:2], head_module).eval()
    pockprop.compile(ref, X, optimizer=SGD).save(str(tmp_path / "ref"))
    whole = Trainer.load(str(tmp_path / "ref"))
    server_before = server.trainer.state_dict()
    traffic = Traffic()
    for i, (x, y) in enumerate(_data(3)):
        loss = local_step(bottom, head, server if i == 0 else None, x, y, traffic)
        np.testing.assert_allclose(loss, whole.step(x, y), rtol=1e-5)
    got = bottom.trainer.state_dict() | head.trainer.state_dict()
    want = whole.state_dict()
    for k_got, k_want in (("0.weight", "0.weight"), ("0.bias", "0.bias"), ("1.weight", "2.1.weight")):
        np.testing.assert_allclose(got[k_got], want[k_want], rtol=1e-5, atol=1e-7, err_msg=k_got)
    assert traffic.down == 0 and traffic.server_steps == 1 and traffic.up == 4 * 6 * 8 * 8 * 4 + 4 * 8
    assert server.trainer.steps == 1
    assert not np.array_equal(server.trainer.state_dict()["2.weight"], server_before["2.weight"])


def test_pruning_scores_on_the_device_and_keeps_the_hardest(tmp_path):
    arts = compile_split(cnn(), X, ["1"], optimizer=SGD)
    head_module = default_head(arts[0].train_graph.types[arts[0].output].shape, 5)
    save_split(arts, str(tmp_path), local_head=compile_local_head(head_module, arts[0]))
    bottom, head = Part.load(str(tmp_path / "part0")), Part.load(str(tmp_path / "local_head"))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((12, 3, 8, 8)).astype(np.float32), rng.integers(0, 5, 12)
    traffic = Traffic()
    kept = pruned(bottom, head, x, y, 0.5, "el2n", traffic)
    per_class = [int(np.ceil(0.5 * (y == c).sum())) for c in np.unique(y)]  # half of each class, rounded up
    assert [int((y[kept] == c).sum()) for c in np.unique(y)] == per_class
    assert list(kept) == sorted(kept) and traffic.up == traffic.down == 0
    assert list(pruned(bottom, head, x, y, 1.0, "el2n", traffic)) == list(range(12))


def test_local_head_needs_the_first_part():
    arts = compile_split(cnn(), X, ["1"])
    with pytest.raises(CompileError, match="first part"):
        compile_local_head(default_head((4, 6, 8, 8), 5), arts[1])
    with pytest.raises(CompileError, match="rank-5"):
        default_head((1, 2, 3, 4, 5), 5)
