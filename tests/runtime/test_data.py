"""Device data: .npz / CSV / image folders, manifest preprocessing, batching policy, clear errors."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from pockprop.artifact.contract import TensorSpec
from pockprop.runtime import data
from pockprop.errors import DataError
from pockprop.runtime.loop import fit
from pockprop.runtime.trainer import Trainer

CNN_SPEC = TensorSpec("input", (4, 3, 8, 8), "float32",
                      {"resize": [8, 8], "scale": 1 / 255, "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]})
LABELS = TensorSpec("labels", (4,), "int64")


def _pipe(spec: TensorSpec = CNN_SPEC) -> data.Pipeline:
    return data.Pipeline(spec, LABELS, 3)


def _reference(chw: np.ndarray) -> np.ndarray:
    mean = np.array([0.5, 0.4, 0.3], np.float32)[:, None, None]
    std = np.array([0.25, 0.2, 0.3], np.float32)[:, None, None]
    return ((chw.astype(np.float32) * np.float32(1 / 255)) - mean) / std


def test_npz_and_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "ok.npz", x=np.zeros((5, 6), np.float32), y=np.arange(5) % 3)
    ds = data.load(str(tmp_path / "ok.npz"))
    assert ds.x.shape == (5, 6) and ds.y.tolist() == [0, 1, 2, 0, 1]
    np.savez(tmp_path / "nox.npz", features=np.zeros(3))
    with pytest.raises(DataError, match=r"nox.npz: expected an array named 'x'.*found \['features'\]"):
        data.load(str(tmp_path / "nox.npz"))
    np.savez(tmp_path / "pickled.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="pickled.npz: cannot read"):
        data.load(str(tmp_path / "pickled.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz: cannot read"):
        data.load(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "short.npz", x=np.zeros((5, 6)), y=np.zeros(4))
    with pytest.raises(DataError, match="5 samples in x but 4 labels"):
        data.load(str(tmp_path / "short.npz"))
    with pytest.raises(DataError, match="unknown data format '.txt'"):
        (tmp_path / "a.txt").write_text("1")
        data.load(str(tmp_path / "a.txt"))


def test_csv_must_be_utf8_and_may_start_with_a_bom(tmp_path: Path) -> None:
    (tmp_path / "latin1.csv").write_bytes("größe,label\n1,0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv: not UTF-8 text \(byte b'\\xf6' at offset 2\); save the CSV as UTF-8"):
        data.load(str(tmp_path / "latin1.csv"))
    (tmp_path / "excel.csv").write_bytes("\ufefflabel,a\n1,2\n0,3\n".encode("utf-8"))
    assert data.load(str(tmp_path / "excel.csv")).y.tolist() == [1, 0]  # the header is found behind the mark


def test_csv_with_and_without_header(tmp_path: Path) -> None:
    (tmp_path / "h.csv").write_text("a,label,b\n1,2,3\n4,0,6.5\n\n")
    ds = data.load(str(tmp_path / "h.csv"))
    assert ds.x.tolist() == [[1, 3], [4, 6.5]] and ds.y.tolist() == [2, 0] and ds.x.dtype == np.float32
    ds = data.load(str(tmp_path / "h.csv"), label_column="b")
    assert ds.y.tolist() == [3, 6.5]
    (tmp_path / "n.csv").write_text("1,2,0\n3,4,1\n")
    assert data.load(str(tmp_path / "n.csv")).y.tolist() == [0, 1]
    (tmp_path / "bad.csv").write_text("a,label\n1,2\n3,x\n")
    with pytest.raises(DataError, match="bad.csv line 3, column 'label': 'x' is not a number"):
        data.load(str(tmp_path / "bad.csv"))
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    with pytest.raises(DataError, match="ragged.csv line 2: 1 fields, expected 2"):
        data.load(str(tmp_path / "ragged.csv"))
    with pytest.raises(DataError, match="no column named 'z'"):
        data.load(str(tmp_path / "h.csv"), label_column="z")


def test_image_folder(tmp_path: Path) -> None:
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    pixels = {}
    for cls, n in (("cat", 2), ("dog", 3)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
            pixels[(cls, i)] = arr
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("ignored")
    ds = data.load(str(tmp_path / "imgs"), channels=3, size=(8, 8))
    assert ds.classes == ["cat", "dog"] and ds.y.tolist() == [0, 0, 1, 1, 1] and ds.x.shape == (5, 3, 8, 8)
    np.testing.assert_allclose(ds.x[2], data.resize(pixels[("dog", 0)].transpose(2, 0, 1)[None], (8, 8))[0],
                               atol=1)  # Pillow resizes 8-bit images in 8 bits (tests/runtime/test_photos.py)
    x = ds.x[:]
    model_in = _pipe().inputs(x)
    np.testing.assert_allclose(model_in, _reference(x), rtol=1e-6)
    with pytest.raises(DataError, match=r"z.png: 10x12 pixels \(WxH\), the first image was 12x10"):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "cat" / "z.png")
        data.load(str(tmp_path / "imgs"))
    (tmp_path / "imgs" / "cat" / "broken.png").write_bytes(b"\x89PNG nope")
    with pytest.raises(DataError, match="broken.png: cannot decode image"):
        data.load(str(tmp_path / "imgs"), size=(8, 8))


def test_resize_matches_torch_bilinear() -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 10)).astype(np.float32)
    for size in [(14, 20), (4, 5), (7, 3)]:
        want = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=False)
        np.testing.assert_allclose(data.resize(x, size), want.numpy(), rtol=1e-5, atol=1e-5)


def test_pipeline_layouts_and_errors() -> None:
    p = _pipe()
    rng = np.random.default_rng(0)
    chw = rng.integers(0, 256, (2, 3, 8, 8)).astype(np.uint8)
    np.testing.assert_allclose(p.inputs(chw), _reference(chw), rtol=1e-6)
    np.testing.assert_allclose(p.inputs(chw.transpose(0, 2, 3, 1)), _reference(chw), rtol=1e-6)  # HWC
    gray = rng.integers(0, 256, (2, 8, 8)).astype(np.uint8)
    np.testing.assert_allclose(p.inputs(gray), _reference(np.repeat(gray[:, None], 3, 1)), rtol=1e-6)
    big = rng.integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    assert p.inputs(big).shape == (2, 3, 8, 8)
    no_resize = _pipe(dataclasses.replace(CNN_SPEC, preprocess=None))
    with pytest.raises(DataError, match="samples are 16x16 \\(HxW\\), the model expects 8x8 and its manifest has no resize"):
        no_resize.inputs(big, "big.npz")
    with pytest.raises(DataError, match="samples have 2 channels, the model expects 3"):
        p.inputs(np.zeros((1, 2, 8, 8)))
    flat = data.Pipeline(TensorSpec("x", (4, 6), "float32"), LABELS, 3)
    with pytest.raises(DataError, match=r"d.csv: samples of shape \(5,\); the model expects \(6,\) \(input \[4, 6\]\)"):
        flat.inputs(np.zeros((3, 5)), "d.csv")
    with pytest.raises(DataError, match="label 3 at sample 1 is outside 0..2"):
        flat.labels(np.array([0, 3, 1]), "d.csv")
    with pytest.raises(DataError, match="labels must be whole class indices; sample 1 has 0.5"):
        flat.labels(np.array([1.0, 0.5]), "d.csv")
    assert flat.labels(np.array([1.0, 2.0])).dtype == np.int64
    with pytest.raises(DataError, match="no labels"):
        flat.labels(None, "x.npz")


def test_batching_policy() -> None:
    order = data.epoch_order(10, seed=1, round_=1, epoch=0)
    assert sorted(order) == list(range(10))
    assert (order == data.epoch_order(10, 1, 1, 0)).all() and not (order == data.epoch_order(10, 1, 1, 1)).all()
    drop = data.batch_indices(order, 4, "drop")
    assert [len(b) for b in drop] == [4, 4] and np.concatenate(drop).tolist() == order[:8].tolist()
    wrap = data.batch_indices(order, 4, "wrap")
    assert len(wrap) == 3 and wrap[2].tolist() == order[8:].tolist() + order[:2].tolist()
    with pytest.raises(DataError, match="3 samples make no full batch of 4"):
        data.batch_indices(np.arange(3), 4, "drop")
    assert data.batch_indices(np.arange(3), 4, "wrap")[0].tolist() == [0, 1, 2, 0]
    padded = list(data.padded_batches(np.arange(10), 4))
    assert [r for _, r in padded] == [4, 4, 2] and padded[-1][0].tolist() == [8, 9, 9, 9]


def test_raw_images_train_through_the_manifest_preprocessing(artifact, tmp_path: Path) -> None:
    trainer = Trainer.load(str(artifact("cnn")))
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (12, 8, 8, 3)).astype(np.uint8)  # HWC bytes, as a camera gives them
    y = rng.integers(0, 3, 12)
    ds = data.Dataset(raw, y, "cam.npz")
    ready = _reference(raw.transpose(0, 3, 1, 2))
    assert trainer.evaluate(ds) == trainer.evaluate(ready, y)
    record = fit(trainer, ds, 2)
    assert record["steps"] == 6 and record["rejected"] == 0


def test_nan_samples_are_rejected_steps(artifact) -> None:
    trainer = Trainer.load(str(artifact()))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 6)).astype(np.float32)
    x[5, 1] = np.nan
    record = fit(trainer, data.Dataset(x, rng.integers(0, 3, 16)), 2)
    assert record["rejected"] == 2 and record["steps"] == 6 and trainer.rejected == 2
    assert all(np.isfinite(v).all() for v in trainer.state.values())


def test_wrong_data_for_the_model_fails_before_training(artifact) -> None:
    trainer = Trainer.load(str(artifact()))
    before = trainer.state
    with pytest.raises(DataError, match=r"big.npz: samples of shape \(7,\); the model expects \(6,\)"):
        fit(trainer, data.Dataset(np.zeros((8, 7), np.float32), np.zeros(8), "big.npz"), 1)
    with pytest.raises(DataError, match="labels.npz: label 5 at sample 0 is outside 0..2"):
        fit(trainer, data.Dataset(np.zeros((8, 6), np.float32), np.full(8, 5), "labels.npz"), 1)
    with pytest.raises(DataError, match="strings.npz: samples of dtype <U1; expected numbers"):
        fit(trainer, data.Dataset(np.full((8, 6), "a"), np.zeros(8), "strings.npz"), 1)
    assert trainer.steps == 0
    for k, v in before.items():
        np.testing.assert_array_equal(trainer.state[k], v)
