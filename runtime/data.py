"""Data on the device: loading (.npz, CSV, a folder of images per class), preprocessing, batching.

Two kinds of arrays meet the runtime, and the rule is simple:
- a `Dataset` holds *raw* samples as they come from a file; `Pipeline` turns a batch of them into
  the model's input with the manifest's preprocessing (layout, channels, resize, channel order,
  scale, mean/std), so the device feeds what the model saw at compile time;
- arrays given directly to `Trainer.step/predict/evaluate` are model input already.
An image folder's samples stay on disk until a batch takes them (runtime/images.py).

Batching: the graph has a fixed batch size. Training batches follow a seeded permutation per
(seed, round, epoch); the last partial batch is dropped (default; shuffling puts those samples into
other batches next epoch) or, with last_batch="wrap", filled up with the first samples of the
epoch's order. Evaluation and prediction pad the last batch and discard the padding's outputs.
"""
from __future__ import annotations

import csv
import hashlib
import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator, Sequence

import numpy as np

from pockprop.artifact.contract import TEACHER_LOGITS, TensorSpec, teacher_input
from pockprop.errors import DataError
from pockprop.runtime.images import ImageFiles, index_folder, to_channels
from pockprop.runtime.inputs import Columns, arrange, check_range, label as input_label
from pockprop.runtime.inputs import check as check_input
from pockprop.runtime.multilabel import LABELS_FILE, check_multi_hot, index_labelled_folder, select_columns

LABEL_COLUMNS = ("label", "labels", "y", "target", "class")
LAST_BATCH = ("drop", "wrap")


