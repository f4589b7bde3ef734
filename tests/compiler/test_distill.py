"""loss="kd": three steps through the device runtime against PyTorch's distillation loss, both teachers
(a frozen copy of the model compiled into the step, or logits fed with each batch), single-label,
per-token and multi-label; the teacher copy shares the student's frozen weights and gets no gradient."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pockprop.compiler.compile import compile
from pockprop.errors import CompileError
from pockprop.ir import Phase
from pockprop.runtime.trainer import Trainer
from tests.compiler.torch_ref import trained_masks
from tests.compiler.zoo_cases import torch_optimizer
from tests.ops.test_distill import sigmoid_kd, softmax_kd

N, D, C = 5, 6, 4


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, C))


class _Tagger(nn.Module):
    """Per-token logits (N, T, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(D, 8), nn.Linear(8, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def _tagger() -> nn.Module:
    torch.manual_seed(1)
    return _Tagger()


def _kd_loss(z: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, task: str, alpha: float, t: float) -> torch.Tensor:
    if task == "cross_entropy":
        ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))
        return alpha * ce + (1 - alpha) * softmax_kd(z, zt, y, t)
    return alpha * F.binary_cross_entropy_with_logits(z, y) + (1 - alpha) * sigmoid_kd(z, zt, t)


def _batches(task: str, shape: tuple[int, ...], steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    out = []
    for step in range(steps):
        x = torch.randn(*shape[:-1], D, generator=gen)
        if task == "cross_entropy":
            y = torch.randint(0, C, shape[:-1], generator=gen)
            y.view(-1)[step] = -100  # one ignored row per batch, counted in neither term
        else:
            y = (torch.rand(shape, generator=gen) > 0.5).float()
        out.append((x, y))
    return out


def _compare(build, task: str, teacher: str, shape: tuple[int, ...], optimizer: dict, tmp_path, alpha: float = 0.3,
             temperature: float = 2.0, **compile_kw) -> None:
    batches = _batches(task, shape)
    kd = {"task": task, "alpha": alpha, "temperature": temperature, "teacher": teacher}
    art = compile(build(), (batches[0][0],), labels=batches[0][1], loss="kd", kd=kd, optimizer=optimizer, **compile_kw)
    trainer = Trainer.load(art.save(str(tmp_path / "art")), threads=1)

    ref = build()
    frozen_teacher = copy.deepcopy(ref).eval()  # the original model, or whoever made the fed logits
    gen = torch.Generator().manual_seed(2)
    params = dict(ref.named_parameters())
    masks = trained_masks(art, params)  # a sliced parameter trains its slice only
    trained = list(masks)
    for n, p in params.items():
        p.requires_grad_(n in trained)
    opt = torch_optimizer(optimizer, [params[n] for n in trained])
    for x, y in batches:
        with torch.no_grad():
            zt = frozen_teacher(x) if teacher == "model" else torch.randn(*shape, generator=gen) * 2
        got = trainer.step(x.numpy(), y.numpy(), teacher_logits=zt.numpy() if teacher == "logits" else None)
        opt.zero_grad()
        loss = _kd_loss(ref(x), zt, y, task, alpha, temperature)
        loss.backward()
        for n, m in masks.items():
            params[n].grad *= m
        opt.step()
        np.testing.assert_allclose(got, loss.item(), rtol=1e-4, atol=1e-6)
    for n, value in trainer.full_parameters().items():
        np.testing.assert_allclose(value, params[n].detach().numpy(), rtol=1e-4, atol=1e-6, err_msg=n)


SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
ADAMW = {"name": "adamw", "lr": 1e-2, "eps": 1e-6}


@pytest.mark.parametrize("teacher", ["model", "logits"])
def test_single_label_kd_steps_match_torch(teacher: str, tmp_path) -> None:
    _compare(_mlp, "cross_entropy", teacher, (N, C), SGD, tmp_path, trainable="2.*,4.*")


# alpha 0 with the model as teacher is not compared: the student starts as the teacher, so its gradient is
# rounding noise, which AdamW scales up to full steps in both frameworks alike, but not to the same noise
@pytest.mark.parametrize("teacher,alpha", [("model", 0.5), ("logits", 0.0)])
def test_per_token_kd_steps_match_torch(teacher: str, alpha: float, tmp_path) -> None:
    _compare(_tagger, "cross_entropy", teacher, (3, 4, C), ADAMW, tmp_path, alpha=alpha, temperature=1.0)


@pytest.mark.parametrize("teacher", ["model", "logits"])
def test_multi_label_kd_steps_match_torch(teacher: str, tmp_path) -> None:
    _compare(_mlp, "bce_with_logits", teacher, (N, C), ADAMW, tmp_path, alpha=0.6, temperature=3.0)


def test_sliced_scheme_teacher_reads_the_original_slice(tmp_path) -> None:
    scheme = {"name": "slices", "rules": [{"match": "2", "update": "weight", "ratio": 0.5, "bias": True},
                                          {"match": "4", "update": "full"}]}
    _compare(_mlp, "cross_entropy", "model", (N, C), SGD, tmp_path, alpha=1.0, scheme=scheme)
    _compare(_mlp, "cross_entropy", "model", (N, C), SGD, tmp_path / "b", alpha=0.2, scheme=scheme)


def _initializer_bytes(art) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in art.train_model.graph.initializer)


