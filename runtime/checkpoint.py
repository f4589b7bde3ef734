"""Checkpoints: one safetensors file per checkpoint directory, replaced atomically.

Layout: `DIR/checkpoint.safetensors` holds every state tensor (trainable tensors and optimizer state,
by state name) and, in the safetensors metadata under "pockprop_checkpoint", a JSON document: the
artifact it belongs to (sha256 of its manifest), step and rejected-step counters, the learning-rate
schedule and where it started, the data position of the current round, the round log, and a sha256
of the tensors. Writing goes through `durable.write_atomic`, so at every instant the directory holds
either the previous complete checkpoint or the new one.

One process at a time writes a directory: `lock` holds an advisory lock (flock) on `DIR/.lock` while a
run trains on it, and a second run is refused with the holder's pid, host and command. The OS drops the
lock when its process dies, so a killed run never leaves a stale one; the file itself stays.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import stat
import sys
import time
from typing import Any, Iterator

import numpy as np

from pockprop.artifact import safetensors
from pockprop.artifact.durable import check_writable, remove_stale_temps, write_atomic
from pockprop.errors import CheckpointError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one run per directory is then up to the user
    fcntl = None  # type: ignore[assignment]

FILE = "checkpoint.safetensors"
LOCK_FILE = ".lock"
META_KEY = "pockprop_checkpoint"
FORMAT = "pockprop-checkpoint"
VERSION = 1


def path_of(directory: str) -> str:
    return os.path.join(directory, FILE)


def exists(directory: str) -> bool:
    """Whether `directory` holds a checkpoint (complete by construction: it only appears by rename)."""
    return os.path.isfile(path_of(directory))


def tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.data)
    return h.hexdigest()


def _makedirs(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as ex:
        raise CheckpointError(f"{directory}: cannot create the checkpoint directory ({ex.strerror})") from None


def save(directory: str, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
    """Write the checkpoint atomically; CheckpointError if it cannot be written (the previous one stays).
    The caller holds `lock(directory)` (a temp file found here is then a dead writer's, and removed)."""
    path = path_of(directory)
    _makedirs(directory)
    remove_stale_temps(directory, FILE)
    doc = {"format": FORMAT, "version": VERSION, **meta, "tensors_sha256": tensors_digest(tensors)}
    data = safetensors.dumps(tensors, {META_KEY: json.dumps(doc, separators=(",", ":"))})
    try:
        write_atomic(path, data)
    except OSError as ex:
        raise CheckpointError(str(ex.strerror or ex)) from None
    return path


def load(directory: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, metadata) of the checkpoint in `directory`, verified; CheckpointError naming the file."""
    path = path_of(directory)
    try:
        tensors, meta = safetensors.load(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint here") from None
    except (OSError, ValueError) as ex:
        raise CheckpointError(f"{path}: not a readable checkpoint ({ex})") from None
    try:
        doc = json.loads(meta[META_KEY])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: no pockprop checkpoint metadata (not written by pockprop?)") from None
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format {doc.get('format')!r} version {doc.get('version')!r}; "
                              f"this runtime reads {FORMAT} version {VERSION}")
    if doc.get("tensors_sha256") != tensors_digest(tensors):
        raise CheckpointError(f"{path}: tensor data does not match its recorded sha256 (corrupted)")
    return tensors, doc


def describe(directory: str) -> str:
    """What a failed or interrupted run leaves in `directory`, for its one-line message."""
    if not exists(directory):
        return f"no checkpoint in {directory}"
    try:
        _, meta = load(directory)
    except CheckpointError:
        return f"the last checkpoint, {path_of(directory)}, is kept"
    return f"the last checkpoint, {path_of(directory)} (step {meta.get('steps')}), is kept"


# -- one writer per directory ------------------------------------------------------------------------
_held: dict[str, list[int]] = {}  # real path of a locked directory -> [lock file descriptor, depth]


@contextlib.contextmanager
def lock(directory: str) -> Iterator[None]:
    """Hold `directory`'s lock (re-entrant within this process), creating the directory and checking that
    files can be written there; CheckpointError naming the holder if another process holds it."""
    _makedirs(directory)
    key = os.path.realpath(directory)
    if key in _held:
        _held[key][1] += 1
    else:
        _held[key] = [_acquire(directory), 1]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            os.close(_held.pop(key)[0])  # closing the descriptor releases the lock


def _acquire(directory: str) -> int:
    if fcntl is None:
        return os.open(os.devnull, os.O_RDONLY)
    path = os.path.join(directory, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as ex:
        raise CheckpointError(f"{directory}: cannot write here ({ex.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path}: not a regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(f"{directory}: in use by another training run ({_holder(fd)}); wait for it to "
                                  "end, or use another checkpoint directory") from None
        try:
            check_writable(path_of(directory))
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": int(time.time()),
                                      "command": " ".join(sys.argv)[:500]}).encode(), 0)
        except OSError as ex:
            raise CheckpointError(str(ex.strerror or ex)) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote into the lock file."""
    try:
        doc = json.loads(os.pread(fd, 4096, 0))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(doc["since"]))
        return f"pid {doc['pid']} on {doc['host']} since {since}: {doc['command']}"
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return "its details are not written yet"


