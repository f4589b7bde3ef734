"""Artifact manifest: constants, structural validation and verified loading (json + hashlib + tarfile).

An artifact is a directory, or the same files packed into one uncompressed tar (`pockprop pack`) for
copying to a device. Loading checks the sha256 of every file the manifest lists. A packed artifact's
files are kept as the bytes that were checked. A directory's are not held at all: each is read when
used and its sha256 checked again on that read, so what is validated is still exactly what gets used,
while a trainer does not keep every file's bytes alive (ResNet-18 `sparse`: 246 MB resident after
`Trainer.load` instead of 309; the weights are in both ONNX files).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from pockprop.artifact.durable import write_atomic
from pockprop.errors import ArtifactError

__all__ = ["FORMAT", "FORMAT_VERSION", "ArtifactError", "Bundle", "open_artifact", "read_manifest", "pack"]

FORMAT = "pockprop-artifact"
FORMAT_VERSION = 1
REQUIRED = ("format", "format_version", "graphs", "state_file", "data", "labels", "lr", "outputs", "state", "files")
DTYPES = {"float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool"}
PREPROCESS_KEYS = {"resize", "antialias", "channel_order", "scale", "mean", "std"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Bundle:
    """A loaded artifact: its manifest and the verified bytes of every file it lists."""

    path: str
    manifest: dict[str, Any]
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


def _parse(raw: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as ex:
        raise _fail(where, f"not valid JSON ({ex})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(where, "not a pockprop artifact manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise _fail(where, f"format version {version!r}; this runtime reads version {FORMAT_VERSION} "
                           "(recompile the model, or update pockprop on the device)")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise _fail(where, f"missing fields {', '.join(missing)}")
    validate(manifest, where)
    return manifest


def _shape(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(d, int) and d >= 0 for d in value)


def _tensor_spec(spec: Any, what: str, where: str) -> None:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise _fail(where, f"{what}: expected an object with a name")
    if not _shape(spec.get("shape")) or spec.get("dtype") not in DTYPES:
        raise _fail(where, f"{what} {spec['name']!r}: bad shape {spec.get('shape')!r} or dtype {spec.get('dtype')!r}")


def validate(m: dict[str, Any], where: str) -> None:
    """Check the manifest's structure (types, names, slices); ArtifactError naming the field if wrong."""
    files = m["files"]
    if not isinstance(files, dict) or not all(isinstance(v, str) and _SHA256.match(v) for v in files.values()):
        raise _fail(where, "files: expected {file name: sha256 hex digest}")
    for name in files:
        if not name or name != os.path.basename(name) or name.startswith("."):
            raise _fail(where, f"files: {name!r} is not a plain file name")
    graphs = m["graphs"]
    if not isinstance(graphs, dict) or not all(isinstance(graphs.get(k), str) for k in ("train_step", "infer")):
        raise _fail(where, "graphs: expected {train_step: file, infer: file}")
    for name in (graphs["train_step"], graphs["infer"], m["state_file"]):
        if name not in files:
            raise _fail(where, f"{name!r} is not listed in files (no hash to check it against)")
    if not isinstance(m["data"], list) or len(m["data"]) != 1:
        raise _fail(where, "data: this runtime feeds exactly one data input")
    _tensor_spec(m["data"][0], "data", where)
    if not m["data"][0]["shape"] or m["data"][0]["shape"][0] < 1:
        raise _fail(where, "data: the first dimension (batch size) must be positive")
    _preprocess(m["data"][0].get("preprocess") or {}, where)
    _tensor_spec(m["labels"], "labels", where)
    if not isinstance(m["lr"], dict) or not isinstance(m["lr"].get("name"), str) \
            or not isinstance(m["lr"].get("initial"), (int, float)):
        raise _fail(where, "lr: expected {name, initial}")
    if not isinstance(m["outputs"], dict) or not all(isinstance(m["outputs"].get(k), str) for k in ("loss", "prediction")):
        raise _fail(where, "outputs: expected {loss, prediction}")
    if not isinstance(m["state"], list) or not m["state"]:
        raise _fail(where, "state: expected a non-empty list")
    seen: set[str] = set()
    for s in m["state"]:
        _tensor_spec(s, "state", where)
        if s["name"] in seen:
            raise _fail(where, f"state {s['name']!r} listed twice")
        seen.add(s["name"])
        if s.get("role") not in ("param", "optimizer") or not isinstance(s.get("input"), str) \
                or not isinstance(s.get("output"), str):
            raise _fail(where, f"state {s['name']!r}: needs role param|optimizer, input and output")
        if "slice" in s:
            _slice(s, where)


