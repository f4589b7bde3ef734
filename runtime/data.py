"""Data on the device: loading (.npz, CSV, a folder of images per class), preprocessing, batching.

Two kinds of arrays meet the runtime, and the rule is simple:
- a `Dataset` holds *raw* samples as they come from a file; `Pipeline` turns a batch of them into
  the model's input with the manifest's preprocessing (layout, resize, scale, mean/std), so the device
  feeds what the model saw at compile time;
- arrays given directly to `Trainer.step/predict/evaluate` are model input already.

Batching: the graph has a fixed batch size. Training batches follow a seeded permutation per
(seed, round, epoch); the last partial batch is dropped (default; shuffling puts those samples into
other batches next epoch) or, with last_batch="wrap", filled up with the first samples of the
epoch's order. Evaluation and prediction pad the last batch and discard the padding's outputs.
"""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from pockprop.artifact.contract import TensorSpec
from pockprop.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
LABEL_COLUMNS = ("label", "labels", "y", "target", "class")
LAST_BATCH = ("drop", "wrap")


@dataclass
class Dataset:
    """Raw samples x (N, ...) and optional labels y (N, ...), with where they came from."""

    x: np.ndarray
    y: np.ndarray | None = None
    source: str = "<arrays>"
    classes: list[str] | None = None  # image folders: the class name of each label index
    _fingerprint: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.x = np.asarray(self.x)
        if self.x.ndim == 0:
            raise DataError(f"{self.source}: x must have a sample axis, got a scalar")
        if self.y is not None:
            self.y = np.asarray(self.y)
            if len(self.y) != len(self.x):
                raise DataError(f"{self.source}: {len(self.x)} samples in x but {len(self.y)} labels in y")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def fingerprint(self) -> str:
        """sha256 of the samples and labels: tells a resumed run whether its data is the same."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for a in (self.x, self.y):
                if a is not None:
                    h.update(f"{a.dtype.str}{a.shape}".encode())
                    h.update(np.ascontiguousarray(a).data)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def subset(self, idx: np.ndarray, source: str | None = None) -> "Dataset":
        return Dataset(self.x[idx], None if self.y is None else self.y[idx], source or self.source, self.classes)

    def split(self, fraction: float, seed: int) -> tuple["Dataset", "Dataset"]:
        """(train, held out): a seeded random `fraction` of the samples is held out."""
        if not 0.0 < fraction < 1.0:
            raise DataError(f"holdout fraction must be in (0, 1), got {fraction}")
        order = np.random.default_rng([seed, 0x401D]).permutation(len(self))
        k = max(1, int(round(fraction * len(self))))
        return (self.subset(np.sort(order[k:]), f"{self.source} (train part)"),
                self.subset(np.sort(order[:k]), f"{self.source} (held out)"))


# -- loading --------------------------------------------------------------------------------------
def load(path: str, label_column: str | None = None, channels: int = 3, size: tuple[int, int] | None = None) -> Dataset:
    """A Dataset from an .npz (arrays x, y), a .csv (features + a label column) or an image folder.

    channels/size apply to image folders: images are decoded as grey (1) or RGB (3) and resized to
    `size` (height, width) when given.
    """
    if os.path.isdir(path):
        return load_image_folder(path, channels, size)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file or folder")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        return load_npz(path)
    if ext == ".csv":
        return load_csv(path, label_column)
    raise DataError(f"{path}: unknown data format {ext!r}; use .npz (x, y), .csv or a folder of class folders")


def load_npz(path: str) -> Dataset:
    """Arrays 'x' (samples) and optionally 'y' (labels); pickled object arrays are refused."""
    try:
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
            if "x" not in names:
                raise DataError(f"{path}: expected an array named 'x' (and 'y' for labels), found {names}")
            return Dataset(f["x"], f["y"] if "y" in names else None, path)
    except DataError:
        raise
    except Exception as ex:  # numpy and zipfile raise many types for a broken file; the file is what is wrong
        raise DataError(f"{path}: cannot read as .npz ({type(ex).__name__}: {ex})") from None


def load_csv(path: str, label_column: str | None = None) -> Dataset:
    """Numeric features; labels from `label_column`, a column named label/y/target/class, or the last one."""
    with open(path, newline="") as f:
        rows = [(i + 1, r) for i, r in enumerate(csv.reader(f)) if r and any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path}: empty CSV")

    def number(text: str) -> bool:
        try:
            float(text)
            return True
        except ValueError:
            return False

    header = None if all(number(c) for c in rows[0][1]) else [c.strip() for c in rows[0][1]]
    body = rows[1:] if header else rows
    width = len(rows[0][1])
    if label_column is not None:
        if header is None or label_column not in header:
            raise DataError(f"{path}: no column named {label_column!r} (columns: {header or 'no header row'})")
        col = header.index(label_column)
    else:
        named = [i for i, h in enumerate(header or []) if h.lower() in LABEL_COLUMNS]
        col = named[0] if named else width - 1
    values = np.empty((len(body), width), np.float64)
    for r, (line, row) in enumerate(body):
        if len(row) != width:
            raise DataError(f"{path} line {line}: {len(row)} fields, expected {width}")
        for c, text in enumerate(row):
            try:
                values[r, c] = float(text)
            except ValueError:
                name = header[c] if header else f"#{c + 1}"
                raise DataError(f"{path} line {line}, column {name!r}: {text!r} is not a number") from None
    y = values[:, col]
    x = np.delete(values, col, axis=1).astype(np.float32)
    return Dataset(x, y, path)


def load_image_folder(path: str, channels: int = 3, size: tuple[int, int] | None = None) -> Dataset:
    """root/<class>/<image>: labels are class indices in sorted folder-name order; x is (N, C, H, W) 0..255."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{path}: reading images needs Pillow: pip install 'pockprop[images]'") from None
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    if not classes:
        raise DataError(f"{path}: expected one sub-folder of images per class, found none")
    images, labels = [], []
    for label, cls in enumerate(classes):
        folder = os.path.join(path, cls)
        for name in sorted(os.listdir(folder)):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            fpath = os.path.join(folder, name)
            try:
                with Image.open(fpath) as im:
                    arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), np.float32)
            except Exception as ex:  # Pillow raises many types for a bad file; the file is what is wrong
                raise DataError(f"{fpath}: cannot decode image ({ex})") from None
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if size is not None and arr.shape[1:] != tuple(size):
                arr = resize(arr[None], size)[0]
            elif images and arr.shape != images[0].shape:
                raise DataError(f"{fpath}: {arr.shape[2]}x{arr.shape[1]} pixels (WxH), the first image was "
                                f"{images[0].shape[2]}x{images[0].shape[1]}; give the manifest a resize step")
            images.append(arr)
            labels.append(label)
    if not images:
        raise DataError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders {classes}")
    return Dataset(np.stack(images), np.array(labels, np.int64), path, classes)


