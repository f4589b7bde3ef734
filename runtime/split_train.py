"""Training a split model from the device's side: plain split steps and SFPrompt's local-loss steps, with
what crosses the network counted.

The device holds the first part (and, in a U-shaped split, the last) and calls the server's part through
any object with Part's methods: a local `pockprop.runtime.split.Part`, or `pockprop.runtime.remote.RemotePart`
over HTTP. Traffic counts the bytes of the tensors that cross between the device and the server (each
direction), not protocol framing.

Local loss (SFPrompt; Han et al. 2021): the device trains its first part through an auxiliary head of its
own (compiler/split.py compile_local_head) and never waits for a gradient from the server; it sends the
activation and the labels of one batch in `send_every`, and the server steps its part on them on its own.
With it, pruning before each round (runtime/prune.py scores, here on the auxiliary head's logits: nothing
leaves the device to score) trains on the informative fraction of the local data.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from pockprop.errors import DataError
from pockprop.runtime import prune
from pockprop.runtime.data import batch_indices
from pockprop.runtime.split import Part


class PartLike(Protocol):
    def forward(self, x: Any) -> np.ndarray: ...

    def step(self, x: Any, grad_out: Any = None, labels: Any = None, lr: float | None = None,
             want_grad: bool = True) -> tuple[np.ndarray | None, float | None]: ...


def nbytes(a: Any) -> int:
    """Bytes of a tensor, or of a dict / tuple of them, as it crosses the network."""
    if isinstance(a, dict):
        return sum(nbytes(v) for v in a.values())
    if isinstance(a, (list, tuple)):
        return sum(nbytes(v) for v in a)
    return int(np.asarray(a).nbytes)


@dataclass
class Traffic:
    """Bytes the device sent and received, and seconds it spent in its own parts (its compute)."""

    up: int = 0
    down: int = 0
    device_seconds: float = 0.0
    steps: int = 0
    server_steps: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"up": self.up, "down": self.down, "device_seconds": round(self.device_seconds, 3),
                "steps": self.steps, "server_steps": self.server_steps}


@dataclass
class _Clock:
    traffic: Traffic
    t0: float = field(default=0.0)

    def __enter__(self) -> "_Clock":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.traffic.device_seconds += time.perf_counter() - self.t0


def split_step(parts: Sequence[PartLike], x: Any, y: Any, traffic: Traffic, lr: float | None = None) -> float:
    """One step of a two-part (device, server with the loss) or U-shaped (device, server, device) split."""
    if len(parts) not in (2, 3):
        raise DataError(f"split: a device-server split has 2 or 3 parts, got {len(parts)}")
    device, server = parts[0], parts[1]
    with _Clock(traffic):
        a1 = device.forward(x)
    if len(parts) == 2:
        traffic.up += nbytes(a1) + nbytes(y)
        grad, loss = server.step(a1, labels=y, lr=lr)
    else:
        traffic.up += nbytes(a1)
        a2 = server.forward(a1)
        traffic.down += nbytes(a2)
        with _Clock(traffic):
            g2, loss = parts[2].step(a2, labels=y, lr=lr)
        traffic.up += nbytes(g2) if g2 is not None else 0
        grad = server.step(a1, grad_out=g2, lr=lr)[0] if g2 is not None else None
    traffic.server_steps += 1
    if grad is not None:
        traffic.down += nbytes(grad)
        with _Clock(traffic):
            device.step(x, grad_out=grad, lr=lr)
    traffic.steps += 1
    assert loss is not None
    return loss


def local_step(bottom: Part, head: Part, server: PartLike | None, x: Any, y: Any, traffic: Traffic,
               lr: float | None = None, server_lr: float | None = None) -> float:
    """One local-loss step: the device's part and its auxiliary head step on the head's loss; with a
    server, the activation (before this update) and the labels go to it and it steps its part alone,
    asked for no input gradient (want_grad=False): none is computed into the answer nor sent."""
    with _Clock(traffic):
        a = bottom.forward(x)
        grad, loss = head.step(a, labels=y, lr=lr)
        assert grad is not None
        bottom.step(x, grad_out=grad, lr=lr)
    if server is not None:
        traffic.up += nbytes(a) + nbytes(y)
        server.step(a, labels=y, lr=server_lr, want_grad=False)
        traffic.server_steps += 1
    traffic.steps += 1
    assert loss is not None
    return loss


def _rows(x: Any, idx: Any) -> Any:
    """Rows `idx` of model-ready inputs: an array, or a dict of arrays by input name."""
    return {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]


def pruned(bottom: Part, head: Part, x: Any, y: np.ndarray, fraction: float, kind: str,
           traffic: Traffic) -> np.ndarray:
    """Indices of the samples to keep this round, scored on the device by its own part and auxiliary head
    (runtime/prune.py) and kept per class for class labels: the data and its scores never leave the device."""
    if fraction >= 1.0:
        return np.arange(len(y))
    b = bottom.trainer.batch_size
    logits = []
    with _Clock(traffic):
        for i in range(0, len(y) - len(y) % b, b):
            logits.append(head.forward(bottom.forward(_rows(x, slice(i, i + b)))))
    z = np.concatenate(logits)
    score = prune.scores(head.trainer.manifest.loss, z, y[:len(z)], kind)
    if y.ndim != 1:
        return prune.keep(score, fraction)
    # per class: a head that is still poor scores whole classes as easy, and pruning them away starves the
    # server's part of those classes for the round
    y = y[:len(z)]
    kept = [np.flatnonzero(y == c)[prune.keep(score[y == c], fraction)] for c in np.unique(y)]
    return np.sort(np.concatenate(kept))


@dataclass
class FitResult:
    losses: list[float]  # the mean loss of each epoch (the local head's with a local loss)
    traffic: Traffic


def fit(parts: Sequence[PartLike], x: Any, y: np.ndarray, epochs: int, *, batch: int, lr: float | None = None,
        seed: int = 0, local_head: Part | None = None, send_every: int = 1, prune_keep: float = 1.0,
        prune_score: str = "el2n", schedule: Any = None, progress: Any = None) -> FitResult:
    """Train a split for `epochs` over model-ready inputs `x` (an array, or a dict of arrays by input name)
    and labels `y`, in shuffled full batches (order seeded). parts: the device's first part, the server's
    part, and in a U-shaped split the device's last part. With `local_head` (a two-part split): local-loss
    steps, one batch in `send_every` sent to the server, and from the second epoch pruning to `prune_keep`
    of each class (scored by the head: an untrained head's scores say nothing). `schedule`: an object with
    `lr(step)` (runtime.schedule.Schedule), else `lr` (None: each part's own). `progress(epoch, loss)` is
    called after each epoch."""
    if epochs < 1 or batch < 1 or send_every < 1:
        raise DataError("split: epochs, batch and send_every must be >= 1")
    if local_head is None and (prune_keep < 1.0 or send_every != 1):
        raise DataError("split: pruning and send_every apply to local-loss training (a local head)")
    if local_head is not None and len(parts) != 2:
        raise DataError("split: a local loss trains a two-part split (device, server)")
    n = len(y)
    traffic, rng, step, losses = Traffic(), np.random.default_rng(seed), 0, []
    bottom = parts[0]
    for epoch in range(epochs):
        idx = np.arange(n)
        if local_head is not None and epoch and prune_keep < 1.0:
            assert isinstance(bottom, Part)
            idx = pruned(bottom, local_head, x, y, prune_keep, prune_score, traffic)
        if len(idx) < batch:
            raise DataError(f"split: fewer samples ({len(idx)}) than one batch ({batch})")
        total = []
        for b in batch_indices(rng.permutation(len(idx)), batch):
            sel = idx[b]
            rate = schedule.lr(step) if schedule is not None else lr
            if local_head is None:
                total.append(split_step(parts, _rows(x, sel), y[sel], traffic, lr=rate))
            else:
                server = parts[1] if step % send_every == 0 else None
                total.append(local_step(bottom, local_head, server, _rows(x, sel), y[sel], traffic, lr=rate,  # type: ignore[arg-type]
                                        server_lr=rate))
            step += 1
        losses.append(float(np.mean(total)))
        if progress is not None:
            progress(epoch, losses[-1])
    return FitResult(losses, traffic)
