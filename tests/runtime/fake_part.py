"""A numpy stand-in for runtime.split.Part (same `info`, `trainer`, `forward`, `step`, and with `private` its
`gradient_specs`, `vjp`, `apply`): a linear layer y = x W + b with its exact gradients and plain SGD,
optionally ending in softmax cross-entropy; vjp then apply computes exactly what step does. The transport
tests run it on both sides, so a remote step can be compared bit for bit with a local one."""
from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace
from typing import Any

import numpy as np

from pockprop.artifact.contract import TensorSpec
from pockprop.errors import CheckpointError, DataError
from pockprop.runtime import checkpoint
from pockprop.runtime.remote import RemoteInfo  # the fields of runtime.split.SplitInfo


class FakeTrainer:
    """W and b, a step counter, checkpoints through runtime.checkpoint (atomic, locked)."""

    def __init__(self, w: np.ndarray, b: np.ndarray, labels: TensorSpec | None, digest: str):
        self.w, self.b, self.steps, self.digest = w, b, 0, digest
        self.manifest = SimpleNamespace(labels=labels)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"w": self.w.copy(), "b": self.b.copy()}

    def save_checkpoint(self, directory: str) -> str:
        with checkpoint.lock(directory):
            return checkpoint.save(directory, self.state_dict(), {"artifact": self.digest, "steps": self.steps})

    def resume(self, directory: str) -> dict[str, Any]:
        tensors, meta = checkpoint.load(directory)
        if meta.get("artifact") != self.digest:
            raise CheckpointError(f"{directory}: made for another part")
        self.w, self.b, self.steps = tensors["w"], tensors["b"], int(meta["steps"])
        return meta


class FakePart:
    """Part `index` of `parts`: input (batch, n_in) -> output (batch, n_out); with `labels`, the output is
    the logits of a softmax cross-entropy over int64 labels (batch,) and the part has no boundary out."""

    def __init__(self, index: int = 1, parts: int = 3, n_in: int = 6, n_out: int = 5, batch: int = 4,
                 labels: bool = False, seed: int = 0, lr: float = 0.1, split_id: str = "fake-split",
                 private: bool = False):
        rng = np.random.default_rng(seed)
        w = rng.standard_normal((n_in, n_out)).astype(np.float32)
        b = rng.standard_normal(n_out).astype(np.float32)
        self.config = dict(index=index, parts=parts, n_in=n_in, n_out=n_out, batch=batch, labels=labels, seed=seed,
                           lr=lr, split_id=split_id, private=private)
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()
        boundary_in = TensorSpec(f"act{index}", (batch, n_in), "float32") if index > 0 else None
        boundary_out = None if labels else TensorSpec(f"act{index + 1}", (batch, n_out), "float32")
        self.info = RemoteInfo(index, parts, split_id, digest, boundary_in, boundary_out, labels)
        self.trainer = FakeTrainer(w, b, TensorSpec("labels", (batch,), "int64") if labels else None, digest)
        self.lr, self.private = lr, private

    @classmethod
    def load(cls, path: str, threads: int | None = None) -> "FakePart":
        """A part from a JSON file of its constructor's arguments (the CLI test's "artifact")."""
        with open(path) as f:
            return cls(**json.load(f))

    def save(self, path: str) -> str:
        with open(path, "w") as f:
            json.dump(self.config, f)
        return path

    def forward(self, x: Any) -> np.ndarray:
        t = self.trainer
        return (np.asarray(x, np.float32) @ t.w + t.b).astype(np.float32)

    def step(self, x: Any, grad_out: Any = None, labels: Any = None, lr: float | None = None,
             want_grad: bool = True) -> tuple[np.ndarray | None, float | None]:
        x = np.asarray(x, np.float32)
        y = self.forward(x)
        loss = None
        if self.info.has_labels:
            labels = np.asarray(labels)
            if labels.min() < 0 or labels.max() >= y.shape[1]:
                raise DataError(f"labels: values must lie in [0, {y.shape[1] - 1}]")
            with np.errstate(all="ignore"):  # a diverged run: the loss says so (inf or NaN)
                p = np.exp(y - y.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                loss = float(-np.log(p[np.arange(len(labels)), labels]).mean())
            p[np.arange(len(labels)), labels] -= 1
            grad_out = (p / len(labels)).astype(np.float32)
        g = np.asarray(grad_out, np.float32)
        t, rate = self.trainer, np.float32(self.lr if lr is None else lr)
        grad_in = None if self.info.boundary_in is None or not want_grad else (g @ t.w.T).astype(np.float32)
        self._update(x.T @ g, g.sum(axis=0), rate)
        return grad_in, loss

    def _update(self, gw: np.ndarray, gb: np.ndarray, rate: np.float32) -> None:
        t = self.trainer
        t.w = (t.w - rate * gw).astype(np.float32)
        t.b = (t.b - rate * gb).astype(np.float32)
        t.steps += 1

    def gradient_specs(self) -> dict[str, TensorSpec] | None:
        t = self.trainer
        return {"w": TensorSpec("w", t.w.shape, "float32"), "b": TensorSpec("b", t.b.shape, "float32")} \
            if self.private else None

    def vjp(self, x: Any, grad_outs: Any) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        x, t = np.asarray(x, np.float32), self.trainer
        return [((g @ t.w.T).astype(np.float32), {"w": (x.T @ g).astype(np.float32), "b": g.sum(axis=0)})
                for g in (np.asarray(g, np.float32) for g in grad_outs)]

    def apply(self, grads: dict[str, Any], lr: float | None = None) -> None:
        self._update(grads["w"], grads["b"], np.float32(self.lr if lr is None else lr))
