"""Split compile (compiler/split.py) and the parts on the runtime (runtime/split.py): stepping the parts in
turn equals the unsplit step; what crosses a cut, and what each part trains and returns."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import pockprop
from pockprop.artifact.contract import INPUT_GRADIENT, OUTPUT_GRADIENT
from pockprop.compiler.split import compile_split, save_split
from pockprop.errors import ArtifactError, CompileError, DataError
from pockprop.models.resnet import resnet18
from pockprop.runtime.split import Part, SplitModel
from pockprop.runtime.trainer import Trainer

SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
ADAMW = {"name": "adamw", "lr": 1e-2}


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()


X = torch.randn(4, 3, 8, 8)


def _pair(tmp_path, model, example, split_at, **kw):
    save_split(compile_split(model, example, split_at, **kw), str(tmp_path / "split"))
    pockprop.compile(model, example, **kw).save(str(tmp_path / "whole"))
    return SplitModel.load(str(tmp_path / "split")), Trainer.load(str(tmp_path / "whole"))


def _same_training(split: SplitModel, whole: Trainer, batches, rtol=1e-5) -> None:
    for x, y in batches:
        np.testing.assert_allclose(split.step(x, y), whole.step(x, y), rtol=rtol)
    state = {}
    for p in split.parts:
        state |= p.trainer.state_dict()
    want = whole.state_dict()
    assert state.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(state[k], want[k], rtol=rtol, atol=1e-6, err_msg=k)


def _images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((4, 3, 8, 8)).astype(np.float32), rng.integers(0, 5, 4)) for _ in range(n)]


@pytest.mark.parametrize("optimizer", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_u_shaped_split_steps_like_the_whole_model(tmp_path, optimizer):
    split, whole = _pair(tmp_path, cnn(), X, ["2", "4"], optimizer=optimizer)
    assert [p.info.index for p in split.parts] == [0, 1, 2]
    assert split.parts[0].info.boundary_in is None and split.parts[2].info.has_labels
    assert [p.info.spec.input_gradient for p in split.parts] == [None, INPUT_GRADIENT, INPUT_GRADIENT]
    _same_training(split, whole, _images())
    x = _images(1, 5)[0][0]
    np.testing.assert_allclose(split.predict(x), whole.predict(x), rtol=1e-5, atol=1e-6)


def test_index_lists_holders_and_digests(tmp_path):
    save_split(compile_split(cnn(), X, ["2", "4"]), str(tmp_path))
    doc = json.loads((tmp_path / "split.json").read_text())
    assert [p["holder"] for p in doc["parts"]] == ["device", "server", "device"]  # labels stay on the device
    parts = [Part.load(str(tmp_path / p["path"])) for p in doc["parts"]]
    assert {p.info.split_id for p in parts} == {doc["id"]}
    assert [p.info.digest for p in parts] == [p["manifest_sha256"] for p in doc["parts"]]
    assert parts[1].trainer.manifest.loss["name"] == OUTPUT_GRADIENT
    assert parts[1].info.boundary_out.shape == (4, 6, 4, 4)


def test_a_frozen_bottom_part_has_no_backward(tmp_path):
    """Only the head trains: the part below passes no gradient down and trains nothing."""
    split, whole = _pair(tmp_path, cnn(), X, ["4"], optimizer=SGD, trainable="7.*")
    bottom, top = split.parts
    assert bottom.trainer.manifest.state == [] and top.info.spec.input_gradient is None
    _same_training(split, whole, _images())


def test_a_scheme_is_resolved_on_the_whole_model(tmp_path):
    model = resnet18(num_classes=5, width=8).eval()
    x = torch.randn(2, 3, 16, 16)
    split, whole = _pair(tmp_path, model, x, ["layer2"], optimizer=SGD, scheme="bias-only")
    names = [e.name for p in split.parts for e in p.trainer.manifest.state if e.role.value == "param"]
    assert names == [e.name for e in whole.manifest.state if e.role.value == "param"]
    rng = np.random.default_rng(1)
    _same_training(split, whole, [(rng.standard_normal((2, 3, 16, 16)).astype(np.float32), rng.integers(0, 5, 2))
                                  for _ in range(2)], rtol=1e-4)


def test_lora_and_prompt_apply_per_part(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 32, (2, 6))
    split, whole = _pair(tmp_path, model, {"input_ids": ids}, ["model.layers.0", "model.layers.1"], optimizer=ADAMW,
                         lora={"r": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]}, prompt={"tokens": 2, "init": "random"})
    first = [e.name for e in split.parts[0].trainer.manifest.state]
    assert "prompt.embeddings" in first and "model.layers.0.self_attn.q_proj.lora_A.weight" in first
    rng = np.random.default_rng(0)
    _same_training(split, whole, [({"input_ids": rng.integers(0, 32, (2, 6))}, rng.integers(0, 32, (2, 6)))
                                  for _ in range(3)], rtol=1e-4)


@pytest.mark.parametrize("cut, message", [
    (["layer1.0.conv1"], "tensors cross the cut"),  # inside a residual block
    (["nosuch"], "no such module"),
    (["layer2", "layer1"], "forward order"),
    (["fc"], "nothing of the model follows"),
    (["layer1", "layer2", "layer3"], "at most 2 cuts"),
])
def test_bad_cuts_are_refused(cut, message):
    with pytest.raises(CompileError, match=message):
        compile_split(resnet18(num_classes=5, width=8).eval(), torch.randn(1, 3, 16, 16), cut)


def test_kd_is_refused():
    with pytest.raises(CompileError, match="kd"):
        compile_split(cnn(), X, ["2"], loss="kd")


def test_part_checks_what_it_steps_on(tmp_path):
    save_split(compile_split(cnn(), X, ["2", "4"]), str(tmp_path))
    mid = Part.load(str(tmp_path / "part1"))
    a = np.zeros((4, 6, 8, 8), np.float32)
    with pytest.raises(DataError, match="gradient of its output"):
        mid.step(a, labels=np.zeros(4, np.int64))
    g = np.full((4, 6, 4, 4), np.nan, np.float32)
    before = mid.trainer.state_dict()
    with pytest.raises(DataError, match="NaN"):
        mid.step(a, grad_out=g)
    with pytest.raises(DataError, match="expected shape"):
        mid.step(a, grad_out=np.zeros((4, 6, 2, 2), np.float32))
    after = mid.trainer.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    with pytest.raises(ArtifactError, match="not one split model"):
        SplitModel([Part.load(str(tmp_path / "part1")), Part.load(str(tmp_path / "part0"))])


def test_index_and_parts_must_match(tmp_path):
    save_split(compile_split(cnn(), X, ["2"]), str(tmp_path / "a"))
    save_split(compile_split(cnn(), X, ["4"]), str(tmp_path / "b"))
    index = json.loads((tmp_path / "a" / "split.json").read_text())
    index["parts"][1] = json.loads((tmp_path / "b" / "split.json").read_text())["parts"][1] | {"path": "other"}
    os.rename(tmp_path / "b" / "part1", tmp_path / "a" / "other")
    (tmp_path / "a" / "split.json").write_text(json.dumps(index))
    with pytest.raises(ArtifactError, match="not one split model"):
        SplitModel.load(str(tmp_path / "a"))


def test_private_backprop_graphs_give_the_step(tmp_path):
    """vjp (gradients, no update) then apply equals the part's step; the vjp is linear in the output gradient."""
    for opt in (SGD, ADAMW):
        save_split(compile_split(cnn(), X, ["2", "4"], optimizer=opt, private=True), str(tmp_path / opt["name"]))
        save_split(compile_split(cnn(), X, ["2", "4"], optimizer=opt), str(tmp_path / ("plain" + opt["name"])))
        a, b = SplitModel.load(str(tmp_path / opt["name"])), SplitModel.load(str(tmp_path / ("plain" + opt["name"])))
        assert a.parts[1].info.spec.vjp and not a.parts[0].info.spec.vjp and not b.parts[1].info.spec.vjp
        for x, y in _images(2):
            b.step(x, y)
            acts = a.forward(x)
            g, _ = a.parts[2].step(acts[2], labels=y)
            ((gin, grads),) = a.parts[1].vjp(acts[1], [g])
            a.parts[1].apply(grads)
            a.parts[0].step(acts[0], grad_out=gin)
        for pa, pb in zip(a.parts, b.parts):
            sa, sb = pa.trainer.state_dict(), pb.trainer.state_dict()
            for k in sb:
                np.testing.assert_allclose(sa[k], sb[k], rtol=1e-5, atol=1e-7, err_msg=k)
    mid = a.parts[1]
    rng = np.random.default_rng(3)
    g1, g2 = (rng.standard_normal((4, 6, 4, 4)).astype(np.float32) for _ in range(2))
    (i1, p1), (i2, p2), (i3, p3) = mid.vjp(acts[1], [g1, g2, 2 * g1 - 3 * g2])
    np.testing.assert_allclose(i3, 2 * i1 - 3 * i2, rtol=1e-4, atol=1e-6)
    for k in p1:
        np.testing.assert_allclose(p3[k], 2 * p1[k] - 3 * p2[k], rtol=1e-4, atol=1e-6)
    before = mid.trainer.state_dict()
    with pytest.raises(DataError, match="one gradient per trained tensor"):
        mid.apply({})
    with pytest.raises(DataError, match="finite"):
        mid.apply({k: np.full_like(v, np.inf) for k, v in p1.items()})
    assert all(np.array_equal(before[k], v) for k, v in mid.trainer.state_dict().items())
    with pytest.raises(ArtifactError, match="no gradient graphs"):
        b.parts[1].vjp(acts[1], [g1])


def test_cli_compiles_a_split(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "s"
    r = subprocess.run([sys.executable, "-m", "pockprop", "compile", "models:resnet18", "--input-shape", "1,3,16,16",
                        "--split-at", "layer2", "--split-at", "layer3", "--scheme", "bias-only", "--private-backprop",
                        "-o", str(out)], capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                            os.path.dirname(os.path.abspath(__file__)))))
    assert r.returncode == 0, r.stderr
    assert "part1 (server)" in r.stdout and "returns its input gradient" in r.stdout
    assert Part.load(str(out / "part1")).info.spec.vjp == "vjp.onnx"
    r = subprocess.run([sys.executable, "-m", "pockprop", "compile", "models:resnet18", "--input-shape", "1,3,16,16",
                        "--split-at", "layer1.0.conv1", "-o", str(tmp_path / "t")], capture_output=True, text=True)
    assert r.returncode == 2 and "tensors cross the cut" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "t").exists()
