"""Drift tasks on scikit-learn's real digits: pre-train on a source setting, fine-tune on a shifted one.

Surgical fine-tuning (Lee et al., ICLR 2023), which TBFT builds on, sorts distribution shifts by the
level of the network they hit: *input-level* (pixel corruptions: the first block should adapt),
*feature-level* (the same classes built from different mid-level parts, e.g. a subpopulation shift: the
middle blocks) and *output-level* (the same features, a different label mapping: the last layer). One
task per kind, all on the 1,797 real 8x8 digits, with pure numpy (no torch here):

``input``   source: clean digits. target: the same kind of digits with their **contrast inverted**
            (ink bright -> dark, background dark -> bright) **plus i.i.d. Gaussian pixel noise**
            (sigma 0.2 on [0, 1] pixels, clipped), applied at the model resolution. Shapes, strokes and
            labels are unchanged; only low-level statistics change (the sign of every edge, the noise
            floor), which a first convolution can undo: the textbook input-level shift (CIFAR-C-like).
``feature`` a **subpopulation (writing-style) shift**: every class is split by 2-means clustering of its
            training images' 8x8 pixels into two styles (e.g. a 7 with or without a crossbar, an open or
            a closed 4, slanted or upright ones). source: each class's larger style cluster; target: its
            other cluster. Pixel statistics and labels stay the same kind; what changes is which stroke
            configurations (mid-level parts) make up a class -- the Entity-30 / Living-17 analogue that
            surgical fine-tuning calls feature-level.
``output``  source: clean digits, labels as they are. target: the same kind of clean digits with the
            labels **permuted** by a fixed derangement (every class gets another class's name): the
            inputs and every feature stay; only the map from features to labels changes (the CIFAR-Flip
            analogue of surgical fine-tuning).

Splits (no image is in two of them): models.data's stratified 80/20 split (seed 0) gives 1,437 train and
360 test images. The *test* split is only ever used, transformed like the target, for the reported
accuracy. The *train* split is divided between pre-training (source) and fine-tuning (target):
``input``/``output``: a stratified half each (718 / 719 images); ``feature``: by style cluster. Test images
of the feature task are assigned to their class's nearest training centroid, and only the target-style
ones are kept. The run seed changes only the noise drawn on the input task's fine-tuning images; the
test set of every task is fixed (its noise uses a constant seed).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pockprop.runtime.data import bilinear_matrix

from pockprop.models.data import MEAN, STD, _load_raw, _split_indices

TASKS = ("input", "feature", "output")
KINDS = {"input": "input-level", "feature": "feature-level", "output": "output-level"}
EXPECTED_BLOCK = {"input": "front", "feature": "middle", "output": "rear"}  # what TBFT would fine-tune
NOISE_SIGMA = 0.2
TEST_NOISE_SEED = 10_000  # fixed: the test set does not vary with the run seed
SPLIT_SEED = 0  # models.data's train/test split, and the source/target halves
PERMUTATION = np.array([3, 7, 5, 9, 0, 8, 1, 2, 6, 4])  # a fixed derangement: PERMUTATION[c] != c for all c


@dataclass
class Split:
    """Model-ready images (float32 (N, C, R, R), normalised like models.data) and int64 labels, with the
    indices of the images in scikit-learn's `load_digits()` order (to check that splits never share one)."""

    x: np.ndarray
    y: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DriftTask:
    name: str
    kind: str
    source: Split  # pre-training data (the source setting)
    target: Split  # fine-tuning data (the shifted setting; carve the validation hold-out from it)
    test: Split  # the held-out test set, shifted like the target; for the reported accuracy only
    source_key: str  # tasks with the same key pre-train on the same images (they share the model)
    notes: dict[str, object] = field(default_factory=dict)


def to_model_input(images: np.ndarray, resolution: int, channels: int) -> np.ndarray:
    """(N, 8, 8) or (N, R, R) pixels in [0, 1] -> float32 (N, channels, R, R) in [-1, 1], as models.data.digits."""
    if images.shape[-1] != resolution:
        m = bilinear_matrix(images.shape[-1], resolution)
        images = m @ images.astype(np.float64) @ m.T
    x = ((images - MEAN) / STD).astype(np.float32)
    return np.ascontiguousarray(np.repeat(x[:, None], channels, axis=1))


def upsample(images: np.ndarray, resolution: int) -> np.ndarray:
    """(N, 8, 8) -> (N, R, R) in [0, 1] with the runtime's bilinear rule (the same as models.data)."""
    m = bilinear_matrix(images.shape[-1], resolution)
    return np.clip(m @ images.astype(np.float64) @ m.T, 0.0, 1.0)


