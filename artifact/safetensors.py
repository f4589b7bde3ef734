"""Read and write the safetensors format with numpy alone (no pickle, no extra dependency).

Layout: 8-byte little-endian header size, a JSON header {name: {dtype, shape, data_offsets}}, then
the raw little-endian tensor bytes. Reading validates offsets, so a truncated or tampered file is an
error, never a wrong tensor.
"""
from __future__ import annotations

import json
import struct
from typing import IO, Iterator

import numpy as np

from pockprop.artifact.contract import BY_NAME, BY_SAFETENSORS
from pockprop.artifact.external import raw_bytes

_TO_ST = {name: d.safetensors for name, d in BY_NAME.items()}
_FROM_ST = {code: d.name for code, d in BY_SAFETENSORS.items()}


class SafetensorsError(ValueError):
    """The bytes are not a valid safetensors file."""


def chunks(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Iterator[bytes | memoryview]:
    """The file's bytes in order: its header, then each tensor's bytes (no copy of a C-ordered
    little-endian array), so a large state is written without being held twice."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    names, offset = sorted(tensors), 0
    for name in names:
        a = np.asarray(tensors[name])
        if a.dtype.name not in _TO_ST:
            raise TypeError(f"tensor {name!r}: dtype {a.dtype} not supported")
        header[name] = {"dtype": _TO_ST[a.dtype.name], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keep the data 8-byte aligned, as the reference writer does
    yield struct.pack("<Q", len(head)) + head
    for name in names:
        yield raw_bytes(tensors[name])


def dumps(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    return b"".join(chunks(tensors, metadata))


def loads(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if len(data) < 8:
        raise SafetensorsError("file shorter than its 8-byte header size")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise SafetensorsError(f"header size {n} exceeds the file ({len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as ex:
        raise SafetensorsError(f"header is not valid JSON: {ex}") from None
    body = memoryview(data)[8 + n:]
    meta = header.pop("__metadata__", None) or {}
    out, end_max = {}, 0
    for name, info in header.items():
        try:
            dtype = np.dtype(_FROM_ST[info["dtype"]]).newbyteorder("<")
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as ex:
            raise SafetensorsError(f"tensor {name!r}: malformed header entry ({ex})") from None
        if not 0 <= start <= end <= len(body) or end - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise SafetensorsError(f"tensor {name!r}: data offsets {start}..{end} do not fit its shape or the file")
        out[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
        end_max = max(end_max, end)
    if end_max != len(body):
        raise SafetensorsError(f"{len(body) - end_max} trailing bytes after the last tensor")
    return out, meta


def save(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    with open(path, "wb") as f:
        f.write(dumps(tensors, metadata))


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with open(path, "rb") as f:
        return loads(f.read())


def write_to(f: IO[bytes], tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    for chunk in chunks(tensors, metadata):
        f.write(chunk)
