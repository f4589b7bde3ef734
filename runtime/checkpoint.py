"""Checkpoints: one safetensors file per checkpoint directory, replaced atomically.

Layout: `DIR/checkpoint.safetensors` holds every state tensor (trainable tensors and optimizer state,
by state name) and, in the safetensors metadata under "pockprop_checkpoint", a JSON document: the
artifact it belongs to (sha256 of its manifest), step and rejected-step counters, the learning-rate
schedule and where it started, the data position of the current round, the round log, and a sha256
of the tensors. Writing goes through `durable.write_atomic`, so at every instant the directory holds
either the previous complete checkpoint or the new one.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from pockprop.artifact import safetensors
from pockprop.artifact.durable import remove_stale_temps, write_atomic
from pockprop.errors import CheckpointError

FILE = "checkpoint.safetensors"
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


def save(directory: str, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
    """Write the checkpoint atomically; CheckpointError if it cannot be written (the previous one stays)."""
    path = path_of(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as ex:
        raise CheckpointError(f"{directory}: cannot create the checkpoint directory ({ex.strerror})") from None
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