def invert_and_noise(pixels: np.ndarray, seed: int, sigma: float = NOISE_SIGMA) -> np.ndarray:
    """The input-level corruption on [0, 1] pixels: 1 - p, plus N(0, sigma^2) noise per pixel, clipped."""
    rng = np.random.default_rng(seed)
    return np.clip(1.0 - pixels + rng.normal(0.0, sigma, pixels.shape), 0.0, 1.0)


def relabel(y: np.ndarray) -> np.ndarray:
    """The output-level shift: class c is called PERMUTATION[c]."""
    return PERMUTATION[y]


def halves(index: np.ndarray, labels: np.ndarray, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """A stratified split of `index` into two halves (per class, a seeded shuffle cut in the middle)."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c in np.unique(labels[index]):
        members = rng.permutation(index[labels[index] == c])
        cut = len(members) // 2
        first.append(members[:cut])
        second.append(members[cut:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def style_clusters(images: np.ndarray, labels: np.ndarray, train: np.ndarray, seed: int = SPLIT_SEED,
                   iterations: int = 50) -> dict[int, np.ndarray]:
    """Per class, two 2-means centroids (on flattened 8x8 pixels) fitted on the training images only;
    row 0 is the larger cluster (the source style), row 1 the other (the target style)."""
    out = {}
    for c in np.unique(labels[train]):
        pts = images[train[labels[train] == c]].reshape(-1, 64).astype(np.float64)
        cent = _two_means(pts, np.random.default_rng(seed + int(c)), iterations)
        sizes = np.bincount(_nearest(pts, cent), minlength=2)
        out[int(c)] = cent if sizes[0] >= sizes[1] else cent[::-1].copy()
    return out


def _nearest(pts: np.ndarray, cent: np.ndarray) -> np.ndarray:
    return ((pts[:, None, :] - cent[None]) ** 2).sum(-1).argmin(1)


def _two_means(pts: np.ndarray, rng: np.random.Generator, iterations: int) -> np.ndarray:
    """Lloyd's algorithm, k=2, k-means++-style start: a random point and the point farthest from it."""
    a = pts[rng.integers(len(pts))]
    b = pts[((pts - a) ** 2).sum(1).argmax()]
    cent = np.stack([a, b])
    for _ in range(iterations):
        assign = _nearest(pts, cent)
        new = np.stack([pts[assign == k].mean(0) if (assign == k).any() else cent[k] for k in range(2)])
        if np.allclose(new, cent):
            break
        cent = new
    return cent


def style_of(images: np.ndarray, labels: np.ndarray, index: np.ndarray, clusters: dict[int, np.ndarray]) -> np.ndarray:
    """0 (source style) or 1 (target style) for each image in `index`: its class's nearest centroid."""
    pts = images[index].reshape(len(index), -1).astype(np.float64)
    out = np.empty(len(index), np.int64)
    for c, cent in clusters.items():
        mine = labels[index] == c
        out[mine] = _nearest(pts[mine], cent)
    return out


def make_task(name: str, resolution: int = 32, channels: int = 3, seed: int = 0) -> DriftTask:
    """The drift task `name` (one of TASKS) at the model's input size; `seed` only draws the input
    task's fine-tuning noise (source, test and every other task are the same for every seed)."""
    if name not in TASKS:
        raise ValueError(f"unknown drift task {name!r}; tasks: {', '.join(TASKS)}")
    images, labels = _load_raw()
    train, test = _split_indices(SPLIT_SEED, 0.2)
    train, test = np.sort(train), np.sort(test)
    notes: dict[str, object] = {}
    if name == "feature":
        clusters = style_clusters(images, labels, train)
        train_style = style_of(images, labels, train, clusters)
        test_style = style_of(images, labels, test, clusters)
        src, tgt, test = train[train_style == 0], train[train_style == 1], test[test_style == 1]
        notes["test images of the source style, left out"] = int((test_style == 0).sum())
        source_key = "style0"
    else:
        src, tgt = halves(train, labels)
        source_key = "clean-half0"

    def split(index: np.ndarray, shift: bool, noise_seed: int) -> Split:
        pixels = upsample(images[index], resolution)
        y = labels[index].copy()
        if shift and name == "input":
            pixels = invert_and_noise(pixels, noise_seed)
        if shift and name == "output":
            y = relabel(y)
        return Split(to_model_input(pixels, resolution, channels), y.astype(np.int64), index)

    return DriftTask(name, KINDS[name], split(src, False, 0), split(tgt, True, 1 + seed),
                     split(test, True, TEST_NOISE_SEED), source_key, notes)
