"""Small offline datasets for demos and tests: scikit-learn's 8x8 digits.

``sklearn.datasets.load_digits()`` ships inside scikit-learn (1,797 images,
10 classes), so nothing is downloaded. Only numpy and scikit-learn are used
-- no torch import -- so this module also runs on a device that has just the
pockprop runtime plus scikit-learn.

Preprocessing, in order:

1. scale raw pixel values (0..16) to [0, 1] by dividing by 16;
2. (``digits`` only) resize 8x8 -> R x R with bilinear (half-pixel centres,
   the same rule as ``torch.nn.functional.interpolate(..., align_corners=False)``)
   or nearest-neighbour interpolation, done as two small matrix products;
3. repeat the single grey channel ``channels`` times (RGB models want 3);
4. normalise as ``(x - MEAN) / STD`` with ``MEAN = STD = 0.5``, mapping
   [0, 1] to [-1, 1] like torchvision's ``Normalize((0.5,), (0.5,))``.

The train/test split is stratified by label and fully determined by
``seed`` and ``test_fraction``; ``digits`` and ``digits_flat`` with the same
arguments select the same images in the same order.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from pockprop.runtime.data import bilinear_matrix

__all__ = ["MEAN", "STD", "digits", "digits_flat"]

MEAN = 0.5
STD = 0.5
_SOURCE_SIZE = 8
_INTERPOLATIONS = ("bilinear", "nearest")


@lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    """All digits as (N, 8, 8) float32 in [0, 1] and (N,) int64 labels, read once."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    # Cached arrays are shared between calls: make accidental in-place edits fail loudly.
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


@lru_cache(maxsize=8)
def _split_indices(seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, labels = _load_raw()
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed,
        shuffle=True, stratify=labels)
    return train_idx, test_idx


def _select(split: str, seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    images, labels = _load_raw()
    train_idx, test_idx = _split_indices(int(seed), float(test_fraction))
    idx = train_idx if split == "train" else test_idx
    return images[idx], labels[idx]


def _resize_matrix(src: int, dst: int, interpolation: str) -> np.ndarray:
    """(dst, src) matrix M such that M @ row resamples a length-``src`` signal to ``dst``."""
    scale = src / dst
    out = np.arange(dst)
    matrix = np.zeros((dst, src), dtype=np.float64)
    if interpolation == "nearest":
        # torch's legacy "nearest": floor(dst_index * scale).
        matrix[out, np.minimum((out * scale).astype(np.int64), src - 1)] = 1.0
        return matrix
    return bilinear_matrix(src, dst)  # the device runtime's resize: the device feeds what training saw


def digits(resolution: int = 32, channels: int = 3, split: str = "train", seed: int = 0,
           test_fraction: float = 0.2, interpolation: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    """Digits as images for the CNNs.

    Returns ``(x, y)``: ``x`` float32 of shape (N, channels, resolution,
    resolution), normalised to [-1, 1]; ``y`` int64 labels 0..9 of shape (N,).
    With the defaults N is 1,437 for ``"train"`` and 360 for ``"test"``.
    """
    if resolution < 1 or channels < 1:
        raise ValueError(f"resolution and channels must be positive, got {resolution}, {channels}")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    images, labels = _select(split, seed, test_fraction)
    resize = _resize_matrix(_SOURCE_SIZE, resolution, interpolation)
    # Separable resize: rows then columns, (R, 8) @ (N, 8, 8) @ (8, R).
    resized = resize @ images.astype(np.float64) @ resize.T
    normalised = ((resized - MEAN) / STD).astype(np.float32)
    x = np.repeat(normalised[:, None, :, :], channels, axis=1)
    return np.ascontiguousarray(x), labels


def digits_flat(split: str = "train", seed: int = 0,
                test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Digits as flat 64-feature vectors for the MLP: ``(x float32 (N, 64), y int64 (N,))``."""
    images, labels = _select(split, seed, test_fraction)
    x = ((images.reshape(len(images), -1) - MEAN) / STD).astype(np.float32)
    return np.ascontiguousarray(x), labels
