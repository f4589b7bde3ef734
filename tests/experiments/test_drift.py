"""The drift tasks (experiments/drift.py) have their documented properties, and experiments.accuracy runs end to end."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pockprop.models.data import _load_raw, _split_indices
from experiments.drift import PERMUTATION, TASKS, make_task, relabel, to_model_input, upsample

R = 16  # a small resolution keeps these tests fast; the tasks are defined the same at any size


@pytest.fixture(scope="module")
def tasks():
    return {name: make_task(name, resolution=R, channels=3, seed=0) for name in TASKS}


def _clean(index: np.ndarray) -> np.ndarray:
    images, _ = _load_raw()
    return to_model_input(upsample(images[index], R), R, 3)


@pytest.mark.parametrize("name", TASKS)
def test_shapes_dtypes_and_range(tasks, name):
    t = tasks[name]
    for split in (t.source, t.target, t.test):
        assert split.x.dtype == np.float32 and split.x.shape == (len(split), 3, R, R)
        assert split.y.dtype == np.int64 and split.y.shape == (len(split),)
        assert split.x.min() >= -1.0 and split.x.max() <= 1.0
        assert set(np.unique(split.y)) == set(range(10))  # every class in every split
    assert len(t.source) > 300 and len(t.target) > 300 and len(t.test) > 100


@pytest.mark.parametrize("name", TASKS)
def test_no_image_in_two_splits(tasks, name):
    t = tasks[name]
    train, test = _split_indices(0, 0.2)
    s, g, e = set(t.source.index), set(t.target.index), set(t.test.index)
    assert not (s & g) and not (s & e) and not (g & e)
    assert s | g <= set(train) and e <= set(test)  # pre-training and fine-tuning from train, test from test
    images, _ = _load_raw()  # and no identical picture either (the digits set has no duplicates)
    source_pixels = {images[i].tobytes() for i in t.source.index}
    assert not any(images[i].tobytes() in source_pixels for i in t.test.index)


def test_input_drift_inverts_and_adds_noise_labels_unchanged(tasks):
    t = tasks["input"]
    _, labels = _load_raw()
    assert np.array_equal(t.target.y, labels[t.target.index]) and np.array_equal(t.test.y, labels[t.test.index])
    assert np.array_equal(t.source.x, _clean(t.source.index))  # the source is clean
    clean = _clean(t.test.index)
    # inverted: strongly anti-correlated with the clean image; noisy: not exactly its negative
    corr = np.corrcoef(clean.ravel(), t.test.x.ravel())[0, 1]
    assert corr < -0.7
    assert np.abs(t.test.x + clean).mean() > 0.05


def test_input_drift_seed_changes_fine_tuning_noise_only():
    a, b, a2 = (make_task("input", R, 3, seed=s) for s in (0, 1, 0))
    assert np.array_equal(a.target.x, a2.target.x)  # deterministic given the seed
    assert not np.array_equal(a.target.x, b.target.x)  # another seed: other noise draws ...
    assert np.array_equal(a.target.index, b.target.index)  # ... on the same images
    assert np.array_equal(a.test.x, b.test.x) and np.array_equal(a.source.x, b.source.x)  # test fixed


def test_feature_drift_is_a_style_split_with_labels_unchanged(tasks):
    t = tasks["feature"]
    _, labels = _load_raw()
    for split in (t.source, t.target, t.test):
        assert np.array_equal(split.y, labels[split.index])
        assert np.array_equal(split.x, _clean(split.index))  # no pixel transform: the images are real
    train, _ = _split_indices(0, 0.2)
    assert len(t.source) + len(t.target) == len(train)  # every train image is in one style
    # the styles differ in the picture: per class, the source and target mean images are apart
    gap = [np.abs(t.source.x[t.source.y == c].mean(0) - t.target.x[t.target.y == c].mean(0)).mean() for c in range(10)]
    assert min(gap) > 0.05
    assert make_task("feature", R, 3, seed=1).target.index.tolist() == t.target.index.tolist()  # seed-free


def test_output_drift_permutes_labels_only(tasks):
    t = tasks["output"]
    _, labels = _load_raw()
    assert sorted(PERMUTATION) == list(range(10)) and all(PERMUTATION[c] != c for c in range(10))
    assert np.array_equal(t.target.y, relabel(labels[t.target.index]))
    assert np.array_equal(t.test.y, PERMUTATION[labels[t.test.index]])
    assert np.array_equal(t.source.y, labels[t.source.index])  # pre-training sees the true labels
    assert np.array_equal(t.target.x, _clean(t.target.index))  # inputs unchanged
    assert t.source_key == make_task("input", R, 3).source_key  # shares the input task's pre-training


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown drift task"):
        make_task("label")


@pytest.mark.slow  # about 12 s: pre-training, 2 compiles, a 2-layer search and the drift probe of a tiny ResNet
def test_accuracy_runs_end_to_end(tmp_path, monkeypatch):
    """A tiny --quick run: 2-channel-wide ResNet-18 at 8x8, one seed, a few steps, search on 2 layers."""
    from experiments import accuracy as acc

    tiny = acc.Config(width=2, resolution=8, pretrain_epochs=1, epochs=1, seeds=(0,),
                      schemes=("full", "classifier", "tbft-rear", "searched"), ratios=(1.0,), search_epochs=0.25,
                      search_max_layers=2, lrs=(0.01,), threads=1)
    monkeypatch.setattr(acc, "QUICK", tiny)
    doc = tmp_path / "doc.md"
    (ib, ie), (ob, oe) = acc.markers("input"), acc.markers("output")
    doc.write_text(f"intro\n{ib}\ninput tables\n{ie}\n{ob}\nSTALE-TABLE\n{oe}\noutro\n")
    out = tmp_path / "out"
    assert acc.main(["--quick", "--task", "output", "--out", str(out), "--doc", str(doc)]) == 0
    result = json.loads((out / "output.json").read_text())
    rows = {r["scheme"]: r for r in result["rows"]}
    assert set(rows) == {"full", "classifier", "tbft-rear", "full +bn", "classifier +bn", "tbft-rear +bn",
                         "searched"}  # each preset in each mode
    assert rows["full"]["trainable_percent"] == pytest.approx(100.0) and rows["full"]["memory_ratio"] == 1.0
    assert rows["classifier"]["training_bytes"] < rows["full"]["training_bytes"]
    assert rows["searched"]["training_bytes"] <= result["search"]["budget_bytes"]
    assert result["probe"]["block"] in ("front", "middle", "rear") and result["probe"]["expected"] == "rear"
    for r in rows.values():
        assert 0.0 <= r["test_mean"] <= 100.0 and r["runs"][0]["steps"] > 0 and r["step_ms"] > 0
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "STALE-TABLE" not in text
    assert f"{ib}\ninput tables\n{ie}" in text  # the task that did not run keeps its section
    assert "| full |" in text and "| full +bn |" in text and "Drift probe (" in text and "picks **" in text
    assert "Targets: within 1 point of the best other row" in text and "final candidates" in text
    assert result["probe"]["best"] in ("tbft-rear", "tbft-rear +bn")  # the only tbft row of this run
    assert "| full, PyTorch, BN train mode" in text and 0 <= result["reference"]["test_mean"] <= 100
    ref = json.loads((out / "reference.json").read_text())  # run once, then reused while its recipe is the same
    assert [r["task"] for r in ref] == ["output"] and ref[0]["recipe"]["lrs"] == [0.01]
    assert result["probe"]["picks_best"] == (result["probe"]["block"] == "rear")
    assert any(f.startswith("pretrained-") and f.endswith(".safetensors") for f in os.listdir(out))


def test_paired_gap_resamples_test_images_paired():
    from experiments.accuracy import paired_gap, target_line

    same = [{"test_correct": "1101"}, {"test_correct": "1011"}]
    assert paired_gap(same, same) == (0.0, 0.0, 0.0)  # the same images right: no gap, whatever the resampling
    a, b = [{"test_correct": "1111"}], [{"test_correct": "1110"}]
    mean, lo, hi = paired_gap(a, b)
    assert mean == pytest.approx(25.0) and 0.0 <= lo <= mean <= hi <= 100.0 and lo == 0.0  # some resamples miss it
    assert paired_gap(a, [{"test_accuracy": 0.75}]) is None  # no per-image record: no interval
    # 2 seeds, 40 images: the searched row is 2.5 points behind on average, two images apart, so a 40-image test set
    # cannot say whether it is within 1 point
    rows = {"full": {"test_mean": 90.0, "runs": [{"test_correct": "1" * 36 + "0" * 4}] * 2},
            "searched": {"test_mean": 87.5, "trainable_percent": 5.0, "memory_ratio": 0.2,
                         "runs": [{"test_correct": "1" * 35 + "0" * 5}, {"test_correct": "0" + "1" * 35 + "0" * 4}]}}
    line = target_line(rows)
    assert "MISSED** (-2.5 points, 95 % interval over the test images" in line
    assert "cannot tell whether it is within 1 point" in line and "of resampled test sets" in line


def test_chance_within_counts_resampled_test_sets():
    from experiments.accuracy import chance_within

    right, wrong = [{"test_correct": "1" * 50}], [{"test_correct": "0" * 50}]
    assert chance_within(right, [wrong]) == 1.0 and chance_within(wrong, [right]) == 0.0
    assert chance_within(right, [right, wrong], points=0.0) == 1.0  # a tie with the best is within 0 points
    half = [{"test_correct": "10" * 25}]
    assert 0.0 < chance_within(half, [[{"test_correct": "01" * 25}]], points=0.0) < 1.0  # either way, by the draw
    assert chance_within(right, [[{"test_accuracy": 1.0}]]) is None