def test_teacher_copy_shares_frozen_weights_and_has_no_backward() -> None:
    x = torch.randn(N, D)
    plain = compile(_mlp(), (x,), trainable="4.*")
    logits = compile(_mlp(), (x,), trainable="4.*", loss="kd", kd={"teacher": "logits"})
    model = compile(_mlp(), (x,), trainable="4.*", loss="kd", kd={"teacher": "model"})
    frozen = sum(p.numel() for n, p in _mlp().named_parameters() if not n.startswith("4.")) * 4
    originals = sum(p.numel() for n, p in _mlp().named_parameters() if n.startswith("4.")) * 4
    assert frozen > 2 * originals
    extra = _initializer_bytes(model) - _initializer_bytes(plain)
    assert originals <= extra < originals + 256, extra  # the trained tensors' originals and a few scalars
    g = model.train_graph
    teacher_nodes = [n for n in g.nodes if n.module.startswith("teacher")]
    assert teacher_nodes and all(n.phase == Phase.FORWARD for n in teacher_nodes)
    assert {n.module for n in teacher_nodes} == {"teacher.4"}  # the frozen layers' activations are shared
    backward = lambda art: sorted(n.op for n in art.train_graph.nodes if n.phase == Phase.BACKWARD)  # noqa: E731
    assert backward(model) == backward(logits)
    assert [i.name for i in model.infer_model.graph.input] == [i.name for i in plain.infer_model.graph.input]
    assert "teacher_logits" not in [i.name for i in logits.infer_model.graph.input]


@pytest.mark.parametrize("kd,loss,match", [
    ({"alpha": 1.5}, "kd", "alpha must be in"),
    ({"temperature": 0}, "kd", "temperature must be > 0"),
    ({"temperature": "hot"}, "kd", "must be a number"),
    ({"teacher": "oracle"}, "kd", "teacher 'oracle'"),
    ({"task": "mse"}, "kd", "task 'mse'"),
    ({"beta": 1}, "kd", "unknown key 'beta'"),
    ({"alpha": 0.5}, "cross_entropy", "apply to loss='kd'"),
    ("alpha", "kd", "key=value"),
])
def test_bad_kd_settings_are_one_line_errors(kd, loss, match) -> None:
    with pytest.raises(CompileError, match=match):
        compile(_mlp(), (torch.randn(N, D),), loss=loss, kd=kd)


def test_cli_compiles_kd_and_refuses_bad_values(tmp_path, capsys) -> None:
    from pockprop.cli import main

    out = tmp_path / "kd"
    assert main(["compile", "models:mlp", "--input-shape", "4,64", "--loss", "kd", "--kd",
                 "alpha=0.25,temperature=3,teacher=logits,task=cross_entropy", "-o", str(out)]) == 0
    loss = json.loads((out / "manifest.json").read_text())["loss"]
    assert loss["kd"]["alpha"] == 0.25 and loss["kd"]["input"]["shape"] == [4, 10]
    capsys.readouterr()
    assert main(["compile", "models:mlp", "--input-shape", "4,64", "--loss", "kd", "--kd", "teacher=nobody",
                 "-o", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "pockprop compile: error: kd: teacher 'nobody' is not one of logits, model"
    assert not (tmp_path / "bad").exists()
