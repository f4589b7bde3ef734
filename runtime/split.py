"""Split training on the device runtime: one part of a split model (compiler/split.py), and the parts run in turn.

A `Part` is a Trainer over one part's artifact. `forward` gives the activation the next part takes (the
part's inference graph with the current weights); `step` runs the part's training step on the same input
with the gradient of its output (or, for the last part, the labels) and returns the gradient of its input
where the part has one (a part above a trained one), so the caller hands it to the part below. The step
recomputes the part's forward rather than keeping it between the two calls: a part holds no activations
while it waits for the parts above it.

`SplitModel` runs all parts in one process, in order: the reference that a remote split (runtime/serve.py,
runtime/remote.py) must equal, and the way to train a split locally. Stepping it equals the unsplit
step (tests/compiler/test_split.py: 1e-5).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pockprop.artifact.contract import (INPUT_GRADIENT, LR, OUTPUT_GRADIENT, SplitSpec, StateRole, TensorSpec,
                                       gradient_of, updated)
from pockprop.errors import ArtifactError, DataError
from pockprop.runtime.trainer import Trainer

INDEX_FILE = "split.json"


@dataclass(frozen=True)
class SplitInfo:
    """Where a part sits (the manifest's split record) and what crosses its cuts."""

    spec: SplitSpec
    digest: str  # sha256 of the part's manifest.json: the artifact a peer expects
    boundary_in: TensorSpec | None  # the activation it receives (None: the model's data)
    boundary_out: TensorSpec | None  # the activation it sends (None: the last part, which has the loss)

    @property
    def index(self) -> int:
        return self.spec.index

    @property
    def parts(self) -> int:
        return self.spec.parts

    @property
    def split_id(self) -> str:
        return self.spec.id

    @property
    def has_labels(self) -> bool:
        """The loss is in this part: its step takes the labels, not the gradient of its output."""
        return self.boundary_out is None


class Part:
    """One part of a split model on the device runtime (see the module doc)."""

    def __init__(self, trainer: Trainer) -> None:
        m = trainer.manifest
        if m.split is None:
            raise ArtifactError(f"{trainer.path}: not a part of a split model (compile with --split-at)")
        self.trainer = trainer
        last = m.split.index == m.split.parts - 1
        if last == (m.loss.get("name") == OUTPUT_GRADIENT):
            raise ArtifactError(f"{trainer.path}: split part {m.split.index} of {m.split.parts} with loss "
                                f"{m.loss.get('name')!r}")
        out = None if last else TensorSpec(m.outputs.prediction, m.labels.shape, m.labels.dtype)
        self.info = SplitInfo(m.split, trainer.digest, m.data[0] if m.split.index else None, out)
        self._sessions: tuple[Any, Any] | None = None  # the vjp and apply graphs' sessions, made on first use

    @classmethod
    def load(cls, path: str, threads: int | None = None) -> "Part":
        return cls(Trainer.load(path, threads=threads))

    def forward(self, x: Any) -> np.ndarray:
        """The part's output on `x` with the current weights: the activation the next part takes."""
        return self.trainer.predict(x)

    def step(self, x: Any, grad_out: Any = None, labels: Any = None, lr: float | None = None,
             want_grad: bool = True) -> tuple[np.ndarray | None, float | None]:
        """One training step: (the gradient of the part's input or None where it has none or `want_grad` is
        False, the loss or None below the last part). `grad_out`: the gradient of the part's output (every
        part but the last); `labels`: the last part's. DataError for a missing, extra or malformed one, or a rejected step (the
        guard's reason: the state is unchanged, and the caller must not pass a gradient down)."""
        if self.info.has_labels:
            if labels is None or grad_out is not None:
                raise DataError("split: the last part steps on the labels (no output gradient)")
            y = labels
        else:
            if grad_out is None or labels is not None:
                raise DataError(f"split: part {self.info.index} steps on the gradient of its output (no labels)")
            y = np.asarray(grad_out)
            if not np.all(np.isfinite(y)):
                raise DataError(f"split: the output gradient of part {self.info.index} holds NaN or Inf")
        loss = self.trainer.step(x, y, lr=lr)
        if loss is None:
            raise DataError(f"split: part {self.info.index} rejected the step: {self.trainer.last_rejection}")
        grad = self.trainer.input_gradient() if want_grad and self.info.spec.input_gradient else None
        return grad, (loss if self.info.has_labels else None)

    # -- private backpropagation (runtime/private_backprop.py): gradients without an update, and the update --
    def _gradient_sessions(self) -> tuple[Any, Any]:
        spec = self.info.spec
        if spec.vjp is None or spec.apply is None:
            raise ArtifactError(f"{self.trainer.path}: this part has no gradient graphs (compile the split with "
                                "--private-backprop)")
        if self._sessions is None:
            self._sessions = (self.trainer.session(spec.vjp), self.trainer.session(spec.apply))
        return self._sessions

    def gradient_specs(self) -> dict[str, TensorSpec] | None:
        """The trained tensors that `vjp` differentiates and `apply` updates, by name (shape, dtype); None for
        a part without gradient graphs."""
        if self.info.spec.vjp is None:
            return None
        return {e.name: TensorSpec(e.name, tuple(e.shape), e.dtype)
                for e in self.trainer.manifest.state if e.role == StateRole.PARAM}

    def vjp(self, x: Any, grad_outs: Sequence[Any]) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """For each output gradient, the gradient of the part's input and of each trained tensor at the current
        state, updating nothing: (input gradient, {parameter: gradient}) per output gradient, in order."""
        vjp, _ = self._gradient_sessions()
        t = self.trainer
        feeds = t._model_inputs(x, t.batch_size)
        state = t.state_dict()
        params = [e for e in t.manifest.state if e.role == StateRole.PARAM]
        feeds |= {e.input: state[e.name] for e in params}
        names = [INPUT_GRADIENT] + [gradient_of(e.name) for e in params]
        out = []
        for g in grad_outs:
            g = np.ascontiguousarray(g, dtype=np.dtype(t.manifest.labels.dtype))
            if g.shape != tuple(t.manifest.labels.shape) or not np.all(np.isfinite(g)):
                raise DataError(f"split: an output gradient must be finite, shaped {list(t.manifest.labels.shape)}; "
                                f"got {list(g.shape)}")
            res = vjp.run(names, feeds | {t.manifest.labels.name: g})
            out.append((res[0], {e.name: r for e, r in zip(params, res[1:])}))
        return out

    def apply(self, grads: dict[str, Any], lr: float | None = None) -> None:
        """One optimizer update of the part's trained tensors with the given gradients (one per trained
        tensor, shaped like it); the optimizer state advances as a step would. DataError, and nothing
        changes, for a missing, extra, misshapen or non-finite gradient, or a non-finite update."""
        _, apply = self._gradient_sessions()
        t = self.trainer
        params = {e.name: e for e in t.manifest.state if e.role == StateRole.PARAM}
        if set(grads) != set(params):
            raise DataError(f"split: apply needs one gradient per trained tensor: {sorted(params)}")
        state = t.state_dict()
        feeds = {e.input: state[e.name] for e in t.manifest.state} | {LR: np.array(t.lr if lr is None else lr, np.float32)}
        for name, e in params.items():
            g = np.ascontiguousarray(grads[name], dtype=np.dtype(e.dtype))
            if g.shape != tuple(e.shape) or not np.all(np.isfinite(g)):
                raise DataError(f"split: the gradient of {name} must be finite, shaped {list(e.shape)}")
            feeds[gradient_of(name)] = g
        res = apply.run([updated(e.name) for e in t.manifest.state], feeds)
        new = {e.name: r for e, r in zip(t.manifest.state, res)}
        if not all(np.all(np.isfinite(v)) for v in new.values()):
            raise DataError("split: the update is not finite; the state is unchanged")
        t.load_state(new)
        t.steps += 1


def load_index(directory: str) -> dict[str, Any]:
    """split.json of a split directory (compiler/split.py save_split), checked; ArtifactError if unusable."""
    path = os.path.join(directory, INDEX_FILE)
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError) as ex:
        raise ArtifactError(f"{path}: not a split index ({ex})") from None
    parts = doc.get("parts") if isinstance(doc, dict) else None
    if not isinstance(parts, list) or len(parts) < 2 or doc.get("format") != "pockprop-split" or not all(
            isinstance(p, dict) and isinstance(p.get("path"), str) and "/" not in p["path"] and
            not p["path"].startswith(".") for p in parts):
        raise ArtifactError(f"{path}: not a split index (format pockprop-split, parts [{{path, ...}}])")
    return doc