# -- preprocessing --------------------------------------------------------------------------------
def bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) bilinear weights, half-pixel centres (torch's interpolate, align_corners=False)."""
    pos = np.clip((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0.0, src - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, src - 1)
    m = np.zeros((dst, src), np.float64)
    np.add.at(m, (np.arange(dst), lo), 1.0 - (pos - lo))
    np.add.at(m, (np.arange(dst), hi), pos - lo)
    return m


def resize(x: np.ndarray, size: tuple[int, int] | list[int]) -> np.ndarray:
    """Bilinear resize of (N, C, H, W) to (N, C, *size), float32, without antialiasing."""
    rows, cols = bilinear_matrix(x.shape[2], int(size[0])), bilinear_matrix(x.shape[3], int(size[1]))
    return np.einsum("ih,nchw,jw->ncij", rows, x.astype(np.float64), cols).astype(np.float32)


class Pipeline:
    """Turns raw Dataset batches into model input (per the manifest's data spec) and checks labels."""

    def __init__(self, data_spec: TensorSpec, label_spec: TensorSpec, num_classes: int | None = None):
        self.sample_shape = tuple(data_spec.shape[1:])
        self.dtype = np.dtype(data_spec.dtype)
        self.batch_size = int(data_spec.shape[0])
        self.label_shape = tuple(label_spec.shape[1:])
        self.label_dtype = np.dtype(label_spec.dtype)
        self.num_classes = num_classes
        p = data_spec.preprocess or {}
        self.resize = tuple(int(v) for v in p["resize"]) if "resize" in p else None
        if self.resize and (len(self.sample_shape) != 3 or self.resize != self.sample_shape[1:]):
            raise DataError(f"preprocess resize {list(self.resize)} does not give the model's input {list(self.sample_shape)}")
        self.scale = float(p.get("scale", 1.0))
        channels = self.sample_shape[0] if self.sample_shape else 1
        self.mean = self._per_channel(p.get("mean", 0.0), channels, "mean")
        self.std = self._per_channel(p.get("std", 1.0), channels, "std")

    def _per_channel(self, value: Any, channels: int, what: str) -> np.ndarray:
        v = np.asarray(value, np.float32).reshape(-1)
        if v.size not in (1, channels):
            raise DataError(f"preprocess {what}: {v.size} values for {channels} channels")
        return v.reshape((-1,) + (1,) * max(len(self.sample_shape) - 1, 0))

    def _layout(self, x: np.ndarray, source: str) -> np.ndarray:
        """(N, C', H', W') from (N, C, H, W), (N, H, W, C) or (N, H, W) samples, for image models."""
        c, h, w = self.sample_shape
        s = x.shape[1:]
        if s == self.sample_shape:
            return x
        if len(s) == 2:
            x = x[:, None]
        elif len(s) == 3 and s[-1] in (1, 3, 4) and s[0] not in (1, 3):
            x = np.moveaxis(x, -1, 1)[:, :3 if c == 3 else None]
        elif len(s) != 3:
            raise DataError(f"{source}: samples of shape {s}; the model expects {self.sample_shape} (C, H, W)")
        if x.shape[1] == 1 and c == 3:
            x = np.repeat(x, 3, axis=1)
        if x.shape[1] != c:
            raise DataError(f"{source}: samples have {x.shape[1]} channels, the model expects {c} "
                            f"(input shape {self.sample_shape})")
        if x.shape[2:] != (h, w):
            if self.resize is None:
                raise DataError(f"{source}: samples are {x.shape[2]}x{x.shape[3]} (HxW), the model expects "
                                f"{h}x{w} and its manifest has no resize step")
            x = resize(x, self.resize)
        return x

    def inputs(self, raw: np.ndarray, source: str = "data") -> np.ndarray:
        """Model input for a batch of raw samples."""
        x = np.asarray(raw)
        if x.dtype.kind not in "fiub":
            raise DataError(f"{source}: samples of dtype {x.dtype}; expected numbers")
        if len(self.sample_shape) == 3:
            x = self._layout(x, source)
        elif x.shape[1:] != self.sample_shape:
            raise DataError(f"{source}: samples of shape {x.shape[1:]}; the model expects {self.sample_shape} "
                            f"(input {[self.batch_size, *self.sample_shape]})")
        x = x.astype(np.float32)
        if self.scale != 1.0:
            x = x * np.float32(self.scale)
        x = (x - self.mean) / self.std
        return np.ascontiguousarray(x, self.dtype)

    def labels(self, y: np.ndarray | None, source: str = "data") -> np.ndarray:
        """Labels in the graph's dtype; class indices are checked against the number of classes."""
        if y is None:
            raise DataError(f"{source}: no labels (an .npz needs an array 'y')")
        y = np.asarray(y)
        if y.shape[1:] != self.label_shape:
            raise DataError(f"{source}: labels of shape {y.shape[1:]} per sample; expected {self.label_shape}")
        if self.label_dtype.kind in "iu":
            if y.dtype.kind == "f":
                if not np.all(y == np.round(y)):  # also false for NaN and inf
                    bad = int(np.flatnonzero(y.ravel() != np.round(y.ravel()))[0])
                    raise DataError(f"{source}: labels must be whole class indices; sample {bad} has {y.ravel()[bad]}")
            elif y.dtype.kind not in "iub":
                raise DataError(f"{source}: labels of dtype {y.dtype}; expected {self.label_dtype} class indices")
            if self.num_classes and y.size and (y.min() < 0 or y.max() >= self.num_classes):
                bad = int(np.flatnonzero((y < 0) | (y >= self.num_classes))[0])
                raise DataError(f"{source}: label {y.ravel()[bad]} at sample {bad} is outside 0..{self.num_classes - 1}")
        elif y.dtype.kind not in "fiub":
            raise DataError(f"{source}: labels of dtype {y.dtype}; expected {self.label_dtype}")
        return y.astype(self.label_dtype)

    def check(self, data: Dataset, need_labels: bool = True) -> None:
        """Fail early, naming the file, if the dataset cannot feed the model."""
        if len(data) == 0:
            raise DataError(f"{data.source}: no samples")
        self.inputs(data.x[:1], data.source)
        if need_labels:
            self.labels(data.y, data.source)


# -- batching -------------------------------------------------------------------------------------
def epoch_order(n: int, seed: int, round_: int, epoch: int) -> np.ndarray:
    """The seeded sample order of one epoch of one round."""
    return np.random.default_rng([seed, round_, epoch]).permutation(n)


def batch_indices(order: np.ndarray, batch_size: int, last_batch: str = "drop") -> list[np.ndarray]:
    """Index arrays of the batches of one epoch (see the module docstring for the last-batch policy)."""
    if last_batch not in LAST_BATCH:
        raise DataError(f"last_batch must be one of {LAST_BATCH}, got {last_batch!r}")
    n = len(order)
    full = [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    rest = n % batch_size
    if rest and last_batch == "wrap":
        full.append(np.resize(np.concatenate([order[n - rest:], order]), batch_size))
    if not full:
        raise DataError(f"{n} samples make no full batch of {batch_size}; use last_batch='wrap' (--last-batch wrap) "
                        "or more data")
    return full


def padded_batches(x: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """(batch, real rows) over x in order; the last batch is padded by repeating its last row."""
    for i in range(0, len(x), batch_size):
        chunk = x[i:i + batch_size]
        real = len(chunk)
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
        yield chunk, real


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int | None = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Seeded shuffled full batches of model-ready arrays (the last partial batch is dropped)."""
    order = np.arange(len(x)) if seed is None else np.random.default_rng(seed).permutation(len(x))
    for i in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]
