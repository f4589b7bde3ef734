"""Train a compiled artifact on the device: numpy + onnxruntime, no torch.

The training state (trainable tensors and optimizer state) lives in a dict of arrays that is fed to
train_step.onnx and replaced by the graph's "new/..." outputs after each step.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

import numpy as np
import onnxruntime as ort

from . import safetensors
from .manifest import ArtifactError, read_manifest


def _session(path: str, threads: int | None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as ex:  # onnxruntime raises its own exception types; the file is what is wrong
        raise ArtifactError(f"{path}: onnxruntime cannot load it ({str(ex).splitlines()[0]})") from None


class Trainer:
    """Holds an artifact's sessions and training state; `step` runs one training step."""

    def __init__(self, directory: str, manifest: dict[str, Any], state: dict[str, np.ndarray], threads: int | None):
        self.directory = directory
        self.manifest = manifest
        self.state = state
        self.lr = float(manifest["lr"]["initial"])
        self.steps = 0
        self._train = _session(os.path.join(directory, manifest["graphs"]["train_step"]), threads)
        self._infer = _session(os.path.join(directory, manifest["graphs"]["infer"]), threads)
        self._data = manifest["data"][0]
        self._labels = manifest["labels"]
        self._state_io = [(s["name"], s["input"], s["output"]) for s in manifest["state"]]
        self._outputs = [self.manifest["outputs"]["loss"]] + [o for _, _, o in self._state_io]
        # onnxruntime lists inputs that have a default (the weights) apart from the required ones
        infer_inputs = {i.name for i in self._infer.get_inputs() + self._infer.get_overridable_initializers()}
        self._infer_weights = [(s["name"], s["input"]) for s in manifest["state"]
                               if s["role"] == "param" and s["input"] in infer_inputs]

    @classmethod
    def load(cls, directory: str, threads: int | None = None) -> "Trainer":
        manifest = read_manifest(directory)
        try:
            state, _ = safetensors.load(os.path.join(directory, manifest["state_file"]))
        except (OSError, ValueError) as ex:
            raise ArtifactError(f"{os.path.join(directory, manifest['state_file'])}: {ex}") from None
        for s in manifest["state"]:
            arr = state.get(s["name"])
            if arr is None or list(arr.shape) != s["shape"] or arr.dtype.name != s["dtype"]:
                raise ArtifactError(f"{directory}: state tensor {s['name']!r} missing or not {s['dtype']}{s['shape']}")
        return cls(directory, manifest, state, threads)

    # -- data checks ---------------------------------------------------------------------------
    def _check(self, spec: dict[str, Any], arr: Any, what: str) -> np.ndarray:
        arr = np.asarray(arr)
        want_shape, want_dtype = tuple(spec["shape"]), spec["dtype"]
        if arr.shape != want_shape:
            raise ValueError(f"{what}: expected shape {want_shape}, got {arr.shape}")
        if arr.dtype.name != want_dtype:
            if np.can_cast(arr.dtype, want_dtype, casting="same_kind"):
                arr = arr.astype(want_dtype)
            else:
                raise ValueError(f"{what}: expected dtype {want_dtype}, got {arr.dtype}")
        return arr

    # -- training ------------------------------------------------------------------------------
    def step(self, x: Any, y: Any, lr: float | None = None) -> float:
        """One training step on a batch; returns the loss. State is replaced only on success."""
        feeds = {self._data["name"]: self._check(self._data, x, "data"),
                 self._labels["name"]: self._check(self._labels, y, "labels"),
                 self.manifest["lr"]["name"]: np.asarray(self.lr if lr is None else lr, np.float32)}
        for name, inp, _ in self._state_io:
            feeds[inp] = self.state[name]
        outs = self._train.run(self._outputs, feeds)
        self.state = {name: out for (name, _, _), out in zip(self._state_io, outs[1:])}
        self.steps += 1
        return float(outs[0])

    def predict(self, x: Any) -> np.ndarray:
        feeds = {self._data["name"]: self._check(self._data, x, "data")}
        for name, inp in self._infer_weights:
            feeds[inp] = self.state[name]
        return self._infer.run(None, feeds)[0]

    def evaluate(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        """Accuracy of argmax predictions over (x, y) batches of the compiled batch size."""
        correct = total = 0
        for x, y in batches:
            pred = self.predict(x).argmax(axis=1)
            correct += int((pred == np.asarray(y)).sum())
            total += len(y)
        return {"accuracy": correct / max(total, 1), "samples": total}

    @property
    def batch_size(self) -> int:
        return int(self._data["shape"][0])


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int | None = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Seeded shuffled full batches; the last partial batch is dropped (the graph has a fixed batch size)."""
    order = np.arange(len(x)) if seed is None else np.random.default_rng(seed).permutation(len(x))
    for i in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]
