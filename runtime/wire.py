"""The transport's message format: named tensors and a small JSON document in one byte string.

A message is `MAGIC` (4 bytes), the length of its JSON header (uint32, little-endian), the header, then the
tensors' raw bytes, little-endian, C order, one after another in the header's order:

    {"meta": {...}, "tensors": [{"name": "x", "dtype": "float32", "shape": [4, 8]}, ...]}

Only the dtypes of the artifact contract's table travel (no object arrays, nothing pickled), and decoding
never trusts a length: every tensor's size follows from its shape and dtype, and the sum must equal what is
left of the message exactly. A message that breaks any of this raises WireError naming what is wrong.
"""
from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from pockprop.artifact.contract import BY_NAME

MAGIC = b"PPT1"
CONTENT_TYPE = "application/x-pockprop-tensors"
MAX_HEADER = 64 * 1024  # bytes of JSON: names, shapes and a few scalars, never data
MAX_DIMS = 8
PARAM = "param/"  # a trained tensor's gradient travels as PARAM + its name (a `vjp` answer, an `apply` request)
_PREFIX = struct.Struct("<4sI")


class WireError(ValueError):
    """A message that is not a well-formed tensor message (the text says what is wrong)."""


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    """The size of a tensor's data on the wire."""
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def encode(meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> bytes:
    """One message: `meta` (JSON-serialisable) and `tensors` in insertion order."""
    specs, chunks = [], []
    for name, value in tensors.items():
        a = np.asarray(value)
        if a.dtype.name not in BY_NAME:
            raise WireError(f"{name}: dtype {a.dtype} cannot travel (one of {sorted(BY_NAME)})")
        specs.append({"name": name, "dtype": a.dtype.name, "shape": list(a.shape)})
        chunks.append(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())
    header = json.dumps({"meta": meta, "tensors": specs}, separators=(",", ":"), allow_nan=False).encode()
    if len(header) > MAX_HEADER:
        raise WireError(f"header of {len(header)} bytes, over the {MAX_HEADER}-byte limit")
    return b"".join([_PREFIX.pack(MAGIC, len(header)), header, *chunks])


def _spec(entry: Any) -> tuple[str, str, tuple[int, ...]]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise WireError(f"tensor entry {entry!r:.80}: expected an object with a name")
    name, dtype, shape = entry["name"], entry.get("dtype"), entry.get("shape")
    if dtype not in BY_NAME:
        raise WireError(f"{name}: dtype {dtype!r:.40} is not one of {sorted(BY_NAME)}")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)):
        raise WireError(f"{name}: bad shape {shape!r:.80}")
    return name, dtype, tuple(shape)


def decode(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, tensors) of a message; WireError if it is malformed. The arrays are copies (writable, native
    byte order)."""
    if len(data) < _PREFIX.size:
        raise WireError(f"{len(data)} bytes: too short for a message")
    magic, size = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"not a pockprop tensor message (starts with {magic!r})")
    if size > MAX_HEADER or _PREFIX.size + size > len(data):
        raise WireError(f"header length {size} does not fit the message ({len(data)} bytes)")
    try:
        doc = json.loads(data[_PREFIX.size:_PREFIX.size + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as ex:
        raise WireError(f"header is not JSON ({ex})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("meta"), dict) or not isinstance(doc.get("tensors"), list):
        raise WireError("header: expected {\"meta\": {...}, \"tensors\": [...]}")
    specs = [_spec(e) for e in doc["tensors"]]
    names = [s[0] for s in specs]
    if len(set(names)) != len(names):
        raise WireError(f"tensor names repeat: {names}")
    offset = _PREFIX.size + size
    if offset + sum(nbytes(shape, dtype) for _, dtype, shape in specs) != len(data):
        raise WireError(f"{len(data) - offset} bytes of tensor data; the header describes "
                        f"{sum(nbytes(shape, dtype) for _, dtype, shape in specs)}")
    tensors = {}
    for name, dtype, shape in specs:
        n = nbytes(shape, dtype)
        raw = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"), count=n // np.dtype(dtype).itemsize,
                            offset=offset)
        tensors[name] = raw.astype(np.dtype(dtype), copy=True).reshape(shape)
        offset += n
    return doc["meta"], tensors