def _slice(s: dict[str, Any], where: str) -> None:
    """A param entry that is part of a parameter: full_shape, and `shape` = full_shape cut on one axis."""
    sl, full = s["slice"], s.get("full_shape")
    what = f"state {s['name']!r}"
    if s["role"] != "param" or not isinstance(s.get("param"), str):
        raise _fail(where, f"{what}: a slice belongs to a param entry naming its full parameter ('param')")
    if not isinstance(sl, dict) or not all(isinstance(sl.get(k), int) for k in ("axis", "start", "stop")):
        raise _fail(where, f"{what}: slice must be {{axis, start, stop}}")
    if not _shape(full) or not 0 <= sl["axis"] < len(full) or not 0 <= sl["start"] < sl["stop"] <= full[sl["axis"]]:
        raise _fail(where, f"{what}: slice {sl} does not fit full_shape {full}")
    expect = list(full)
    expect[sl["axis"]] = sl["stop"] - sl["start"]
    if expect != s["shape"]:
        raise _fail(where, f"{what}: shape {s['shape']} is not full_shape {full} cut by slice {sl}")


def _preprocess(p: Any, where: str) -> None:
    """data[0].preprocess: the steps docs/artifact.md defines, each with a value of its type."""
    if not isinstance(p, dict):
        raise _fail(where, "data preprocess: expected an object")
    unknown = set(p) - PREPROCESS_KEYS
    if unknown:
        raise _fail(where, f"data preprocess: unknown steps {sorted(unknown)}; this runtime knows "
                           f"{sorted(PREPROCESS_KEYS)}")
    finite = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < float("inf")  # noqa: E731
    numbers = lambda v: isinstance(v, list) and v and all(finite(x) for x in v)  # noqa: E731
    if "resize" in p and not (isinstance(p["resize"], list) and len(p["resize"]) == 2
                              and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in p["resize"])):
        raise _fail(where, f"data preprocess: resize must be [height, width], got {p['resize']!r}")
    if "antialias" in p and not isinstance(p["antialias"], bool):
        raise _fail(where, f"data preprocess: antialias must be true or false, got {p['antialias']!r}")
    if "channel_order" in p and p["channel_order"] not in ("rgb", "bgr"):
        raise _fail(where, f"data preprocess: channel_order must be \"rgb\" or \"bgr\", got {p['channel_order']!r}")
    if "scale" in p and not (finite(p["scale"]) and p["scale"] != 0):
        raise _fail(where, f"data preprocess: scale must be a finite non-zero number, got {p['scale']!r}")
    for k in ("mean", "std"):
        if k in p and not (numbers(p[k]) or finite(p[k])):
            raise _fail(where, f"data preprocess: {k} must be a finite number or a list of them, got {p[k]!r}")
    std = p.get("std", 1)
    if any(v == 0 for v in (std if isinstance(std, list) else [std])):
        raise _fail(where, "data preprocess: std must not be 0")


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
    mpath = os.path.join(path, "manifest.json")
    try:
        with open(mpath, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise _fail(mpath, "missing (not a pockprop artifact?)") from None
    manifest = _parse(raw, mpath)
    files = DirectoryFiles(path, manifest["files"])
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
    if "manifest.json" not in members:
        raise _fail(f"{path}:manifest.json", "missing (not a pockprop artifact?)")
    manifest = _parse(members["manifest.json"], f"{path}:manifest.json")
    missing = [n for n in manifest["files"] if n not in members]
    if missing:
        raise _fail(f"{path}:{missing[0]}", "missing (truncated pack?)")
    return Bundle(path, manifest, {n: members[n] for n in manifest["files"]}, members["manifest.json"])


def open_artifact(path: str) -> Bundle:
    """Read an artifact directory or packed file and verify every listed file's sha256."""
    if os.path.isdir(path):
        return _read_directory(path)  # verified as it is read, and again on every later read
    if not os.path.isfile(path):
        raise _fail(path, "no such artifact (expected a directory or a packed .pockprop file)")
    bundle = _read_packed(path)
    for fname, digest in bundle.manifest["files"].items():
        if hashlib.sha256(bundle.files[fname]).hexdigest() != digest:
            raise _fail(bundle.where(fname), "sha256 mismatch (truncated or modified)")
    return bundle


def read_manifest(path: str) -> dict[str, Any]:
    """Load manifest.json and check every file it lists against its sha256."""
    return open_artifact(path).manifest


def pack(directory: str, output: str) -> str:
    """Pack a verified artifact (directory or pack) into one uncompressed tar file (written atomically)."""
    bundle = open_artifact(directory)
    blobs = {"manifest.json": bundle.manifest_bytes} | dict(bundle.files)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.USTAR_FORMAT) as tar:
        for name in blobs:  # manifest first: a reader streaming the tar meets it before the rest
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(blobs[name]), 0o644, 0
            tar.addfile(info, io.BytesIO(blobs[name]))
    write_atomic(output, buf.getvalue())
    return output
