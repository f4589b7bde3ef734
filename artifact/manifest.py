"""Artifact loading: verified reading of an artifact directory or packed file, and `pack`.

An artifact is a directory, or the same files packed into one uncompressed tar (`pockprop pack`) for
copying to a device. Loading checks the sha256 of every file the manifest lists (artifact/contract.py
defines the manifest). A packed artifact's files are kept as the bytes that were checked. A directory's
are not held at all: each is read when used and its sha256 checked again on that read, so what is
validated is still exactly what gets used, while a trainer does not keep every file's bytes alive (the
weights are in both ONNX files).
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from pockprop.artifact.contract import MANIFEST_FILE, Manifest
from pockprop.artifact.durable import write_atomic
from pockprop.errors import ArtifactError

__all__ = ["ArtifactError", "Bundle", "open_artifact", "read_manifest", "pack"]


@dataclass
class Bundle:
    """A loaded artifact: its manifest and the verified bytes of every file it lists."""

    path: str
    manifest: Manifest
    files: Mapping[str, bytes] = field(repr=False)  # a directory's: DirectoryFiles, read on use
    manifest_bytes: bytes = field(repr=False, default=b"")

    @property
    def digest(self) -> str:
        """sha256 of manifest.json, which lists every file's hash: identifies the artifact."""
        return hashlib.sha256(self.manifest_bytes).hexdigest()

    def where(self, name: str) -> str:
        """How to name one of its files in a message."""
        return os.path.join(self.path, name) if os.path.isdir(self.path) else f"{self.path}:{name}"


def _fail(path: str, msg: str) -> ArtifactError:
    return ArtifactError(f"{path}: {msg}")


# -- loading --------------------------------------------------------------------------------------
class DirectoryFiles(Mapping[str, bytes]):
    """The files of an artifact directory, each read (and its sha256 checked) when it is looked up."""

    CHUNK = 1 << 20

    def __init__(self, path: str, digests: dict[str, str]) -> None:
        self.path, self.digests = path, digests

    def _open(self, fname: str) -> Any:
        fpath = os.path.join(self.path, fname)
        try:
            return open(fpath, "rb")
        except FileNotFoundError:
            raise _fail(fpath, "missing") from None
        except OSError as ex:
            raise _fail(fpath, f"cannot read ({ex.strerror})") from None

    def _check(self, fname: str, digest: str) -> None:
        if digest != self.digests[fname]:
            raise _fail(os.path.join(self.path, fname), "sha256 mismatch (truncated or modified)")

    def verify(self, only: str | None = None) -> None:
        """Check every file's sha256 (or just `only`'s), streaming: nothing is kept."""
        for fname in [only] if only is not None else self.digests:
            h = hashlib.sha256()
            with self._open(fname) as f:
                while chunk := f.read(self.CHUNK):
                    h.update(chunk)
            self._check(fname, h.hexdigest())

    def local_path(self, fname: str) -> str:
        """Where the file is, for a reader (onnxruntime) that loads it itself; verify(fname) after that read."""
        return os.path.join(self.path, fname)

    def __getitem__(self, fname: str) -> bytes:
        if fname not in self.digests:
            raise KeyError(fname)
        with self._open(fname) as f:
            data = f.read()
        self._check(fname, hashlib.sha256(data).hexdigest())
        return data

    def __iter__(self) -> Iterator[str]:
        return iter(self.digests)

    def __len__(self) -> int:
        return len(self.digests)


def _read_directory(path: str) -> Bundle:
    mpath = os.path.join(path, MANIFEST_FILE)
    try:
        with open(mpath, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise _fail(mpath, "missing (not a pockprop artifact?)") from None
    manifest = Manifest.loads(raw, mpath)
    files = DirectoryFiles(path, manifest.files)
    files.verify()
    return Bundle(path, manifest, files, raw)  # type: ignore[arg-type]


def _read_packed(path: str) -> Bundle:
    try:
        with tarfile.open(path, "r:") as tar:
            members = {}
            for info in tar:
                if not info.isfile() or info.name != os.path.basename(info.name):
                    raise _fail(path, f"packed artifact holds {info.name!r}, which is not a plain file")
                members[info.name] = tar.extractfile(info).read()  # type: ignore[union-attr]
    except (tarfile.TarError, EOFError) as ex:
        raise _fail(path, f"not a packed pockprop artifact, or truncated ({ex})") from None
    if MANIFEST_FILE not in members:
        raise _fail(f"{path}:{MANIFEST_FILE}", "missing (not a pockprop artifact?)")
    manifest = Manifest.loads(members[MANIFEST_FILE], f"{path}:{MANIFEST_FILE}")
    missing = [n for n in manifest.files if n not in members]
    if missing:
        raise _fail(f"{path}:{missing[0]}", "missing (truncated pack?)")
    return Bundle(path, manifest, {n: members[n] for n in manifest.files}, members[MANIFEST_FILE])


def open_artifact(path: str) -> Bundle:
    """Read an artifact directory or packed file and verify every listed file's sha256."""
    if os.path.isdir(path):
        return _read_directory(path)  # verified as it is read, and again on every later read
    if not os.path.isfile(path):
        raise _fail(path, "no such artifact (expected a directory or a packed .pockprop file)")
    bundle = _read_packed(path)
    for fname, digest in bundle.manifest.files.items():
        if hashlib.sha256(bundle.files[fname]).hexdigest() != digest:
            raise _fail(bundle.where(fname), "sha256 mismatch (truncated or modified)")
    return bundle


def read_manifest(path: str) -> Manifest:
    """Load manifest.json and check every file it lists against its sha256."""
    return open_artifact(path).manifest


def pack(directory: str, output: str) -> str:
    """Pack a verified artifact (directory or pack) into one uncompressed tar file (written atomically)."""
    bundle = open_artifact(directory)
    blobs = {MANIFEST_FILE: bundle.manifest_bytes} | dict(bundle.files)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.USTAR_FORMAT) as tar:
        for name in blobs:  # manifest first: a reader streaming the tar meets it before the rest
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(blobs[name]), 0o644, 0
            tar.addfile(info, io.BytesIO(blobs[name]))
    write_atomic(output, buf.getvalue())
    return output
