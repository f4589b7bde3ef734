"""The training guard: which updates a Trainer accepts, and which states it may save, so that a diverging
run never replaces the last good checkpoint.

A step is rejected, and the state stays what it was, when (modes "full" and "loss" unless noted)
- its batch holds NaN or Inf;
- its loss is not finite, or explodes: over SPIKE times the largest of the round's last WINDOW accepted
  losses (floored, below);
- (mode "full") an updated tensor is not finite, or a parameter's update is over UPDATE times the
  parameter's norm. The norm is floored by the RMS of all trainable parameters times the square root of
  the tensor's size, so a zero-initialised tensor (a BatchNorm bias) is measured against the model's
  scale rather than against zero.
A state is diverged, and is not written to a checkpoint (the round then fails: runtime.loop), when
- a tensor holds NaN or Inf (whatever the mode);
- a parameter's norm grew over GROWTH times since the round began;
- the mean of the round's last WINDOW accepted losses is over DRIFT times its first accepted loss
  (floored): a loss that creeps up step by step, which no single step shows;
- its loss on two batches in a row exploded, or on the last accepted batch, measured for the save.

The floor of a loss is what one sample of the batch adds to the batch's mean loss when the model knows
nothing about it (cross-entropy: ln C / N for C classes and batch size N; BCE: ln 2 / N; MSE: none), so
one hard sample in a small batch is no explosion. docs/artifact.md has the margins measured on real runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

MODES = ("full", "loss", "off")
SPIKE = 20.0  # a loss over SPIKE x the largest recent loss explodes
DRIFT = 10.0  # a round whose recent mean loss is over DRIFT x its first loss diverged
UPDATE = 4.0  # an update over UPDATE x the parameter's (floored) norm explodes
GROWTH = 1000.0  # a parameter whose norm grew over GROWTH x in one round diverged
WINDOW = 32  # recent accepted losses kept
STOP_AFTER = 20  # this many rejected steps in a row end a round


def loss_floor(loss: dict[str, Any], classes: int | None, batch: int) -> float | None:
    """What one sample adds to a batch's mean loss when the model knows nothing about it (uniform
    probabilities); None where the loss has no such scale (MSE)."""
    name = loss.get("name")
    if name == "cross_entropy" and classes and classes > 1:
        return math.log(classes) / batch
    if name == "bce_with_logits":
        return math.log(2.0) / batch
    return None


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


@dataclass
class Baseline:
    """What a round is judged against: its first accepted loss, its last WINDOW accepted losses and its
    parameters' norms when it began. Saved in checkpoints, so a resumed round judges as it would have."""

    floor: float | None = None
    norms: list[float] = field(default_factory=list)  # of the trainable parameters, in state order
    first: float | None = None
    recent: list[float] = field(default_factory=list)

    def _floored(self, value: float) -> float:
        return max(value, self.floor or 0.0)

    def spike_ratio(self, loss: float) -> float | None:
        """The loss over the largest recent accepted loss (floored); None before the round's first step."""
        ref = self._floored(max(self.recent)) if self.recent else 0.0
        return loss / ref if ref > 0 else None

    def spike(self, loss: float) -> str | None:
        """Why a step with this loss must not be accepted, or None."""
        if not math.isfinite(loss):
            return f"loss is {loss} (non-finite)"
        ratio = self.spike_ratio(loss)
        if ratio is not None and ratio > SPIKE:
            return (f"loss {loss:.4g} is over {SPIKE:g} times the largest recent loss {loss / ratio:.4g} "
                    "(the learning rate is too high?)")
        return None

    def drift_ratio(self) -> float | None:
        """The mean of the recent accepted losses over the round's first (floored); None before it."""
        start = self._floored(self.first) if self.first is not None else 0.0
        return float(np.mean(self.recent)) / start if start > 0 else None

    def drift(self) -> str | None:
        """Why the round's recent losses say its state diverged, or None."""
        ratio = self.drift_ratio()
        if ratio is not None and ratio > DRIFT:
            return (f"the mean loss of the last {len(self.recent)} steps is {ratio:.3g} times the round's first "
                    f"loss {self._floored(self.first or 0.0):.4g} (limit {DRIFT:g}; the learning rate is too high?)")
        return None

    def accepted(self, loss: float) -> None:
        if self.first is None:
            self.first = loss
        self.recent = (self.recent + [loss])[-WINDOW:]

    def to_json(self) -> dict[str, Any]:
        return {"floor": self.floor, "norms": self.norms, "first": self.first, "recent": self.recent}

    @classmethod
    def from_json(cls, doc: Any) -> "Baseline":
        """The baseline saved by to_json; ValueError if it is not one."""
        ok = (isinstance(doc, dict) and all(doc.get(k) is None or _real(doc[k]) for k in ("floor", "first"))
              and all(isinstance(doc.get(k), list) and all(_real(v) for v in doc[k]) for k in ("norms", "recent")))
        if not ok:
            raise ValueError(f"guard: expected {{floor, norms, first, recent}}, got {doc!r:.80}")
        return cls(doc["floor"], list(doc["norms"]), doc["first"], list(doc["recent"])[-WINDOW:])


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """a . b over all elements (BLAS, no temporary array; half precision is widened first). Not finite
    when an element is not, or when the sum leaves the dtype's range (weights beyond ~1e19 in float32)."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype.itemsize < 4:
        a, b = a.astype(np.float32), b.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.dot(a, b))


def norms(params: Sequence[np.ndarray]) -> list[float]:
    """The L2 norm of each tensor (inf where it overflows, NaN where an element is NaN)."""
    return [math.sqrt(v) if v >= 0 else v for v in (_dot(p, p) for p in params)]


def _floors(old_norms: Sequence[float], sizes: Sequence[int]) -> list[float]:
    """Each norm, floored by the RMS of all the tensors times the square root of the tensor's size."""
    total = sum(sizes)
    rms = math.sqrt(sum(n * n for n in old_norms) / total) if total else 0.0
    return [max(n, rms * math.sqrt(s)) for n, s in zip(old_norms, sizes)]


