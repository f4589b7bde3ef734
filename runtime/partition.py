"""Client shards of one data set for federated runs (numpy only, seeded): iid, Dirichlet label skew, K labels each.

`partition(labels, clients, spec, seed)` returns one index array per client. What stays true: the shards are
disjoint and cover every sample, every client gets at least one, and the same (labels, clients, spec, seed)
gives the same shards on any machine.

- `iid`: a seeded permutation cut into near-equal parts.
- `dirichlet:ALPHA`: per class, the shares of the clients are drawn from Dirichlet(ALPHA) (small ALPHA: each
  client sees few classes; large: close to iid), the usual label-skew benchmark of federated learning.
- `labels:K`: each client holds K classes (assigned round-robin over a seeded class order, so every class is
  held: clients * K < classes is refused); a class is split evenly among its holders.

A client left empty by the draw takes one sample from the largest shard, so no client is idle.
"""
from __future__ import annotations

import numpy as np

from pockprop.errors import DataError, UsageError

KINDS = ("iid", "dirichlet:ALPHA", "labels:K")


def parse(spec: str) -> tuple[str, float]:
    """(kind, value) of `iid`, `dirichlet:ALPHA` (ALPHA > 0) or `labels:K` (K >= 1); UsageError otherwise."""
    kind, _, value = spec.partition(":")
    if kind == "iid" and not value:
        return "iid", 0.0
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if kind == "dirichlet" and number > 0:
        return kind, number
    if kind == "labels" and number >= 1 and number == int(number):
        return kind, number
    raise UsageError(f"--partition {spec!r}: expected one of {', '.join(KINDS)} (ALPHA > 0, K a positive integer)")


def partition(labels: np.ndarray, clients: int, spec: str, seed: int) -> list[np.ndarray]:
    """One sorted index array into `labels` per client (see the module docstring)."""
    kind, value = parse(spec)
    n = len(labels)
    if clients < 1:
        raise UsageError(f"--clients {clients}: need at least one client")
    if n < clients:
        raise DataError(f"{n} samples cannot give each of {clients} clients one")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), clients)]
    y = np.asarray(labels)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"--partition {spec}: needs one class index per sample, got labels {y.dtype}{list(y.shape)}")
    classes = np.unique(y)
    shards: list[list[np.ndarray]] = [[] for _ in range(clients)]
    if kind == "dirichlet":
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, value))) * len(idx)).astype(np.int64)[:-1]
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].append(part)
    else:
        k_each = int(value)
        if k_each > len(classes) or clients * k_each < len(classes):
            raise UsageError(f"--partition labels:{k_each}: {clients} clients holding {k_each} of the "
                             f"{len(classes)} classes each must cover every class (K <= classes <= clients * K)")
        order = rng.permutation(classes)
        holders: dict[int, list[int]] = {int(c): [] for c in classes}
        for k in range(clients):
            for j in range(k_each):
                holders[int(order[(k * k_each + j) % len(order)])].append(k)
        for c, who in holders.items():
            for k, part in zip(who, np.array_split(rng.permutation(np.flatnonzero(y == c)), len(who))):
                shards[k].append(part)
    out = [np.concatenate(s) if s else np.zeros(0, np.int64) for s in shards]
    _fill_empty(out)
    return [np.sort(s) for s in out]


def _fill_empty(shards: list[np.ndarray]) -> None:
    """Give each empty shard one sample of the (then) largest shard, in place."""
    for k, s in enumerate(shards):
        if len(s) == 0:
            big = max(range(len(shards)), key=lambda i: len(shards[i]))
            shards[k], shards[big] = shards[big][-1:], shards[big][:-1]
