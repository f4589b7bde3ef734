"""ONNX external data: where the big initializers of a graph live when they do not fit in its protobuf.

A protobuf message cannot exceed 2 GiB, so the initializers of a large model go to side files, and the
graph names for each one a file, an offset and a length (ONNX external data). `Layout` decides where each
tensor goes; `chunks` produces a file's bytes in order, one tensor at a time, for a streaming writer
(durable.write_atomic hashes as it writes). The compiler fills a layout through `ExternalArrays`; the
runtime's export fills one with tensors it reads from the artifact (numpy only here: the device imports it).

What stays true:
- A key is placed once: the training step and the inference graph reading the same frozen weight (the same
  array) share its bytes, so an artifact holds each frozen weight once.
- Each tensor starts at an aligned offset (ALIGN_LARGE for tensors of LARGE bytes and more, so a reader can
  map it on any page size up to 64 KiB; ALIGN_SMALL otherwise); the gaps are zeros.
- A file holds at most `file_bytes` (FILE_BYTES by default), except a file that holds one tensor bigger
  than that alone: a packed artifact's members are at most 8 GiB (ustar) and a file is read whole to check
  its sha256, so files stay bounded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator

import numpy as np

FILE_BYTES = 1 << 30
MIN_BYTES = 1024  # smaller tensors stay in the graph (shape constants, scalars: onnxruntime reads them to plan)
LARGE, ALIGN_LARGE, ALIGN_SMALL = 1 << 20, 1 << 16, 64

THRESHOLD = 256 << 20
THRESHOLD_ENV = "POCKPROP_EXTERNAL_DATA_BYTES"


def threshold() -> int:
    """Initializer bytes above which a model keeps its initializers in external files (the compiler's
    artifact graphs, the runtime's exported model): THRESHOLD, or the environment variable
    POCKPROP_EXTERNAL_DATA_BYTES (tests force the external path with a low one).

    It must stay below protobuf's 2 GiB message limit; it is far lower because external data costs less at
    every stage even below that limit (docs/benchmarks.md, "Large models"): the compiler copies no tensor
    into a message, the two graphs share one copy of every frozen weight on disk, and onnxruntime loads a
    graph's external data with about half the peak memory of the same graph embedded. Every CNN of the zoo
    (at most tens of MB) stays single-file."""
    value = os.environ.get(THRESHOLD_ENV, "")
    try:
        return int(value) if value else THRESHOLD
    except ValueError:
        raise ValueError(f"{THRESHOLD_ENV} must be a number of bytes, got {value!r}") from None


@dataclass(frozen=True)
class Placement:
    """Where one tensor's bytes are: `length` bytes at `offset` of file `location`."""

    location: str
    offset: int
    length: int


def raw_bytes(array: np.ndarray) -> memoryview:
    """The tensor's bytes as ONNX stores them (C order, little-endian); no copy when it is already so."""
    a = np.asarray(array)
    a = np.require(a, a.dtype.newbyteorder("<"), "C").reshape(-1)
    return memoryview(a.view(np.uint8))


class Layout:
    """Tensors (by key) placed in consecutive files named `name(0)`, `name(1)`, ..."""

    def __init__(self, name: Callable[[int], str], file_bytes: int | None = None) -> None:
        self._name, self.file_bytes = name, FILE_BYTES if file_bytes is None else file_bytes
        self.files: dict[str, list[tuple[int, Hashable]]] = {}  # location -> [(offset, key)], by offset
        self.sizes: dict[str, int] = {}  # location -> bytes
        self._placed: dict[Hashable, Placement] = {}

    def place(self, key: Hashable, nbytes: int) -> Placement:
        """Where the tensor `key` of `nbytes` bytes goes (where it went, if placed before)."""
        if key in self._placed:
            return self._placed[key]
        align = ALIGN_LARGE if nbytes >= LARGE else ALIGN_SMALL
        location = next(reversed(self.files), None)
        offset = 0 if location is None else -(-self.sizes[location] // align) * align
        if location is None or (offset + nbytes > self.file_bytes and self.files[location]):
            location, offset = self._name(len(self.files)), 0
            self.files[location] = []
        self.files[location].append((offset, key))
        self.sizes[location] = offset + nbytes
        self._placed[key] = Placement(location, offset, nbytes)
        return self._placed[key]

    def chunks(self, location: str, fetch: Callable[[Hashable], Any]) -> Iterator[bytes | memoryview]:
        """The bytes of file `location`, tensor by tensor; `fetch(key)` gives a tensor's array (or bytes)."""
        pos = 0
        for offset, key in self.files[location]:
            if offset > pos:
                yield bytes(offset - pos)
            data = fetch(key)
            data = data if isinstance(data, (bytes, memoryview)) else raw_bytes(data)
            if len(data) != self._placed[key].length:
                raise ValueError(f"tensor {key!r}: {len(data)} bytes, {self._placed[key].length} were placed")
            yield data
            pos = offset + len(data)


class ExternalArrays(Layout):
    """A layout of numpy arrays, keyed by identity (the same array object is stored once); keeps them alive."""

    def __init__(self, name: Callable[[int], str], file_bytes: int | None = None) -> None:
        super().__init__(name, file_bytes)
        self.arrays: dict[int, np.ndarray] = {}

    def add(self, array: np.ndarray) -> Placement:
        self.arrays.setdefault(id(array), array)
        return self.place(id(array), array.nbytes)

    def file_chunks(self, location: str) -> Iterator[bytes | memoryview]:
        return self.chunks(location, self.arrays.__getitem__)
