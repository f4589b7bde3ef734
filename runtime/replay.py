"""A replay buffer of past samples, kept on the device across continual rounds (µ-Trainer's rounds).

Reservoir sampling (Vitter's algorithm R): after a round, each of its samples is offered in turn; the
i-th sample ever offered is kept with probability capacity / i, replacing a uniformly chosen one, so
the buffer is always a uniform sample of everything seen so far. The random draws are seeded by
(seed, round), so a round's buffer is a pure function of the data and the seed.

Samples are stored model-ready (after the manifest's preprocessing), one array per data input, with
their labels in the graph's dtype. They travel inside the checkpoint file (`tensors`, `meta`), so the
buffer and the state always come from the same step: the file is replaced atomically as a whole.

Mixing: a round with a non-empty buffer trains on batches of `batch - k` new samples and k buffer
samples (k = round(fraction x batch), at least 1, fewer if the buffer is smaller), drawn without
replacement per batch by a generator seeded with (seed, round, epoch, batch): a resumed round draws
the same ones. The graph's batch size is fixed, so replayed samples take places in the batch rather
than being appended.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

PREFIX = "replay/"  # checkpoint tensor names: replay/x/<input>, replay/y


class ReplayBuffer:
    """Up to `capacity` past samples: x (input name -> (n, ...) array) and y (n, ...) labels; `seen`
    counts every sample ever offered."""

    def __init__(self, capacity: int, fraction: float = 0.25) -> None:
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"replay fraction must be in (0, 1), got {fraction}")
        self.capacity, self.fraction = capacity, fraction
        self.x: dict[str, np.ndarray] = {}
        self.y: np.ndarray | None = None
        self.seen = 0

    def __len__(self) -> int:
        return 0 if self.y is None else len(self.y)

    def offer(self, chunks: Iterable[tuple[dict[str, np.ndarray], np.ndarray]], seed: int, round_: int) -> None:
        """Offer a round's samples (model-ready, in order, in chunks; teacher logits as one more column
        when the step takes them) to the reservoir."""
        rng = np.random.default_rng([seed, round_, 0x5EED])
        for x, y in chunks:
            if self.y is None:
                self.x = {k: np.empty((0,) + v.shape[1:], v.dtype) for k, v in x.items()}
                self.y = np.empty((0,) + y.shape[1:], y.dtype)
            if set(x) != set(self.x):
                raise ValueError(f"replay: samples with columns {sorted(x)}, the buffer holds {sorted(self.x)}")
            take = min(self.capacity - len(self), len(y))  # filling up: the first samples go in as they are
            if take:
                self.x = {k: np.concatenate([self.x[k], v[:take]]) for k, v in x.items()}
                self.y = np.concatenate([self.y, y[:take]])
                self.seen += take
            for i in range(take, len(y)):
                self.seen += 1
                j = int(rng.integers(self.seen))
                if j < self.capacity:
                    for k, v in x.items():
                        self.x[k][j] = v[i]
                    self.y[j] = y[i]

    def per_batch(self, batch: int) -> int:
        """How many places of a batch the buffer fills (0 when empty)."""
        return min(max(1, int(round(self.fraction * batch))), len(self), batch - 1) if len(self) else 0

    def draw(self, k: int, seed: int, round_: int, epoch: int, batch: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        assert self.y is not None
        idx = np.random.default_rng([seed, round_, epoch, batch, 0xB0F]).choice(len(self), k, replace=False)
        return {n: v[idx] for n, v in self.x.items()}, self.y[idx]

    # -- in the checkpoint ---------------------------------------------------------------------
    def tensors(self) -> dict[str, np.ndarray]:
        if self.y is None:
            return {}
        return {f"{PREFIX}x/{k}": v for k, v in self.x.items()} | {f"{PREFIX}y": self.y}

    def meta(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "fraction": self.fraction, "seen": self.seen, "samples": len(self)}

    @classmethod
    def restore(cls, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> "ReplayBuffer":
        """The buffer a checkpoint holds; ValueError if its tensors and metadata disagree."""
        buf = cls(int(meta["capacity"]), float(meta["fraction"]))
        buf.seen = int(meta["seen"])
        if int(meta["samples"]):
            buf.y = tensors[f"{PREFIX}y"]
            buf.x = {k[len(PREFIX) + 2:]: v for k, v in tensors.items() if k.startswith(PREFIX + "x/")}
            if not buf.x or any(len(v) != len(buf.y) for v in buf.x.values()) or len(buf.y) != int(meta["samples"]):
                raise ValueError("replay buffer tensors do not match its metadata")
        return buf