def update_ratios(old: Sequence[np.ndarray], new: Sequence[np.ndarray]) -> list[float]:
    """Each parameter's update |new - old| over its floored norm: inf where the new value is not finite or
    beyond its dtype's range, 0 where there is no scale (every trainable parameter zero)."""
    old_sq = [_dot(o, o) for o in old]
    floors = _floors([math.sqrt(v) for v in old_sq], [o.size for o in old])
    out = []
    for o, n, oo, floor in zip(old, new, old_sq, floors):
        nn = _dot(n, n)
        if not math.isfinite(nn):
            out.append(math.inf)
        elif not 0.0 < floor < math.inf:
            out.append(0.0)
        else:  # |n - o|^2 from three dot products: no temporary the size of the tensor. Rounding makes it
            # inexact when the step is tiny beside the weights, which is far from the limit.
            out.append(math.sqrt(max(nn + oo - 2.0 * _dot(n, o), 0.0)) / floor)
    return out


def update_explodes(names: Sequence[str], old: Sequence[np.ndarray], new: Sequence[np.ndarray]) -> str | None:
    """Why the update old -> new of these parameters must not be accepted, or None."""
    for name, n, ratio in zip(names, new, update_ratios(old, new)):
        if ratio == math.inf:
            finite = bool(np.isfinite(n.min()) and np.isfinite(n.max()))
            return f"the update made {name!r} " + ("too large for its dtype" if finite else "non-finite")
        if ratio > UPDATE:
            return f"the update of {name!r} is {ratio:.3g} times its norm (limit {UPDATE:g}; the learning rate is too high?)"
    return None


def growth_ratios(params: Sequence[np.ndarray], start: Sequence[float]) -> list[float]:
    """Each parameter's norm over its floored norm `start` when the round began (0 where there was no
    scale; NaN or inf where the parameter is not finite). Empty for a baseline without norms."""
    if len(start) != len(params):
        return []  # a baseline from before this check existed: nothing to compare with
    floors = _floors(start, [p.size for p in params])
    return [now / floor if floor > 0 else 0.0 for now, floor in zip(norms(params), floors)]


def grown(names: Sequence[str], params: Sequence[np.ndarray], start: Sequence[float]) -> str | None:
    """Why these parameters, whose norms were `start` when the round began, diverged since, or None."""
    for name, ratio in zip(names, growth_ratios(params, start)):
        if not ratio <= GROWTH:  # NaN and inf included
            return f"the norm of {name!r} grew {ratio:.3g} times this round (limit {GROWTH:g})"
    return None