class SplitModel:
    """Every part of a split in one process: `step` runs forward through the parts, the last part's step
    on the labels, then each part's step below it on the gradient handed down."""

    def __init__(self, parts: Sequence[Part]) -> None:
        ids = {p.info.split_id for p in parts}
        if len(ids) != 1 or [p.info.index for p in parts] != list(range(len(parts))) or \
                any(p.info.parts != len(parts) for p in parts):
            raise ArtifactError("split: these parts are not one split model's, in order")
        self.parts = list(parts)

    @classmethod
    def load(cls, directory: str, threads: int | None = None) -> "SplitModel":
        doc = load_index(directory)
        parts = [Part.load(os.path.join(directory, p["path"]), threads) for p in doc["parts"]]
        for p, entry in zip(parts, doc["parts"]):
            if entry.get("manifest_sha256") not in (None, p.info.digest):
                raise ArtifactError(f"{directory}/{entry['path']}: its manifest is not the one split.json lists")
        return cls(parts)

    def forward(self, x: Any) -> list[Any]:
        """Each part's input, the model's input first, then the model's output: [x, a1, ..., out]."""
        acts = [x]
        for p in self.parts:
            acts.append(p.forward(acts[-1]))
        return acts

    def predict(self, x: Any) -> np.ndarray:
        return self.forward(x)[-1]

    def step(self, x: Any, labels: Any, lr: float | None = None) -> float:
        """One training step of the whole split model; the loss."""
        acts = self.forward(x)[:-1]
        grad, loss = self.parts[-1].step(acts[-1], labels=labels, lr=lr)
        for p, a in zip(reversed(self.parts[:-1]), reversed(acts[:-1])):
            if grad is None:  # nothing below trains
                break
            grad, _ = p.step(a, grad_out=grad, lr=lr)
        assert loss is not None
        return loss
