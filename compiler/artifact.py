"""The compiled artifact and how it is written to disk (format described in docs/artifact.md).

A directory: train_step.onnx, infer.onnx, state.safetensors (trainable tensors + optimizer state),
manifest.json (what every graph input/output is, with shapes, dtypes and sha256 of each file).
No pickle anywhere.

A large model's graphs keep their initializers in shared external-data files (weights-K.bin, see
artifact/external.py) when their distinct initializers take more than `external.threshold()` bytes;
smaller artifacts are single-file graphs. `save` streams every file to disk, hashing as it writes: a
tensor is never copied into a message or a buffer on the way.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import numpy as np
import onnx

from pockprop.artifact import contract, safetensors
from pockprop.artifact.contract import (AdapterSpec, Graphs, LearningRate, Manifest, Outputs, SliceSpec, SplitSpec,
                                       StateRole, StateSpec, TensorSpec)
from pockprop.artifact.durable import write_atomic
from pockprop.artifact.external import ExternalArrays

from pockprop.emit.onnx import IR_VERSION, OPSET
from pockprop.ir import Graph, TensorType
from pockprop.ops.registry import Need
from pockprop.compiler.optim import OptimizerSpec

VERSION = "0.1.0"


@dataclass
class StateEntry:
    """One tensor of training state as the compiler builds it: its manifest entry and its initial value."""

    spec: StateSpec
    initial: np.ndarray

    @classmethod
    def param(cls, name: str, output: str, initial: np.ndarray, need: Need, full_shape: tuple[int, ...]) -> "StateEntry":
        """A trainable tensor, fed as input `name`; `need` says which part of the full parameter it is."""
        sliced = None if need.is_full else SliceSpec(int(need.axis), need.start, need.stop)  # type: ignore[arg-type]
        return cls(StateSpec(name, StateRole.PARAM, name, output, tuple(initial.shape), initial.dtype.name,
                             param=None if sliced is None else name, slice=sliced,
                             full_shape=None if sliced is None else tuple(full_shape)), initial)

    @classmethod
    def slot(cls, param: str, slot: str, output: str, initial: np.ndarray) -> "StateEntry":
        """Optimizer slot `slot` (e.g. momentum) of parameter `param`."""
        name = contract.optimizer_slot(slot, param)
        return cls(StateSpec(name, StateRole.OPTIMIZER, name, output, tuple(initial.shape), initial.dtype.name,
                             param=param, slot=slot), initial)

    @classmethod
    def statistic(cls, name: str, output: str, initial: np.ndarray) -> "StateEntry":
        """A running statistic the step updates (compiler/batchnorm.py), fed as input `name`."""
        return cls(StateSpec(name, StateRole.STATISTIC, name, output, tuple(initial.shape), initial.dtype.name), initial)

    @classmethod
    def step(cls, output: str) -> "StateEntry":
        """The optimizer's step counter (a float32 scalar, 0 at first)."""
        return cls(StateSpec(contract.STEP, StateRole.OPTIMIZER, contract.STEP, output, (), "float32", slot="step"),
                   np.zeros((), np.float32))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def role(self) -> StateRole:
        return self.spec.role

    @property
    def input(self) -> str:
        return self.spec.input

    @property
    def output(self) -> str:
        return self.spec.output

    @output.setter
    def output(self, value: str) -> None:
        self.spec = replace(self.spec, output=value)


