"""Multi-label data and metrics: several 0/1 labels per sample (a model trained with bce_with_logits).

Data: labels are a multi-hot (N, L) array. An .npz holds it as 'y'/'labels' (float targets in [0, 1] are
accepted there, as BCE soft targets); a CSV names its label columns (`select_columns`: names or
fnmatch patterns, `--label-columns cat,dog` or `'tag_*'`); an image folder lists its images' labels
in `labels.csv` (`index_labelled_folder`). Labels read from a CSV must be exactly 0 or 1.

Metrics (`metrics`), over logits z (N, ..., L) and multi-hot targets t, labels on the last axis:
- mAP: the mean over labels of average precision, AP = sum_n (R_n - R_{n-1}) P_n over the distinct
  score thresholds (sklearn's average_precision_score); labels without a positive have no AP and are
  left out of the mean (`map_labels` says how many counted);
- micro and macro F1 of the predictions sigmoid(z) >= threshold (a label with no positive and no
  predicted positive has F1 0, sklearn's zero_division=0);
- per-label accuracy at the threshold, and `accuracy`, their mean.
"""
from __future__ import annotations

import csv
import fnmatch
import os
from typing import Any, Sequence

import numpy as np

from pockprop.errors import DataError
from pockprop.runtime.images import IMAGE_EXTENSIONS

LABELS_FILE = "labels.csv"  # an image folder's multi-label listing: file,<label>,<label>,...


# -- data -----------------------------------------------------------------------------------------
def select_columns(header: list[str] | None, spec: str, path: str) -> list[int]:
    """Column indices named by `spec`: comma-separated names or fnmatch patterns ('tag_*'), in file order."""
    if header is None:
        raise DataError(f"{path}: --label-columns {spec!r} needs a header row naming the columns")
    cols: list[int] = []
    for item in (s.strip() for s in spec.split(",")):
        hits = [i for i, h in enumerate(header) if fnmatch.fnmatchcase(h, item)]
        if not item or not hits:
            raise DataError(f"{path}: no column matches {item!r} (columns: {', '.join(header)})")
        cols += [i for i in hits if i not in cols]
    return sorted(cols)


def check_multi_hot(y: np.ndarray, source: str, names: Sequence[str] | None = None) -> np.ndarray:
    """y as float32 if every value is 0 or 1; else DataError naming the first bad value's sample and label."""
    bad = ~((y == 0) | (y == 1))  # NaN is bad too
    if bad.any():
        i, j = np.unravel_index(int(np.flatnonzero(bad)[0]), y.shape)
        label = names[j] if names else f"#{j}"
        raise DataError(f"{source}: multi-label values must be 0 or 1; sample {i}, label {label!r} has {y[i, j]}")
    return y.astype(np.float32)


def index_labelled_folder(path: str) -> tuple[list[str], np.ndarray, list[str]]:
    """root/labels.csv (header `file,<label>,...`; one row per image, its path relative to root, then 0/1
    per label): (image paths, multi-hot (N, L) float32, label names). Why a listing and not folders: an
    image with several labels would have to be copied into each label's folder, and an image with none
    could not be expressed; a CSV beside the images is what multi-label datasets ship."""
    listing = os.path.join(path, LABELS_FILE)
    try:
        with open(listing, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as ex:
        raise DataError(f"{listing}: cannot read ({ex})") from None
    if len(rows) < 2 or len(rows[0]) < 2:
        raise DataError(f"{listing}: expected a header `file,<label>,...` and one row per image")
    names = [c.strip() for c in rows[0][1:]]
    paths, values = [], []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(names) + 1:
            raise DataError(f"{listing} line {line}: {len(row)} fields, expected {len(names) + 1}")
        name = row[0].strip()
        full = os.path.normpath(os.path.join(path, name))
        if not name.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(full):
            raise DataError(f"{listing} line {line}: {name!r} is not an image file under {path}")
        try:
            values.append([float(c) for c in row[1:]])
        except ValueError:
            raise DataError(f"{listing} line {line}: labels must be 0 or 1, got {row[1:]}") from None
        paths.append(full)
    y = check_multi_hot(np.array(values, np.float64), listing, names)
    return paths, y, names


# -- metrics --------------------------------------------------------------------------------------
def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of one label: sum over distinct thresholds of (recall step) x precision; NaN without a positive."""
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], positive[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last sample of each distinct score
    tp = np.cumsum(t)[last]
    if not len(tp) or tp[-1] == 0:
        return float("nan")
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(denom, dtype=np.float64), where=denom > 0)


def metrics(z: np.ndarray, t: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """mAP, micro/macro F1, per-label and mean accuracy of logits z against multi-hot t (module docstring)."""
    if not 0.0 < threshold < 1.0:
        raise DataError(f"threshold must be in (0, 1), got {threshold}")
    labels = z.shape[-1] if z.ndim else 1
    z, t = z.reshape(-1, labels).astype(np.float64), t.reshape(-1, labels) > 0.5
    pred = z >= np.log(threshold / (1.0 - threshold))  # sigmoid(z) >= threshold, without rounding sigmoid
    aps = np.array([average_precision(z[:, j], t[:, j]) for j in range(labels)])
    counted = ~np.isnan(aps)
    tp, fp, fn = ((pred & t).sum(0), (pred & ~t).sum(0), (~pred & t).sum(0))
    per_label = (pred == t).mean(axis=0)
    return {"mAP": float(aps[counted].mean()) if counted.any() else float("nan"), "map_labels": int(counted.sum()),
            "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())), "macro_f1": float(_f1(tp, fp, fn).mean()),
            "label_accuracy": [float(v) for v in per_label], "accuracy": float(per_label.mean()),
            "threshold": threshold}


def describe(m: dict[str, Any], names: Sequence[str] | None = None) -> str:
    """One line for eval and inspect: mAP, F1s and per-label accuracy."""
    acc = m.get("label_accuracy", [])
    names = list(names) if names and len(names) == len(acc) else [f"#{j}" for j in range(len(acc))]
    per = ", ".join(f"{n} {100 * a:.1f}%" for n, a in zip(names, acc))
    return (f"mAP {100 * m['mAP']:.2f} ({m['map_labels']} of {len(acc)} labels have positives), "
            f"F1 at {m['threshold']:g}: micro {100 * m['micro_f1']:.2f}, macro {100 * m['macro_f1']:.2f}; "
            f"per-label accuracy {per}")
