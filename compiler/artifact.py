"""The compiled artifact and how it is written to disk (format described in docs/artifact.md).

A directory: train_step.onnx, infer.onnx, state.safetensors (trainable tensors + optimizer state),
manifest.json (what every graph input/output is, with shapes, dtypes and sha256 of each file).
No pickle anywhere.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from pockprop.artifact import safetensors
from pockprop.artifact.durable import write_atomic
from pockprop.artifact.manifest import FORMAT, FORMAT_VERSION

from pockprop.emit.onnx import IR_VERSION, OPSET
from pockprop.ir import Graph, TensorType
from pockprop.ops.registry import Need
from pockprop.compiler.optim import OptimizerSpec

VERSION = "0.1.0"


@dataclass
class StateEntry:
    """One tensor of training state: fed as graph input `input`, returned updated as `output`."""

    name: str
    role: str  # "param" or "optimizer"
    input: str
    output: str
    initial: np.ndarray
    param: str | None = None  # for optimizer slots: the parameter they belong to
    slot: str | None = None
    slice: Need | None = None  # a parameter updated on a slice: which part of the full tensor this is
    full_shape: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "role": self.role, "input": self.input, "output": self.output,
                             "shape": list(self.initial.shape), "dtype": self.initial.dtype.name}
        if self.param is not None:
            d["param"] = self.param
        if self.slot is not None:
            d["slot"] = self.slot
        if self.slice is not None:
            d["param"] = self.name
            d["slice"] = {"axis": self.slice.axis, "start": self.slice.start, "stop": self.slice.stop}
            d["full_shape"] = list(self.full_shape or ())
        return d


def _io(name: str, t: TensorType) -> dict[str, Any]:
    return {"name": name, "shape": list(t.shape), "dtype": t.dtype}


@dataclass
class Artifact:
    name: str
    train_model: onnx.ModelProto
    infer_model: onnx.ModelProto
    state: list[StateEntry]
    data_inputs: list[tuple[str, TensorType]]
    labels: tuple[str, TensorType]
    output: str
    loss: dict[str, Any]
    optimizer: OptimizerSpec
    trainable: list[str]
    parameter_count: dict[str, int] = field(default_factory=dict)
    train_graph: Graph | None = None  # the IR behind train_model, for reports and structural tests
    preprocess: dict[str, Any] = field(default_factory=dict)  # raw data -> model input, applied by the runtime
    scheme: Any = None  # the ResolvedScheme the artifact was compiled with, if any
    report: dict[str, Any] | None = None  # the compile report (compiler/report.py), saved as report.json
    source: dict[str, Any] | None = None  # how to rebuild the model (manifest "source", optional; pockprop search)

    @property
    def trainable_count(self) -> int:
        """Trainable elements: a parameter updated on a slice counts the slice only."""
        return sum(int(s.initial.size) for s in self.state if s.role == "param")

    def initial_state(self) -> dict[str, np.ndarray]:
        return {s.name: s.initial for s in self.state}

    def manifest(self) -> dict[str, Any]:
        total = sum(self.parameter_count.values())
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "pockprop_version": VERSION,
            "onnx": {"opset": OPSET, "ir_version": IR_VERSION},
            "model": self.name,
            "graphs": {"train_step": "train_step.onnx", "infer": "infer.onnx"},
            "state_file": "state.safetensors",
            "data": [_io(n, t) | ({"preprocess": self.preprocess} if self.preprocess else {})
                     for n, t in self.data_inputs],
            "labels": _io(*self.labels),
            "lr": {"name": "lr", "initial": self.optimizer.lr},
            "outputs": {"loss": "loss", "prediction": self.output},
            "state": [s.to_json() for s in self.state],
            "trainable": {"parameters": self.trainable, "count": self.trainable_count, "total": total},
            "scheme": None if self.scheme is None else {
                "name": self.scheme.name,
                "layers": [{"layer": u.layer.path, "op": u.layer.op, "block": u.layer.block, "update": u.kind}
                           for u in self.scheme.updates]},
            "loss": self.loss,
            "optimizer": self.optimizer.to_json(),
        } | ({"source": self.source} if self.source else {})

    def files(self) -> dict[str, bytes]:
        """Every file of the artifact directory by name, manifest.json (with the others' sha256) last."""
        blobs = {
            "train_step.onnx": self.train_model.SerializeToString(),
            "infer.onnx": self.infer_model.SerializeToString(),
            "state.safetensors": safetensors.dumps(self.initial_state()),
        }
        if self.report is not None:
            blobs["report.json"] = (json.dumps(self.report, indent=1) + "\n").encode()
        manifest = self.manifest()
        manifest["files"] = {n: hashlib.sha256(data).hexdigest() for n, data in blobs.items()}
        blobs["manifest.json"] = (json.dumps(manifest, indent=2) + "\n").encode()
        return blobs

    def save(self, directory: str) -> str:
        """Write the artifact directory (created if missing); returns its path."""
        os.makedirs(directory, exist_ok=True)
        for fname, data in self.files().items():  # manifest last: a directory with a manifest is complete
            write_atomic(os.path.join(directory, fname), data)
        return directory
