"""The teacher_logits input of a kd artifact (teacher "logits") on the device: Trainer.step's keyword,
an .npz array beside the inputs for `fit` and `pockprop train`, checked like an input (shape, dtype;
NaN is an error, exit 2); the inference side never takes it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from pockprop.artifact.contract import TEACHER_LOGITS, Manifest
from pockprop.cli import main
from pockprop.compiler.compile import compile
from pockprop.errors import ArtifactError, DataError
from pockprop.runtime.loop import fit
from pockprop.runtime.trainer import Trainer

N, D, C = 4, 5, 3


@pytest.fixture(scope="module")
def kd_artifact(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, C))
    art = compile(model, (torch.randn(N, D),), loss="kd", kd={"teacher": "logits", "alpha": 0.5, "temperature": 2})
    return art.save(str(tmp_path_factory.mktemp("kd") / "art"))


def _batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N, D)).astype(np.float32), rng.integers(0, C, N),
            rng.standard_normal((N, C)).astype(np.float32))


def test_manifest_records_the_teacher_input(kd_artifact: str) -> None:
    m = Manifest.loads(Path(kd_artifact, "manifest.json").read_bytes(), "m")
    assert m.loss["name"] == "cross_entropy"
    assert m.loss["kd"] == {"alpha": 0.5, "temperature": 2.0, "teacher": "logits",
                            "input": {"name": TEACHER_LOGITS, "shape": [N, C], "dtype": "float32"}}
    assert [d.name for d in m.data] == ["input"]


def test_step_takes_teacher_logits_and_checks_them(kd_artifact: str) -> None:
    tr = Trainer.load(kd_artifact)
    x, y, zt = _batch()
    assert np.isfinite(tr.step(x, y, teacher_logits=zt))
    with pytest.raises(DataError, match="give teacher_logits of shape \\[4, 3\\]"):
        tr.step(x, y)
    with pytest.raises(DataError, match="teacher_logits: expected shape \\[4, 3\\]"):
        tr.step(x, y, teacher_logits=zt[:, :2])
    with pytest.raises(DataError, match="expected dtype float32"):
        tr.step(x, y, teacher_logits=zt.astype(np.int64))
    bad = zt.copy()
    bad[2, 1] = np.nan
    with pytest.raises(DataError, match="sample 2 holds NaN or Inf"):
        tr.step(x, y, teacher_logits=bad)
    assert tr.steps == 1
    assert tr.predict(x).shape == (N, C)  # inference takes the model's inputs only


def test_teacher_logits_refused_by_other_artifacts(tmp_path: Path) -> None:
    art = compile(nn.Linear(D, C), (torch.randn(N, D),)).save(str(tmp_path / "plain"))
    x, y, zt = _batch()
    with pytest.raises(DataError, match="takes none"):
        Trainer.load(art).step(x, y, teacher_logits=zt)


def test_dataset_with_teacher_logits_trains(kd_artifact: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((12, D)).astype(np.float32), rng.integers(0, C, 12)
    zt = rng.standard_normal((12, C)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=y, teacher_logits=zt)
    tr = Trainer.load(kd_artifact)
    record = fit(tr, tr.pipeline.load(str(tmp_path / "d.npz")), 2)
    assert tr.steps == 6 and record
    # the same batches by hand give the same state: the loop fed each batch its own teacher rows
    again = Trainer.load(kd_artifact)
    from pockprop.runtime.data import batch_indices, epoch_order
    for epoch in range(2):
        for idx in batch_indices(epoch_order(12, 0, 1, epoch), N):
            again.step(x[idx], y[idx], teacher_logits=zt[idx])
    for k, v in tr.state.items():
        np.testing.assert_array_equal(v, again.state[k], err_msg=k)
    assert set(tr.evaluate(str(tmp_path / "d.npz"))) >= {"loss", "accuracy"}  # eval ignores the teacher


def test_cli_train_without_or_with_bad_teacher_logits_exits_2(kd_artifact: str, tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((8, D)).astype(np.float32), rng.integers(0, C, 8)
    np.savez(tmp_path / "none.npz", x=x, y=y)
    assert main(["train", kd_artifact, "--data", str(tmp_path / "none.npz"), "--no-progress"]) == 2
    assert "array 'teacher_logits' of shape [N, 3]" in capsys.readouterr().err
    zt = rng.standard_normal((8, C)).astype(np.float32)
    zt[5, 0] = np.inf
    np.savez(tmp_path / "nan.npz", x=x, y=y, teacher_logits=zt)
    assert main(["train", kd_artifact, "--data", str(tmp_path / "nan.npz"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "nan.npz: teacher_logits: sample 5 holds NaN or Inf" in err[-1]
    np.savez(tmp_path / "ok.npz", x=x, y=y, teacher_logits=np.zeros((8, C), np.float32))
    assert main(["train", kd_artifact, "--data", str(tmp_path / "ok.npz"), "--no-progress"]) == 0


def test_manifest_kd_entry_is_validated(kd_artifact: str) -> None:
    import json

    doc = json.loads(Path(kd_artifact, "manifest.json").read_text())
    doc["loss"]["kd"]["input"]["name"] = "other"
    with pytest.raises(ArtifactError, match="kd input must be a float input named 'teacher_logits'"):
        Manifest.from_json(doc, "m")
    doc["loss"]["kd"] = {"alpha": 2, "temperature": 1, "teacher": "model"}
    with pytest.raises(ArtifactError, match="alpha must be in"):
        Manifest.from_json(doc, "m")
