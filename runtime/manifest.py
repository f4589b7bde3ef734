"""Artifact manifest: constants and validated loading (json + hashlib only: this runs on the device)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

FORMAT = "pockprop-artifact"
FORMAT_VERSION = 1
REQUIRED = ("format", "format_version", "graphs", "state_file", "data", "labels", "lr", "outputs", "state", "files")


class ArtifactError(Exception):
    """The artifact cannot be used: missing, truncated, tampered, or from an unknown format version."""


def read_manifest(directory: str) -> dict[str, Any]:
    """Load manifest.json and check every file it lists against its sha256."""
    path = os.path.join(directory, "manifest.json")
    if not os.path.isdir(directory):
        raise ArtifactError(f"{directory}: no such artifact directory")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing (not a pockprop artifact?)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as ex:
        raise ArtifactError(f"{path}: not valid JSON ({ex})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a pockprop artifact manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {version!r}; this runtime reads version {FORMAT_VERSION}")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ArtifactError(f"{path}: missing fields {', '.join(missing)}")
    for fname, digest in manifest["files"].items():
        fpath = os.path.join(directory, fname)
        try:
            with open(fpath, "rb") as f:
                actual = hashlib.sha256(f.read()).hexdigest()
        except FileNotFoundError:
            raise ArtifactError(f"{fpath}: missing") from None
        if actual != digest:
            raise ArtifactError(f"{fpath}: sha256 mismatch (truncated or modified)")
    return manifest
