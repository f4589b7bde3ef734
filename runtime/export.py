"""Export: the artifact's inference graph with the trained weights baked in, as a model any ONNX runtime loads.

A model whose initializers take at most `artifact.external.threshold()` bytes is one self-contained file.
A larger one cannot be one protobuf (2 GiB at most) and should not be built in memory: its initializers of
MIN_BYTES and more go to one file beside it, `<path>.data` (ONNX external data, named relative to the model,
as onnx and onnxruntime resolve it), written tensor by tensor. The frozen tensors are read from the
artifact's external files one file at a time, each through its sha256 check, so the export holds at most
one of those files (artifact/external.py bounds them) and the trained tensors.
"""
from __future__ import annotations

import os
from typing import Hashable

import numpy as np

from pockprop.artifact import external, onnx_wire
from pockprop.artifact.durable import write_atomic
from pockprop.artifact.manifest import Bundle
from pockprop.errors import ArtifactError


def write(path: str, bundle: Bundle, graph: str, trained: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """Write the bundle's graph file `graph` with the `trained` values as constants to `path`; returns `path`."""
    raw = bundle.files[graph]
    refs = bundle.external_refs(graph, raw)
    try:
        if len(raw) + sum(r.nbytes for r in refs) <= external.threshold():
            values = bundle.external_data(graph, raw) | {n: np.ascontiguousarray(a) for n, a in trained.items()}
            write_atomic(path, onnx_wire.replace_initializers(raw, values, drop_inputs=True, metadata=metadata))
            return path
        data = os.path.basename(path) + ".data"
        layout = external.Layout(lambda k: data, file_bytes=1 << 62)  # one file: onnx's convention for a model
        places: dict[str, np.ndarray | external.Placement] = {}
        for ref in sorted(refs, key=lambda r: (r.location, r.offset)):  # read each artifact file once, in order
            places[ref.name] = layout.place(ref.name, ref.nbytes)
        for name, value in trained.items():
            places[name] = layout.place(name, value.nbytes) if value.nbytes >= external.MIN_BYTES else value
        model = onnx_wire.replace_initializers(raw, places, drop_inputs=True, metadata=metadata)
        if data in layout.files:
            write_atomic(os.path.join(os.path.dirname(os.path.abspath(path)), data),
                         layout.chunks(data, _Reader(bundle, graph, {r.name: r for r in refs}, trained)))
        write_atomic(path, model)
    except onnx_wire.WireError as ex:
        raise ArtifactError(f"{bundle.where(graph)}: {ex}") from None
    return path


class _Reader:
    """Each tensor's value: a trained one as given, a frozen one from its artifact file, which is read
    (and its sha256 checked) when first needed and dropped when the next file is needed."""

    def __init__(self, bundle: Bundle, graph: str, refs: dict[str, onnx_wire.ExternalTensor],
                 trained: dict[str, np.ndarray]) -> None:
        self.bundle, self.graph, self.refs, self.trained = bundle, graph, refs, trained
        self.location: str | None = None
        self.blob = b""

    def __call__(self, name: Hashable) -> np.ndarray:
        if name in self.trained:
            return self.trained[name]  # type: ignore[index]
        ref = self.refs[name]  # type: ignore[index]
        if ref.location != self.location:
            self.blob = b""
            self.blob, self.location = self.bundle.files[ref.location], ref.location
        return ref.array(self.blob)