@dataclass
class Dataset:
    """Raw samples x (N, ...) and optional labels y (N, ...), with where they came from.

    x is an array; for an image folder `ImageFiles` (`x[idx]` decodes just those samples); for a model
    with several inputs `Columns` (one array per input name).
    """

    x: np.ndarray | ImageFiles | Columns
    y: np.ndarray | None = None
    source: str = "<arrays>"
    classes: list[str] | None = None  # image folders: the class name of each label index; multi-label: label names
    _fingerprint: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.x, (ImageFiles, Columns)):
            self.x = np.asarray(self.x)
        if isinstance(self.x, np.ndarray) and self.x.ndim == 0:
            raise DataError(f"{self.source}: x must have a sample axis, got a scalar")
        if self.y is not None:
            self.y = np.asarray(self.y)
            if len(self.y) != len(self.x):
                raise DataError(f"{self.source}: {len(self.x)} samples in x but {len(self.y)} labels in y")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def fingerprint(self) -> str:
        """sha256 of the samples (an image folder: its files' bytes) and labels: tells a resumed run
        whether its data is the same."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            arrays = (self.x, self.y)
            if isinstance(self.x, (ImageFiles, Columns)):
                h.update(self.x.digest().encode())
                arrays = (self.y,)
            for a in arrays:
                if a is not None:
                    h.update(f"{a.dtype.str}{a.shape}".encode())
                    h.update(np.ascontiguousarray(a).data)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def subset(self, idx: np.ndarray, source: str | None = None) -> "Dataset":
        x = self.x.select(idx) if isinstance(self.x, ImageFiles) else self.x[idx]
        return Dataset(x, None if self.y is None else self.y[idx], source or self.source, self.classes)

    def split(self, fraction: float, seed: int) -> tuple["Dataset", "Dataset"]:
        """(train, held out): a seeded random `fraction` of the samples is held out."""
        if not 0.0 < fraction < 1.0:
            raise DataError(f"holdout fraction must be in (0, 1), got {fraction}")
        order = np.random.default_rng([seed, 0x401D]).permutation(len(self))
        k = max(1, int(round(fraction * len(self))))
        return (self.subset(np.sort(order[k:]), f"{self.source} (train part)"),
                self.subset(np.sort(order[:k]), f"{self.source} (held out)"))


# -- loading --------------------------------------------------------------------------------------
def load(path: str, label_column: str | None = None, channels: int = 3, size: tuple[int, int] | None = None,
         antialias: bool = False, inputs: Sequence[str] = ("x",), optional: Sequence[str] = (),
         label_columns: str | None = None) -> Dataset:
    """A Dataset from an .npz (arrays x, y; see load_npz), a .csv (features + a label column, or several:
    `label_columns`, names or patterns, multi-hot labels; runtime/multilabel.py) or an image folder (a
    folder per class, or images listed with their labels in labels.csv).

    channels/size/antialias apply to image folders: images are decoded as grey (1) or RGB (3) and
    resized to `size` (height, width) when given (`Pipeline.load` passes the manifest's). `inputs`: the
    model's input names (the manifest's); a CSV or an image folder holds one input only. `optional`:
    arrays an .npz may hold beside the inputs (the training step's teacher_logits).
    """
    ext = os.path.splitext(path)[1].lower()
    if len(inputs) > 1 and ext != ".npz" and (os.path.isdir(path) or os.path.isfile(path)):
        raise DataError(f"{path}: the model takes {len(inputs)} inputs ({', '.join(inputs)}); give an .npz "
                        "with one array per input name")
    if label_columns is not None and ext != ".csv":
        raise DataError(f"{path}: label columns are for a .csv; an .npz holds its (N, L) labels as 'y', an image "
                        f"folder lists them in {LABELS_FILE}")
    if os.path.isdir(path):
        return load_image_folder(path, channels, size, antialias)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file or folder")
    if ext == ".npz":
        return load_npz(path, inputs, optional)
    if ext == ".csv":
        return load_csv(path, label_column, label_columns)
    raise DataError(f"{path}: unknown data format {ext!r}; use .npz (x, y), .csv or a folder of class folders")


def load_npz(path: str, inputs: Sequence[str] = ("x",), optional: Sequence[str] = ()) -> Dataset:
    """One array per model input, named by `inputs` (a one-input model's may also be 'x'), and optionally
    the labels, 'y' or 'labels', and the arrays named in `optional`; with several inputs any other array
    is refused, and so are pickled object arrays. An optional array present makes x `Columns` (by input
    name, the optional arrays beside)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
            found = [k for k in ("y", "labels") if k in names and k not in inputs]
            if len(found) > 1:
                raise DataError(f"{path}: both 'y' and 'labels' are there; keep one array of labels")
            y = f[found[0]] if found else None
            extra = {k: f[k] for k in optional if k in names}
            if len(inputs) == 1:
                keys = [k for k in dict.fromkeys([inputs[0], "x"]) if k in names]
                if not keys:
                    want = " or ".join(repr(k) for k in dict.fromkeys([inputs[0], "x"]))
                    raise DataError(f"{path}: expected an array named {want} (and 'y' for labels), found {names}")
                if extra:
                    return Dataset(Columns({inputs[0]: f[keys[0]]} | extra, path), y, path)
                return Dataset(f[keys[0]], y, path)
            missing = [k for k in inputs if k not in names]
            if missing:
                raise DataError(f"{path}: the model's inputs are {', '.join(inputs)}; no array named "
                                f"{', '.join(missing)} (found {', '.join(names)})")
            unknown = [k for k in names if k not in inputs and k not in found and k not in extra]
            if unknown:  # an input the model does not take (token_type_ids, say) must not be dropped unseen
                raise DataError(f"{path}: the model's inputs are {', '.join(inputs)}; it takes no "
                                f"{', '.join(unknown)} (labels are 'y' or 'labels')")
            return Dataset(Columns({k: f[k] for k in inputs} | extra, path), y, path)
    except DataError:
        raise
    except Exception as ex:  # numpy and zipfile raise many types for a broken file; the file is what is wrong
        raise DataError(f"{path}: cannot read as .npz ({type(ex).__name__}: {ex})") from None


def load_csv(path: str, label_column: str | None = None, label_columns: str | None = None) -> Dataset:
    """Numeric features; labels from `label_column`, a column named label/y/target/class, or the last one;
    or multi-hot (N, L) labels from the columns `label_columns` names (each 0 or 1)."""
    try:  # UTF-8, with or without the byte-order mark spreadsheet programs write
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(i + 1, r) for i, r in enumerate(csv.reader(f)) if r and any(c.strip() for c in r)]
    except UnicodeDecodeError as ex:
        raise DataError(f"{path}: not UTF-8 text (byte {ex.object[ex.start:ex.start + 1]!r} at offset {ex.start}); "
                        "save the CSV as UTF-8") from None
    except csv.Error as ex:
        raise DataError(f"{path}: not a readable CSV ({ex})") from None
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
    if label_columns is not None:
        if label_column is not None:
            raise DataError(f"{path}: give --label-column (one label) or --label-columns (several), not both")
        col: int | list[int] = select_columns(header, label_columns, path)
    elif label_column is not None:
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
    if isinstance(col, list):
        assert header is not None
        names = [header[c] for c in col]
        return Dataset(x, check_multi_hot(y, path, names), path, names)
    return Dataset(x, y, path)


def load_image_folder(path: str, channels: int = 3, size: tuple[int, int] | None = None,
                      antialias: bool = False) -> Dataset:
    """root/<class>/<image>: labels are class indices in sorted folder-name order; or root/labels.csv
    listing images with multi-hot labels (runtime/multilabel.py). x is `ImageFiles` (N, C, H, W) on the
    0-255 scale, decoded when indexed (runtime/images.py)."""
    if os.path.isfile(os.path.join(path, LABELS_FILE)):
        paths, y, names = index_labelled_folder(path)
        return Dataset(ImageFiles.index(paths, channels, size, antialias), y, path, names)
    paths, labels, classes = index_folder(path)
    files = ImageFiles.index(paths, channels, size, antialias)
    return Dataset(files, np.array(labels, np.int64), path, classes)


# -- preprocessing --------------------------------------------------------------------------------
RAW_PIXELS = 8.0  # a batch above this, with no scale/mean/std recorded, looks like unscaled 0-255 pixels


class PreprocessWarning(UserWarning):
    """Image samples that do not look like what the manifest's preprocessing expects: raw 0-255 pixels
    where nothing is scaled, or model-ready values (negative, or at most 1) where pixels are scaled down."""


@lru_cache(maxsize=64)
def bilinear_matrix(src: int, dst: int, antialias: bool = False) -> np.ndarray:
    """(dst, src) bilinear weights, half-pixel centres (torch's interpolate, align_corners=False).

    antialias=True widens the triangle filter by the scale factor when shrinking (torch's
    antialias=True, Pillow's BILINEAR resize); enlarging is the same either way. Read-only (cached).
    """
    scale = src / dst
    if antialias and scale > 1:
        centre = (np.arange(dst) + 0.5) * scale
        lo = np.maximum((centre - scale + 0.5).astype(np.int64), 0)  # Pillow's window, truncated like C
        hi = np.minimum((centre + scale + 0.5).astype(np.int64), src)
        j = np.arange(src)
        m = np.clip(1.0 - np.abs((j[None] - centre[:, None] + 0.5) / scale), 0.0, None)
        m *= (j[None] >= lo[:, None]) & (j[None] < hi[:, None])
        m /= m.sum(axis=1, keepdims=True)
    else:
        pos = np.clip((np.arange(dst) + 0.5) * scale - 0.5, 0.0, src - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, src - 1)
        m = np.zeros((dst, src), np.float64)
        np.add.at(m, (np.arange(dst), lo), 1.0 - (pos - lo))
        np.add.at(m, (np.arange(dst), hi), pos - lo)
    m.setflags(write=False)
    return m


@lru_cache(maxsize=64)
def _taps(src: int, dst: int, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """bilinear_matrix's non-zeros: (dst, K) source indices and float32 weights (padding has weight 0)."""
    m = bilinear_matrix(src, dst, antialias)
    k = max(int((m != 0).sum(axis=1).max()), 1)
    idx = np.argsort(m == 0, axis=1, kind="stable")[:, :k]  # each row's non-zero columns first, in order
    return idx, np.take_along_axis(m, idx, axis=1).astype(np.float32)


def resize(x: np.ndarray, size: tuple[int, int] | list[int], antialias: bool = False) -> np.ndarray:
    """Bilinear resize of (N, C, H, W) to (N, C, *size), float32, by bilinear_matrix's rule.

    The two matrix products applied as taps: each output pixel sums the 2 (antialiased: about 2x the
    shrink factor) input pixels with non-zero weight, so the work is proportional to the output and
    needs no BLAS threads (they stall when the cores are busy: docs/benchmarks.md). Float32 sums:
    within ~1e-6 of the float64 product, relative to the range.
    """
    n, c, h_in, w_in = x.shape
    h, w = int(size[0]), int(size[1])
    (ri, rw), (ci, cw) = _taps(h_in, h, antialias), _taps(w_in, w, antialias)
    rows_first = h * w_in * ri.shape[1] + h * w * ci.shape[1] <= h_in * w * ci.shape[1] + h * w * ri.shape[1]
    out = np.empty((n, c, h, w), np.float32)
    for i in range(0, n, 16):  # a few samples at a time: a batch of large images is never all float at once
        s = x[i:i + 16]
        if rows_first:
            s = _sum_taps(s, ri, rw, axis=2)
        s = _sum_taps(s, ci, cw, axis=3)
        out[i:i + 16] = s if rows_first else _sum_taps(s, ri, rw, axis=2)
    return out


def _sum_taps(x: np.ndarray, idx: np.ndarray, wts: np.ndarray, axis: int) -> np.ndarray:
    shape = (-1, 1) if axis == 2 else (-1,)
    acc = np.take(x, idx[:, 0], axis=axis) * wts[:, 0].reshape(shape)
    for k in range(1, idx.shape[1]):
        acc += np.take(x, idx[:, k], axis=axis) * wts[:, k].reshape(shape)
    return acc


class Pipeline:
    """Turns raw Dataset batches into model input (per the manifest's data specs) and checks labels.

    The first input, if it is a float input, is preprocessed as its spec records. Image models (C, H, W):
    samples in (C, H, W), (H, W, C) or grey (H, W) layout, RGB (or grey) channel order, become the
    model's channel count (images.to_channels), are resized if a `resize` step is recorded, reordered to
    BGR if `channel_order` says so, then scaled and normalized. Every other input (token ids, masks) is
    model-ready as it comes and only checked (runtime/inputs.py). A kd artifact whose teacher is "logits"
    trains on datasets that hold them (an .npz array `teacher_logits`, `Columns` beside the inputs):
    `teacher_logits` takes a batch's, model-ready and checked; `inputs` leaves them out.
    """

    def __init__(self, data_spec: TensorSpec | Sequence[TensorSpec], label_spec: TensorSpec,
                 num_classes: int | None = None, loss: dict[str, Any] | None = None):
        self.specs = [data_spec] if isinstance(data_spec, TensorSpec) else list(data_spec)
        data_spec = self.specs[0]
        self._preprocesses = data_spec.dtype.startswith("float")
        self.sample_shape = tuple(data_spec.shape[1:])
        self.dtype = np.dtype(data_spec.dtype)
        self.batch_size = int(data_spec.shape[0])
        self.label_shape = tuple(label_spec.shape[1:])
        self.label_dtype = np.dtype(label_spec.dtype)
        self.num_classes = num_classes
        self.loss = dict(loss or {})  # the manifest's loss: its name and, for cross-entropy, ignore_index
        self.teacher = teacher_input(self.loss)  # the step's teacher_logits input, if it takes one
        # the label value that counts as padding, not a class (cross-entropy only)
        self.ignore_index = self.loss.get("ignore_index") if self.loss.get("name") == "cross_entropy" else None
        p = self.preprocess = dict(data_spec.preprocess or {})
        self.resize = tuple(int(v) for v in p["resize"]) if "resize" in p else None
        if self.resize and (len(self.sample_shape) != 3 or self.resize != self.sample_shape[1:]):
            raise DataError(f"preprocess resize {list(self.resize)} does not give the model's input {list(self.sample_shape)}")
        self.antialias = bool(p.get("antialias", False))
        self.bgr = p.get("channel_order", "rgb") == "bgr"
        if self.bgr and (len(self.sample_shape) != 3 or self.sample_shape[0] != 3):
            raise DataError(f"preprocess channel_order bgr needs a 3-channel image input, not {list(self.sample_shape)}")
        self.scale = float(p.get("scale", 1.0))
        channels = self.sample_shape[0] if self.sample_shape else 1
        self.mean = self._per_channel(p.get("mean", 0.0), channels, "mean")
        self.std = self._per_channel(p.get("std", 1.0), channels, "std")
        image = len(self.sample_shape) == 3
        self._unscaled = image and not {"scale", "mean", "std"} & set(p)
        self._scales_pixels = image and 0 < self.scale <= 0.01  # e.g. 1/255: expects 0-255 pixels
        self.warned = False

    def _per_channel(self, value: Any, channels: int, what: str) -> np.ndarray:
        v = np.asarray(value, np.float32).reshape(-1)
        if v.size not in (1, channels):
            raise DataError(f"preprocess {what}: {v.size} values for {channels} channels")
        return v.reshape((-1,) + (1,) * max(len(self.sample_shape) - 1, 0))

    def load(self, path: str, label_column: str | None = None, label_columns: str | None = None) -> Dataset:
        """`load(path)` with this model's input names, image channels, size and resize rule."""
        channels = self.sample_shape[0] if len(self.sample_shape) == 3 else 3
        return load(path, label_column, channels, self.resize, self.antialias, [s.name for s in self.specs],
                    optional=(TEACHER_LOGITS,) if self.teacher is not None else (), label_columns=label_columns)

    def describe(self) -> str:
        """What `inputs` does to a raw sample, in words (shown by inspect, compile and train)."""
        if len(self.specs) > 1 or not self._preprocesses:
            return "none: the inputs go into the model as they are (" + ", ".join(
                f"{s.name} {s.dtype}" + (f" in {s.range[0]}..{s.range[1]}" if s.range else "")
                for s in self.specs) + ")"
        steps = []
        if len(self.sample_shape) == 3:
            c, h, w = self.sample_shape
            steps.append("BGR" if self.bgr else "RGB" if c == 3 else f"{c}-channel" if c != 1 else "grey")
            steps.append(f"resized to {h}x{w} (bilinear{', antialiased' if self.antialias else ''})" if self.resize
                         else f"not resized (images must be {h}x{w})")
        if self.scale != 1.0:
            inv = 1.0 / self.scale
            steps.append(f"x/{inv:g}" if abs(inv - round(inv)) < 1e-6 else f"x*{self.scale:g}")
        if self.mean.any() or (self.std != 1).any():
            fmt = lambda a: f"{a.ravel()[0]:g}" if a.size == 1 else str([round(float(v), 6) for v in a.ravel()])  # noqa: E731
            steps.append(f"(x - {fmt(self.mean)}) / {fmt(self.std)}")
        if self._unscaled:
            steps.append("no scaling (0-255 pixels go in as they are)")
        return ", ".join(steps) if steps else "none: samples go into the model as they are"

    def _layout(self, x: np.ndarray, source: str) -> np.ndarray:
        """(N, C', H', W') from (N, C, H, W), (N, H, W, C) or (N, H, W) samples, for image models."""
        c, h, w = self.sample_shape
        s = x.shape[1:]
        if s == self.sample_shape:
            return x
        if len(s) == 2:
            x = x[:, None]
        elif len(s) == 3 and s[-1] in (1, 3, 4) and s[0] not in (1, 3):
            x = np.moveaxis(x, -1, 1)
        elif len(s) != 3:
            raise DataError(f"{source}: samples of shape {s}; the model expects {self.sample_shape} (C, H, W)")
        if x.shape[1] != c:
            try:
                x = to_channels(x, c, source)
            except DataError:
                raise DataError(f"{source}: samples have {x.shape[1]} channels, the model expects {c} "
                                f"(input shape {self.sample_shape})") from None
        if x.shape[2:] != (h, w):
            if self.resize is None:
                raise DataError(f"{source}: samples are {x.shape[2]}x{x.shape[3]} (HxW), the model expects "
                                f"{h}x{w} and its manifest has no resize step")
            x = resize(x, self.resize, self.antialias)
        return x

    def _check_range(self, x: np.ndarray, source: str) -> None:
        """Warn (once) when raw image samples do not look like what the preprocessing expects."""
        if not x.size or not (self._unscaled or self._scales_pixels):
            return
        lo, hi = float(np.min(x)), float(np.max(x))
        if self._unscaled and hi > RAW_PIXELS:
            say = (f"samples reach {hi:g}, like raw 0-255 pixels, but the artifact records no scaling (manifest "
                   "data preprocess: no scale, mean or std), so they go into the model unscaled; recompile with "
                   "`pockprop compile --preprocess` (e.g. unit or imagenet)")
        elif self._scales_pixels and (lo < 0 or 0 < hi <= 1):
            say = (f"samples range {lo:g}..{hi:g}, like model input already, but the artifact expects raw pixels "
                   f"and multiplies them by {self.scale:g}; give raw 0-255 pixels, or recompile with "
                   "`pockprop compile --preprocess none`")
        else:
            return
        self.warned = True
        warnings.warn(f"{source}: {say}", PreprocessWarning, stacklevel=3)

    def inputs(self, raw: Any, source: str = "data") -> np.ndarray | dict[str, np.ndarray]:
        """Model input for a batch of raw samples: an array for a one-input model, else a dict by input
        name (from `Columns`, a tuple in manifest order or a dict). Teacher logits beside them are left out."""
        raw = _without_teacher(raw, len(self.specs))
        if len(self.specs) == 1:
            return self._input(self.specs[0], raw, source)
        return {s.name: self._input(s, a, source) for s, a in zip(self.specs, arrange(raw, self.specs, source))}

    def teacher_logits(self, raw: Any, source: str = "data") -> np.ndarray | None:
        """A raw batch's teacher logits, checked like an input (shape, dtype; NaN or Inf is a DataError: a
        teacher's output is never missing data), or None when the step takes none."""
        if self.teacher is None:
            return None
        if not isinstance(raw, Columns) or TEACHER_LOGITS not in raw.arrays:
            raise DataError(f"{source}: the artifact distills from teacher logits (loss kd, teacher logits); give "
                            f"an .npz with an array {TEACHER_LOGITS!r} of shape [N, "
                            f"{', '.join(map(str, self.teacher.shape[1:]))}] beside the inputs")
        return check_teacher(raw.arrays[TEACHER_LOGITS], self.teacher, None, source)

    def _input(self, spec: TensorSpec, raw: Any, source: str) -> np.ndarray:
        if spec is not self.specs[0] or not self._preprocesses:
            return check_input(raw, spec, None, input_label(self.specs, spec, source))
        x = np.asarray(raw)
        if x.dtype.kind not in "fiub":
            raise DataError(f"{source}: samples of dtype {x.dtype}; expected numbers")
        if len(self.sample_shape) == 3:
            x = self._layout(x, source)
            if self.bgr:
                x = x[:, ::-1]
            if not self.warned:
                self._check_range(x, source)
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
            raise DataError(f"{source}: no labels (an .npz needs an array 'y' or 'labels')")
        y = np.asarray(y)
        if y.shape[1:] != self.label_shape:
            hint = ""
            if self.loss.get("name") == "bce_with_logits" and len(self.label_shape) == 1:
                hint = (f" ({self.label_shape[0]} labels per sample; a CSV names its label columns with "
                        "--label-columns)")
            raise DataError(f"{source}: labels of shape {y.shape[1:]} per sample; expected {self.label_shape}{hint}")
        if self.label_dtype.kind in "iu":
            if y.dtype.kind == "f":
                if not np.all(y == np.round(y)):  # also false for NaN and inf
                    bad = int(np.flatnonzero(y.ravel() != np.round(y.ravel()))[0])
                    raise DataError(f"{source}: labels must be whole class indices; sample {bad} has {y.ravel()[bad]}")
            elif y.dtype.kind not in "iub":
                raise DataError(f"{source}: labels of dtype {y.dtype}; expected {self.label_dtype} class indices")
        elif y.dtype.kind not in "fiub":
            raise DataError(f"{source}: labels of dtype {y.dtype}; expected {self.label_dtype}")
        problem = self.bad_label(y)
        if problem:
            raise DataError(f"{source}: {problem}")
        return y.astype(self.label_dtype)

    def all_ignored(self, y: np.ndarray) -> bool:
        """Every label is the cross-entropy's ignore_index: a batch with nothing to learn (its loss is 0/0)."""
        ignore = self.ignore_index
        return ignore is not None and y.size > 0 and bool(np.all(y == ignore))

    def bad_label(self, y: np.ndarray) -> str | None:
        """What is wrong with the first bad label of `y`, or None. Class indices must lie in 0..classes-1
        (or equal the cross-entropy's ignore_index, a padding position); BCE targets in [0, 1] (NaN is the
        guard's to reject, like NaN data)."""
        if self.label_dtype.kind in "iu" and self.num_classes:
            ok = (y >= 0) & (y < self.num_classes)
            ignore = self.ignore_index
            if ignore is not None:
                ok |= y == ignore
            what = f"outside 0..{self.num_classes - 1}" + (f" ({ignore} is ignored)" if ignore is not None else "")
        elif self.loss.get("name") == "bce_with_logits":
            ok = ~((y < 0) | (y > 1))
            what = "outside [0, 1]"
        else:
            return None
        if ok.all():
            return None
        at = np.unravel_index(int(np.flatnonzero(~ok.reshape(-1))[0]), y.shape)
        where = f"sample {at[0]}" + (f", position {list(map(int, at[1:]))}" if len(at) > 1 else "")
        return f"label {y[at]} at {where} is {what}"

    def check(self, data: Dataset, need_labels: bool = True, training: bool = False) -> None:
        """Fail early, naming the file, if the dataset cannot feed the model (`training`: the training
        step, teacher logits included, every sample's)."""
        if len(data) == 0:
            raise DataError(f"{data.source}: no samples")
        self.inputs(data.x[:1], data.source)
        if training:
            self.teacher_logits(data.x, data.source)
        for spec, x in zip(self.specs, arrange(_without_teacher(data.x, len(self.specs)), self.specs, data.source)):
            if spec.range is not None:  # every sample now: a bad id must not stop a round half way
                check_range(np.asarray(x), spec, input_label(self.specs, spec, data.source))
        if need_labels:
            y = self.labels(data.y, data.source)
            if y.dtype.kind == "f" and np.isnan(y).any():  # a batch's NaN is the guard's; a file's is bad data
                at = np.unravel_index(int(np.flatnonzero(np.isnan(y))[0]), y.shape)
                raise DataError(f"{data.source}: label NaN at sample {at[0]}"
                                + (f", position {list(map(int, at[1:]))}" if len(at) > 1 else ""))


def _without_teacher(raw: Any, n_inputs: int) -> Any:
    """Raw samples without the teacher logits beside them: `Columns` of the inputs, or one input's array."""
    if not isinstance(raw, Columns) or TEACHER_LOGITS not in raw.arrays:
        return raw
    rest = {k: v for k, v in raw.arrays.items() if k != TEACHER_LOGITS}
    return next(iter(rest.values())) if n_inputs == 1 else Columns(rest)


def check_teacher(a: Any, spec: TensorSpec, batch: int | None, source: str = "data") -> np.ndarray:
    """Teacher logits as the step's input `spec` (runtime.inputs.check: shape, dtype), all finite, or DataError."""
    what = f"{source}: {TEACHER_LOGITS}" if source else TEACHER_LOGITS
    a = check_input(a, spec, batch, what)
    if not np.isfinite(a).all():
        at = int(np.flatnonzero(~np.isfinite(a).reshape(len(a), -1).all(axis=1))[0])
        raise DataError(f"{what}: sample {at} holds NaN or Inf")
    return a


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
