"""experiments/multilabel.py: the mosaics' labels are the digits they show, and a tiny run goes through
pre-training, compiling and continual rounds on the device runtime end to end (the documented run is in
docs/accuracy.md)."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np

from experiments.multilabel import QUICK, _digit_images, markdown, mosaics, plot, run


def test_mosaic_labels_are_the_digits_shown():
    x, y = mosaics(20, "test", False, seed=3)
    images, classes = _digit_images("test", False)
    assert x.shape == (20, 1, 16, 16) and y.shape == (20, 10) and set(np.unique(y)) <= {0.0, 1.0}
    assert ((y.sum(1) >= 1) & (y.sum(1) <= 4)).all()
    top_left = (x[:, 0, :8, :8] * 0.5 + 0.5)  # undo the normalisation: tile 0 is one digit image
    for i in range(20):
        match = np.flatnonzero(np.abs(images - top_left[i]).reshape(len(images), -1).max(1) < 1e-6)
        assert len(match) and y[i, classes[match[0]]] == 1
    drifted, _ = mosaics(20, "test", True, seed=3)
    assert drifted.min() >= -1 + 2 * 0.3 - 1e-6  # grey paper: nothing darker than the offset


def test_tiny_run_end_to_end(tmp_path):
    cfg = replace(QUICK, lrs=(("full", 0.02), ("first-conv+biases", 0.05)))
    r = run(cfg, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == r["rows"]
    assert [(row["scheme"], row["replay"], row["kd"]) for row in r["rows"]] == list(QUICK.variants)
    for row in r["rows"]:
        (one,) = row["runs"]
        assert [c["round"] for c in one["curve"]] == [1, 2] and all(c["rejected"] == 0 for c in one["curve"])
        assert all(0 < c["new"] <= 1 and 0 < c["old"] <= 1 for c in one["curve"])
    assert r["rows"][0]["percent"] == 100.0 and 0 < r["rows"][2]["percent"] < 100.0
    assert r["rows"][4]["trainable"] == r["rows"][2]["trainable"]  # the kd artifact trains the same weights
    text = markdown(r)
    assert "| full (lr 0.02) |" in text and "old task" in text
    plot(r, str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").stat().st_size > 1000