def _io(name: str, t: TensorType, preprocess: dict[str, Any] | None = None,
        valid: tuple[int, int] | None = None) -> TensorSpec:
    return TensorSpec(name, tuple(t.shape), t.dtype, preprocess or None, valid)


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
    input_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # integer inputs used as indices
    external: ExternalArrays | None = None  # the graphs' initializers kept in external files (large models)
    lowerings: dict[str, Any] | None = None  # the target profile used and each node's lowering (compiler/target.py)
    adapters: list[AdapterSpec] = field(default_factory=list)  # LoRA adapters (compiler/lora.py)
    split: SplitSpec | None = None  # one part of a split model (compiler/split.py)
    extra_models: dict[str, onnx.ModelProto] = field(default_factory=dict)  # a split part's vjp and apply graphs

    @property
    def trainable_count(self) -> int:
        """Trainable elements: a parameter updated on a slice counts the slice only."""
        return sum(int(s.initial.size) for s in self.state if s.role == StateRole.PARAM)

    def state_bytes(self) -> tuple[int, int]:
        """(bytes of the trainable tensors, bytes of the optimizer's per-tensor slots): what training holds
        beside inference, before gradients and activations (the scalar step counter is not counted)."""
        params = sum(int(s.initial.nbytes) for s in self.state if s.role == StateRole.PARAM)
        optim = sum(int(s.initial.nbytes) for s in self.state if s.role == StateRole.OPTIMIZER and s.initial.ndim)
        return params, optim

    def initial_state(self) -> dict[str, np.ndarray]:
        return {s.name: s.initial for s in self.state}

    def manifest(self) -> Manifest:
        """The manifest, without the files' hashes (`files()` adds them)."""
        total = sum(self.parameter_count.values())
        return Manifest(
            pockprop_version=VERSION,
            onnx={"opset": OPSET, "ir_version": IR_VERSION},
            model=self.name,
            graphs=Graphs(contract.TRAIN_STEP_FILE, contract.INFER_FILE),
            state_file=contract.STATE_FILE,
            data=[_io(n, t, self.preprocess if i == 0 else None, self.input_ranges.get(n))
                  for i, (n, t) in enumerate(self.data_inputs)],
            labels=_io(*self.labels),
            lr=LearningRate(contract.LR, self.optimizer.lr),
            outputs=Outputs(contract.LOSS, self.output),
            state=[s.spec for s in self.state],
            trainable={"parameters": self.trainable, "count": self.trainable_count, "total": total},
            scheme=None if self.scheme is None else {
                "name": self.scheme.name,
                "layers": [{"layer": u.layer.path, "op": u.layer.op, "block": u.layer.block, "update": u.kind}
                           for u in self.scheme.updates]},
            loss=self.loss,
            optimizer=self.optimizer.to_json(),
            source=self.source or None,
            lowerings=self.lowerings,
            adapters=list(self.adapters),
            split=self.split,
        )

    def contents(self) -> dict[str, Callable[[], Iterable[bytes | memoryview]]]:
        """Every file but manifest.json, by name, as a function giving its bytes in chunks (in order)."""
        out: dict[str, Callable[[], Iterable[bytes | memoryview]]] = {
            contract.TRAIN_STEP_FILE: lambda: [self.train_model.SerializeToString()],
            contract.INFER_FILE: lambda: [self.infer_model.SerializeToString()],
        }
        for fname, model in self.extra_models.items():
            out[fname] = lambda model=model: [model.SerializeToString()]
        external = self.external
        for location in external.files if external is not None else ():
            out[location] = lambda location=location: external.file_chunks(location)  # type: ignore[union-attr]
        out[contract.STATE_FILE] = lambda: safetensors.chunks(self.initial_state())
        if self.report is not None:
            out[contract.REPORT_FILE] = lambda: [(json.dumps(self.report, indent=1) + "\n").encode()]
        return out

    def files(self) -> dict[str, bytes]:
        """Every file of the artifact directory by name, manifest.json (with the others' sha256) last; in
        memory (`save` writes a large artifact without holding its files)."""
        blobs = {n: b"".join(chunks()) for n, chunks in self.contents().items()}
        manifest = replace(self.manifest(), files={n: hashlib.sha256(data).hexdigest() for n, data in blobs.items()})
        blobs[contract.MANIFEST_FILE] = manifest.dumps()
        return blobs

    def save(self, directory: str) -> str:
        """Write the artifact directory (created if missing), file by file, each streamed and hashed as it is
        written, manifest.json last (a directory with a manifest is complete); returns its path."""
        os.makedirs(directory, exist_ok=True)
        digests = {n: write_atomic(os.path.join(directory, n), chunks()) for n, chunks in self.contents().items()}
        write_atomic(os.path.join(directory, contract.MANIFEST_FILE), replace(self.manifest(), files=digests).dumps())
        return directory
