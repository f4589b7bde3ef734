"""BatchNorm in training mode (compiler/batchnorm.py): the step equals PyTorch's train-mode step, running
statistics included; the inference graph reads the updated statistics; frozen stays the default."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import pockprop
from pockprop.artifact.contract import StateRole
from pockprop.errors import CompileError
from pockprop.runtime.trainer import Trainer

SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
ADAMW = {"name": "adamw", "lr": 1e-2}


def model() -> nn.Module:
    torch.manual_seed(0)
    # no bias before a batch norm: in train mode its gradient is 0 up to rounding, which AdamW would scale up
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                      nn.Conv2d(6, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6, momentum=0.3, affine=False),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8),
                      nn.Linear(8, 5))
    with torch.no_grad():  # statistics unlike a batch's, so using the wrong ones shows
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


X = torch.zeros(4, 3, 8, 8)


def _batches(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((4, 3, 8, 8)).astype(np.float32), rng.integers(0, 5, 4)) for _ in range(n)]


def _torch_steps(m: nn.Module, opt: dict, batches, trainable=None) -> list[float]:
    m.train()
    names = [n for n, _ in m.named_parameters() if trainable is None or n.startswith(trainable)]
    for n, p in m.named_parameters():
        p.requires_grad_(n in names)
    params = [p for n, p in m.named_parameters() if n in names]
    o = torch.optim.SGD(params, lr=opt["lr"], momentum=opt["momentum"]) if opt["name"] == "sgd" else \
        torch.optim.AdamW(params, lr=opt["lr"])
    losses = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(m(torch.from_numpy(x)), torch.from_numpy(y))
        o.zero_grad()
        loss.backward()
        o.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("opt", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_step_equals_pytorch_train_mode(tmp_path, opt):
    m, ref = model(), model()
    pockprop.compile(m, X, optimizer=opt, batchnorm="train").save(str(tmp_path))
    t = Trainer.load(str(tmp_path))
    stats = [e.name for e in t.manifest.state if e.role == StateRole.STATISTIC]
    assert stats == ["1.running_mean", "1.running_var", "4.running_mean", "4.running_var",
                     "9.running_mean", "9.running_var"]
    batches = _batches()
    want = _torch_steps(ref, opt, batches)
    got = [t.step(x, y) for x, y in batches]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    sd, full = ref.state_dict(), t.full_parameters()
    assert set(full) == {k for k in sd if not k.endswith("num_batches_tracked")}
    for k, v in full.items():
        np.testing.assert_allclose(v, sd[k].numpy(), rtol=1e-4, atol=1e-6, err_msg=k)
    ref.eval()
    x = _batches(1, 7)[0][0]
    np.testing.assert_allclose(t.predict(x), ref(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_statistics_update_below_a_frozen_layer(tmp_path):
    """Only the head trains, yet every batch norm normalizes with its batch and updates its statistics, as
    model.train() with the backbone's requires_grad off does."""
    m, ref = model(), model()
    pockprop.compile(m, X, optimizer=SGD, trainable="10.*", batchnorm="train").save(str(tmp_path))
    t = Trainer.load(str(tmp_path))
    batches = _batches()
    want = _torch_steps(ref, SGD, batches, trainable="10.")
    np.testing.assert_allclose([t.step(x, y) for x, y in batches], want, rtol=1e-5)
    sd = ref.state_dict()
    for k, v in t.full_parameters().items():
        np.testing.assert_allclose(v, sd[k].numpy(), rtol=1e-4, atol=1e-6, err_msg=k)
    assert [e.name for e in t.manifest.state if e.role == StateRole.PARAM] == ["10.weight", "10.bias"]


def test_frozen_is_the_default_and_unchanged(tmp_path):
    a = pockprop.compile(model(), X, optimizer=SGD)
    b = pockprop.compile(model(), X, optimizer=SGD, batchnorm="frozen")
    assert a.files()["train_step.onnx"] == b.files()["train_step.onnx"]
    assert not [s for s in a.state if s.role == StateRole.STATISTIC]


def test_refusals():
    with pytest.raises(CompileError, match="batchnorm must be one of"):
        pockprop.compile(model(), X, batchnorm="eval")
    m = model()
    m[1].momentum = None
    with pytest.raises(CompileError, match="momentum=None"):
        pockprop.compile(m, X, batchnorm="train")
    with pytest.raises(CompileError, match="more than one value per channel"):
        pockprop.compile(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval(), torch.zeros(1, 3), loss="mse",
                         batchnorm="train")


def test_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pockprop", "compile", "models:resnet18", "--input-shape", "2,3,16,16",
                        "--scheme", "bias-only", "--batchnorm", "train", "-o", str(tmp_path / "a")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    roles = [s["role"] for s in json.loads((tmp_path / "a" / "manifest.json").read_text())["state"]]
    assert roles.count("statistic") == 2 * 20  # ResNet-18's 20 batch norms


def test_a_scheme_carries_its_batchnorm_mode(tmp_path):
    """`batchnorm: train` in a scheme (what `pockprop search` writes) compiles as batchnorm="train"; an explicit
    batchnorm that contradicts it is refused, and so is a split model."""
    from pockprop.compiler.scheme import Scheme, scheme_from_dict
    from pockprop.compiler.split import compile_split
    from pockprop.search.options import scheme_dict

    d = {"name": "s", "rules": [{"match": "10", "update": "full"}, {"match": "1", "update": "bias"}],
         "batchnorm": "train"}
    scheme = scheme_from_dict(d)
    assert scheme.batchnorm == "train" and scheme_dict(scheme) == d
    a = pockprop.compile(model(), X, optimizer=SGD, scheme=scheme)
    b = pockprop.compile(model(), X, optimizer=SGD, scheme=scheme_from_dict(d | {"batchnorm": "frozen"}),
                         batchnorm="train")
    assert a.files()["train_step.onnx"] == b.files()["train_step.onnx"]
    assert [s for s in a.state if s.role == StateRole.STATISTIC]
    assert "batchnorm" not in scheme_dict(scheme_from_dict(d | {"batchnorm": "frozen"}))  # the default is not written
    with pytest.raises(CompileError, match="says batchnorm: train"):
        pockprop.compile(model(), X, optimizer=SGD, scheme=scheme, batchnorm="frozen")
    with pytest.raises(CompileError, match="batchnorm 'eval' is not one of"):
        Scheme("s", (), "eval")
    with pytest.raises(CompileError, match="split model"):
        compile_split(model(), X, ["3"], optimizer=SGD, scheme=scheme)
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nbatchnorm: train\nrules:\n- match: fc\n  update: full\n")
    r = subprocess.run([sys.executable, "-m", "pockprop", "compile", "models:resnet18", "--input-shape", "2,3,16,16",
                        "--scheme", str(path), "-o", str(tmp_path / "a")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    roles = [s["role"] for s in json.loads((tmp_path / "a" / "manifest.json").read_text())["state"]]
    assert roles.count("statistic") == 2 * 20  # the scheme file's mode, with no --batchnorm given
