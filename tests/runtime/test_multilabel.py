"""Multi-label end to end: pos_weight in the compiled step, multi-hot data formats (npz, CSV label columns,
image folder + labels.csv), bad data refused in one line, and the metrics against sklearn."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pockprop.cli import main
from pockprop.errors import DataError
from pockprop.runtime import data, multilabel
from pockprop.runtime.trainer import Trainer
from tests.runtime.conftest import tags_data


@pytest.mark.parametrize("seed", range(4))
def test_metrics_match_sklearn(seed: int) -> None:
    metrics_ = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n, labels = 37, 5
    t = (rng.random((n, labels)) < [0.1, 0.3, 0.5, 0.7, 0.02]).astype(np.float32)
    t[0] = 1  # every label has a positive
    z = rng.standard_normal((n, labels)) * 2 + t
    if seed % 2:
        z = np.round(z)  # ties: AP is computed over distinct thresholds
    threshold = [0.5, 0.3, 0.7, 0.5][seed]
    m = multilabel.metrics(z, t, threshold)
    pred = 1 / (1 + np.exp(-z)) >= threshold
    ap = [metrics_.average_precision_score(t[:, j], z[:, j]) for j in range(labels)]
    assert m["mAP"] == pytest.approx(np.mean(ap), abs=1e-12) and m["map_labels"] == labels
    assert m["micro_f1"] == pytest.approx(metrics_.f1_score(t, pred, average="micro", zero_division=0), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(metrics_.f1_score(t, pred, average="macro", zero_division=0), abs=1e-12)
    want = [metrics_.accuracy_score(t[:, j], pred[:, j]) for j in range(labels)]
    np.testing.assert_allclose(m["label_accuracy"], want, atol=1e-12)
    assert m["accuracy"] == pytest.approx(np.mean(want))


def test_metrics_edges() -> None:
    t = np.array([[0, 1], [0, 0], [0, 1]], np.float32)  # label 0 has no positive: no AP, F1 0
    m = multilabel.metrics(np.array([[-1.0, 2.0], [3.0, -2.0], [-1.0, 0.5]]), t)
    assert m["map_labels"] == 1 and m["mAP"] == 1.0 and m["label_accuracy"] == [2 / 3, 1.0]
    assert m["macro_f1"] == pytest.approx(0.5) and m["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1))
    one = multilabel.metrics(np.array([[5.0]]), np.array([[1.0]]))
    assert one["mAP"] == 1.0 and one["micro_f1"] == 1.0
    with pytest.raises(DataError, match="threshold"):
        multilabel.metrics(np.zeros((2, 2)), np.zeros((2, 2)), 1.0)


def test_pos_weight_is_compiled_and_evaluated(artifact) -> None:
    """The manifest records pos_weight; a step's loss and the runtime's evaluation both equal torch's
    BCEWithLogitsLoss(pos_weight) on the same weights."""
    torch = pytest.importorskip("torch")
    art = artifact("tags")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["loss"] == {"name": "bce_with_logits", "pos_weight": [1.0, 2.0, 0.5]}
    trainer = Trainer.load(str(art))
    x, y = tags_data(4, seed=3)
    z = torch.from_numpy(trainer.predict(x))
    ref = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 2.0, 0.5]))(z, torch.from_numpy(y)).item()
    assert trainer.evaluate(x, y)["loss"] == pytest.approx(ref, rel=1e-5)
    assert trainer.step(x, y) == pytest.approx(ref, rel=1e-5)


def test_pos_weight_refused_where_it_does_not_apply() -> None:
    torch = pytest.importorskip("torch")
    from pockprop.compiler.compile import compile
    from pockprop.errors import CompileError

    with pytest.raises(CompileError, match="bce_with_logits only"):
        compile(torch.nn.Linear(6, 3), (torch.randn(4, 6),), pos_weight=2.0)
    with pytest.raises(CompileError, match="2 values; the output has 3 labels"):
        compile(torch.nn.Linear(6, 3), (torch.randn(4, 6),), labels=torch.zeros(4, 3), loss="bce_with_logits",
                pos_weight=[1.0, 2.0])


def _csv(path: Path, x: np.ndarray, y: np.ndarray, names: list[str]) -> Path:
    header = [f"f{i}" for i in range(x.shape[1])] + names
    rows = [",".join(header)] + [",".join(f"{v:g}" for v in list(a) + list(b)) for a, b in zip(x, y)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_csv_label_columns(tmp_path: Path) -> None:
    x, y = tags_data(6)
    path = _csv(tmp_path / "t.csv", x, y, ["tag_a", "tag_b", "tag_c"])
    for spec in ("tag_a,tag_b,tag_c", "tag_*", "tag_c,tag_a,tag_b"):  # file order, whatever the spec's
        ds = data.load(str(path), label_columns=spec)
        assert ds.classes == ["tag_a", "tag_b", "tag_c"] and ds.x.shape == (6, 6)
        np.testing.assert_array_equal(ds.y, y)
    with pytest.raises(DataError, match="no column matches 'tag_z'"):
        data.load(str(path), label_columns="tag_a,tag_z")
    y_bad = y.copy()
    y_bad[4, 1] = 2
    with pytest.raises(DataError, match=r"must be 0 or 1; sample 4, label 'tag_b' has 2\.0"):
        data.load(str(_csv(tmp_path / "b.csv", x, y_bad, ["tag_a", "tag_b", "tag_c"])), label_columns="tag_*")
    y_bad[4, 1] = np.nan
    with pytest.raises(DataError, match="sample 4, label 'tag_b' has nan"):
        data.load(str(_csv(tmp_path / "n.csv", x, y_bad, ["tag_a", "tag_b", "tag_c"])), label_columns="tag_*")


def test_image_folder_with_labels_csv(tmp_path: Path) -> None:
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["a.png", "sub/b.png", "c.png"]
    for n in names:
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / n)
    (root / "labels.csv").write_text("file,cat,dog\na.png,1,0\nsub/b.png,1,1\nc.png,0,0\n")
    ds = data.load(str(root), size=(8, 8))
    assert ds.classes == ["cat", "dog"] and len(ds) == 3 and ds.x[:3].shape == (3, 3, 8, 8)
    np.testing.assert_array_equal(ds.y, [[1, 0], [1, 1], [0, 0]])
    (root / "labels.csv").write_text("file,cat,dog\na.png,1,0\nmissing.png,1,1\n")
    with pytest.raises(DataError, match="line 3: 'missing.png' is not an image file"):
        data.load(str(root))
    (root / "labels.csv").write_text("file,cat,dog\na.png,1,0.5\n")
    with pytest.raises(DataError, match="must be 0 or 1; sample 0, label 'dog' has 0.5"):
        data.load(str(root))


def test_cli_multilabel_train_eval_and_bad_data(artifact, tmp_path: Path, capsys) -> None:
    art, ck = str(artifact("tags")), str(tmp_path / "ck")
    x, y = tags_data(40)
    csv_path = _csv(tmp_path / "t.csv", x, y, ["pos0", "pos1", "pos2"])
    assert main(["train", art, "--data", str(csv_path), "--label-columns", "pos*", "--epochs", "3",
                 "--checkpoint-dir", ck]) == 0
    capsys.readouterr()
    assert main(["eval", art, "--data", str(csv_path), "--label-columns", "pos*", "--checkpoint-dir", ck,
                 "--threshold", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "mAP" in out and "F1 at 0.4: micro" in out and "pos2" in out
    assert main(["eval", art, "--data", str(csv_path), "--label-columns", "pos*", "--checkpoint-dir", ck,
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["mAP"] > 0.8 and len(doc["label_accuracy"]) == 3 and doc["threshold"] == 0.5
    before = (tmp_path / "ck" / "checkpoint.safetensors").read_bytes()
    np.savez(tmp_path / "two.npz", x=x, y=y[:, :2])  # the artifact has 3 labels
    np.savez(tmp_path / "nan.npz", x=x, y=np.where(np.arange(40)[:, None] == 7, np.nan, y))
    for bad, says in [(["--data", str(tmp_path / "two.npz")], "expected (3,) (3 labels per sample"),
                      (["--data", str(tmp_path / "nan.npz")], "label NaN at sample 7"),
                      (["--data", str(csv_path), "--label-columns", "pos0,pos1"], "samples of shape (7,)")]:
        assert main(["train", art, *bad, "--checkpoint-dir", ck, "--resume"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and says in errors[0], errors
    assert (tmp_path / "ck" / "checkpoint.safetensors").read_bytes() == before
