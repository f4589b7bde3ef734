"""The model's data inputs on the device (manifest `data`): what callers give becomes the graph's feeds.

A model takes one or more inputs, in the manifest's order (its forward's arguments). Model-ready inputs
are given as a single array (a one-input model), a tuple/list in manifest order, or a dict by input name;
`arrange` puts them in order and `check` checks each against its spec:
- shape (batch first) and dtype kind: floats for a float input (cast to its dtype), integers or bools for
  an integer input, bools for a bool input;
- an integer input with a recorded `range` (token ids indexing an embedding) holds only values inside
  it, else a one-line DataError names the value and where it is: the step's gathers never read out of
  range.
`Columns` holds the raw samples of a several-input model in a Dataset: named arrays, one sample axis.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import numpy as np

from pockprop.artifact.contract import TensorSpec, is_integer
from pockprop.errors import DataError


class Columns:
    """Named arrays with one sample axis: the samples of a model's several inputs (indexable like one array)."""

    def __init__(self, arrays: Mapping[str, Any], source: str = "<arrays>"):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        lengths = {k: len(v) if v.ndim else None for k, v in self.arrays.items()}
        if not self.arrays or None in lengths.values() or len(set(lengths.values())) > 1:
            raise DataError(f"{source}: the inputs must be arrays with the same number of samples, got "
                            f"{ {k: list(v.shape) for k, v in self.arrays.items()} }")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, idx: Any) -> "Columns":
        return Columns({k: v[idx] for k, v in self.arrays.items()})

    def __repr__(self) -> str:
        return f"Columns({', '.join(f'{k}: {v.dtype}{list(v.shape)}' for k, v in self.arrays.items())})"

    def digest(self) -> str:
        """sha256 of the names, dtypes, shapes and bytes of every array."""
        h = hashlib.sha256()
        for k, v in self.arrays.items():
            h.update(f"{k}:{v.dtype.str}{v.shape}".encode())
            h.update(np.ascontiguousarray(v).data)
        return h.hexdigest()


def label(specs: Sequence[TensorSpec], spec: TensorSpec, what: str = "data") -> str:
    """How errors name an input: `what` alone for a one-input model, else with the input's name."""
    return what if len(specs) == 1 else f"{what} {spec.name!r}"


def arrange(given: Any, specs: Sequence[TensorSpec], what: str = "data") -> list[Any]:
    """The inputs in manifest order from a single array (one input), a tuple/list, or a dict by name."""
    names = [s.name for s in specs]
    if isinstance(given, Columns):
        given = given.arrays
    if isinstance(given, Mapping):
        missing = [n for n in names if n not in given]
        unknown = sorted(str(k) for k in given if k not in names)
        if missing or unknown:
            raise DataError(f"{what}: the model's inputs are {', '.join(names)}; "
                            + "; ".join(p for p in (f"missing {', '.join(missing)}" if missing else "",
                                                    f"unknown {', '.join(unknown)}" if unknown else "") if p))
        return [given[n] for n in names]
    if isinstance(given, (tuple, list)) and len(specs) > 1:
        if len(given) != len(specs):
            raise DataError(f"{what}: the model takes {len(specs)} inputs ({', '.join(names)}), got {len(given)}")
        return list(given)
    if len(specs) > 1:
        raise DataError(f"{what}: the model takes {len(specs)} inputs ({', '.join(names)}); give a tuple in "
                        "that order or a dict by name")
    return [given]


def _kind_ok(have: np.dtype, want: np.dtype) -> bool:
    if want.kind == "f":
        return have.kind == "f"
    if want.kind in "iu":
        return have.kind in "iub"
    return have.kind == want.kind


def check(a: Any, spec: TensorSpec, batch: int | None, what: str = "data") -> np.ndarray:
    """`a` as the graph's input `spec` (contiguous, its dtype), or DataError: shape (`batch` rows, or any
    number when None), dtype kind, and the recorded range of an integer input."""
    a = np.asarray(a)
    want = spec.shape[1:]
    if a.ndim != len(want) + 1 or a.shape[1:] != want or (batch is not None and len(a) != batch):
        shape = [batch if batch is not None else "N", *want]
        raise DataError(f"{what}: expected shape {shape} ({spec.dtype}), got {list(a.shape)}")
    dtype = np.dtype(spec.dtype)
    if a.dtype != dtype:
        if not _kind_ok(a.dtype, dtype):
            raise DataError(f"{what}: expected dtype {dtype}, got {a.dtype}")
    check_range(a, spec, what)
    return np.ascontiguousarray(a, dtype)


def check_range(a: np.ndarray, spec: TensorSpec, what: str = "data") -> None:
    """DataError if integer input `a` holds a value outside the spec's recorded range (before any cast)."""
    if spec.range is None or a.size == 0:
        return
    lo, hi = spec.range
    if a.min() < lo or a.max() > hi:
        at = tuple(int(i) for i in np.unravel_index(int(np.flatnonzero((a < lo) | (a > hi))[0]), a.shape))
        raise DataError(f"{what}: value {a[at]} at sample {at[0]}, position {list(at[1:])} is outside {lo}..{hi}, "
                        f"the indices the model takes in {spec.name!r} (e.g. the rows of its embedding)")


def example(specs: Sequence[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded batch of valid inputs by name: normal floats, integers inside the recorded range (0 or 1
    where none is recorded, as a mask), random bools."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        if is_integer(s.dtype):
            lo, hi = s.range if s.range is not None else (0, 1)
            out[s.name] = rng.integers(lo, hi, size=s.shape, endpoint=True).astype(s.dtype)
        elif s.dtype == "bool":
            out[s.name] = rng.random(s.shape) < 0.5
        else:
            out[s.name] = rng.standard_normal(s.shape).astype(s.dtype)
    return out
