"""Dataset pruning before a round (SFPrompt): score every sample with one forward pass of the inference
graph at the round's starting weights, keep the highest-scoring fraction.

Scores (higher = more to learn from; the easy, low-score samples are dropped):
- "loss": the sample's own loss (cross-entropy; BCE or MSE averaged over its labels);
- "el2n": the error L2 norm of Paul et al. (2021), || p - t ||_2, where p is softmax(z) and t the one-hot
  label (cross-entropy), or p is sigmoid(z) and t the multi-hot labels (BCE), or p = z (MSE).
Ties keep the earlier sample. The kept indices are returned sorted, so the pruned set keeps file order.
"""
from __future__ import annotations

import math

import numpy as np

from pockprop.errors import DataError

SCORES = ("loss", "el2n")


def scores(loss: dict, z: np.ndarray, y: np.ndarray, kind: str) -> np.ndarray:
    """(N,) scores of logits z (N, ...) against labels y, for the artifact's `loss` (its manifest entry)."""
    if kind not in SCORES:
        raise DataError(f"prune score must be one of {', '.join(SCORES)}, got {kind!r}")
    name, z = loss.get("name"), z.astype(np.float64)
    n = len(z)
    if name == "cross_entropy":
        if z.ndim != 2:
            raise DataError(f"pruning scores one class per sample; the model's output is {list(z.shape[1:])} per sample")
        y = y.astype(np.int64)
        logp = z - z.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        if kind == "loss":
            return -logp[np.arange(n), y]
        err = np.exp(logp)
        err[np.arange(n), y] -= 1.0
    elif name == "bce_with_logits":
        t = y.astype(np.float64)
        if kind == "loss":
            per = np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))
            return per.reshape(n, -1).mean(axis=1)
        err = 1.0 / (1.0 + np.exp(-z)) - t
    else:
        err = z - y.astype(np.float64)
        if kind == "loss":
            return (err ** 2).reshape(n, -1).mean(axis=1)
    return np.sqrt((err.reshape(n, -1) ** 2).sum(axis=1))


def keep(score: np.ndarray, fraction: float) -> np.ndarray:
    """Sorted indices of the ceil(fraction x N) highest scores (at least one sample)."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"prune keep fraction must be in (0, 1], got {fraction}")
    k = max(1, math.ceil(fraction * len(score) - 1e-9))
    order = np.argsort(-score, kind="stable")  # stable: among equal scores the earlier sample first
    return np.sort(order[:k])