# -- metadata written by runtime.loop, checked when a checkpoint is resumed -----------------------------
def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v: Any) -> bool:  # NaN included: with the guard off a loss can be NaN, and it is written as such
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _losses(v: Any) -> bool:
    return isinstance(v, list) and all(x is None or _number(x) for x in v)


def _metrics(v: Any) -> bool:  # multi-label metrics hold a list: the per-label accuracy
    return isinstance(v, dict) and all(isinstance(k, str) and (_number(x) or isinstance(x, list) and all(
        _number(e) for e in x)) for k, x in v.items())


PROGRESS = {"data": lambda v: isinstance(v, str), "source": lambda v: isinstance(v, str),
            "last_batch": lambda v: isinstance(v, str), "holdout": _number, "round": _count, "epochs": _count,
            "seed": _count, "samples": _count, "epoch": _count, "batch": _count, "loss_sum": _number,
            "loss_count": _count, "epoch_losses": _losses, "steps_at_start": _count, "rejected_at_start": _count,
            "before": _metrics, "finished": lambda v: isinstance(v, bool)}
ROUND = {"round": _count, "data": lambda v: isinstance(v, str), "samples": _count, "epochs": _count,
         "steps": _count, "rejected": _count, "epoch_losses": _losses, "seconds": _number}
ROUND_OPTIONAL = {"held_out": _count, "before": _metrics, "after": _metrics, "old_before": _metrics, "old": _metrics,
                  "kept": _count, "replay": _count}


def _check_fields(doc: Any, required: dict[str, Any], optional: dict[str, Any], what: str) -> None:
    if not isinstance(doc, dict):
        raise ValueError(f"{what}: expected an object, got {doc!r:.80}")
    for key, ok in required.items():
        if key not in doc:
            raise ValueError(f"{what}: no {key!r}")
    for key, ok in (required | optional).items():
        if key in doc and not ok(doc[key]):
            raise ValueError(f"{what}: {key!r} is {doc[key]!r:.80}")


def check_progress(progress: Any) -> dict[str, Any] | None:
    """The data position of the current round (None: no round yet); ValueError naming a bad field."""
    if progress is not None:
        _check_fields(progress, PROGRESS, {}, "progress")
    return progress


def check_rounds(rounds: Any) -> list[dict[str, Any]]:
    """The log of finished rounds; ValueError naming a bad field."""
    if rounds is None:
        return []
    if not isinstance(rounds, list):
        raise ValueError(f"rounds: expected a list, got {rounds!r:.80}")
    for i, r in enumerate(rounds):
        _check_fields(r, ROUND, ROUND_OPTIONAL, f"rounds[{i}]")
    return list(rounds)
