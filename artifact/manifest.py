"""Artifact loading: verified reading of an artifact directory or packed file, and `pack`.

An artifact is a directory, or the same files packed into one uncompressed tar (`pockprop pack`) for
copying to a device. Loading checks the sha256 of every file the manifest lists (artifact/contract.py
defines the manifest) and reads nothing it does not list. A packed artifact's files are kept as the
bytes that were checked (a pack is held in memory: large models are better loaded from a directory). A
directory's are not held at all: each is read when used and its sha256 checked again on that read (or,
for a file onnxruntime reads itself, right after that read), so what is validated is still exactly what
gets used, while a trainer does not keep every file's bytes alive (the weights may take GBs). `pack`
streams: no file is held whole, and each member is at most 8 GiB (what a ustar header can state).

Hostile input ends in an ArtifactError, never in a hang or an unbounded allocation: only regular files
are opened (no symbolic link, FIFO or device; opening never blocks), the manifest's size is bounded,
and a pack's members are located from their headers before any data is read, so duplicate, unlisted,
truncated and special members (links, devices, FIFOs, sparse files, pax or GNU extension headers) are
refused without reading them.
"""
from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass, field
from typing import IO, Iterator, Mapping

import numpy as np

from pockprop.artifact import onnx_wire
from pockprop.artifact.contract import MANIFEST_FILE, Manifest, is_plain_name
from pockprop.artifact.durable import write_atomic
from pockprop.errors import ArtifactError

__all__ = ["ArtifactError", "Bundle", "open_artifact", "read_manifest", "pack"]

MAX_MANIFEST_BYTES = 64 << 20  # far above any real manifest; a bigger one is not an artifact's


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

    def external_refs(self, graph: str, model: bytes) -> list[onnx_wire.ExternalTensor]:
        """The initializers that the graph file `graph` (bytes `model`) keeps in external files. Every
        reference is checked: ArtifactError unless it names a file the manifest lists (so nothing unhashed
        is used, and nothing is resolved against the working directory) and lies within that file."""
        where = self.where(graph)
        try:
            refs = onnx_wire.external_tensors(model)
        except onnx_wire.WireError as ex:
            raise _fail(where, f"not a readable ONNX model ({ex})") from None
        sizes: dict[str, int] = {}
        for ref in refs:
            if not is_plain_name(ref.location) or ref.location not in self.manifest.files:
                raise _fail(where, f"initializer {ref.name!r} keeps its data in {ref.location!r}, which is not a file "
                                   "the manifest lists (external data must be a listed, hashed file of the artifact)")
            if ref.location not in sizes:
                files = self.files
                sizes[ref.location] = files.size(ref.location) if isinstance(files, DirectoryFiles) \
                    else len(files[ref.location])
            try:
                ref.check(sizes[ref.location])
            except onnx_wire.WireError as ex:
                raise _fail(where, str(ex)) from None
        return refs

    def external_data(self, graph: str, model: bytes, names: set[str] | None = None) -> dict[str, np.ndarray]:
        """The values of the initializers (those in `names`, or all) that the graph file `graph` (bytes
        `model`) keeps in external files, read from those files' verified bytes; every reference is checked,
        read or not (`external_refs`). A pack's values are views of its bytes; a directory's files are read
        one at a time, whole (files are bounded, see artifact/external.py), and the values copied out of
        each, so at most one file's bytes are held beside the values."""
        refs = sorted(self.external_refs(graph, model), key=lambda r: (r.location, r.offset))
        copy = isinstance(self.files, DirectoryFiles)
        location, blob, out = None, b"", {}
        for ref in refs:
            if names is not None and ref.name not in names:
                continue
            if ref.location != location:
                blob = b""  # the previous file's bytes go before the next is read
                blob, location = self.files[ref.location], ref.location
            try:
                value = ref.array(blob)
            except onnx_wire.WireError as ex:
                raise _fail(self.where(graph), str(ex)) from None
            out[ref.name] = np.array(value) if copy else value
        return out


def _fail(path: str, msg: str) -> ArtifactError:
    return ArtifactError(f"{path}: {msg}")


# -- regular files only -----------------------------------------------------------------------------
_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(fpath: str, follow: bool = False) -> IO[bytes]:
    """Open a regular file for reading without blocking on a FIFO or device; ArtifactError for anything
    else. follow=False (an artifact's own files) also refuses a symbolic link."""
    try:
        if not follow and stat.S_ISLNK(os.lstat(fpath).st_mode):
            raise _fail(fpath, "is a symbolic link; an artifact holds regular files only")
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(fpath, flags | (0 if follow else getattr(os, "O_NOFOLLOW", 0)))
    except FileNotFoundError:
        raise _fail(fpath, "missing") from None
    except OSError as ex:
        raise _fail(fpath, f"cannot read ({ex.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _fail(fpath, f"is {_kind(mode)}; an artifact holds regular files only")
    return os.fdopen(fd, "rb")


def _manifest(raw: bytes, where: str) -> Manifest:
    """The manifest from the first MAX_MANIFEST_BYTES + 1 bytes of manifest.json (more is refused unread)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _fail(where, f"larger than {MAX_MANIFEST_BYTES >> 20} MB: not a pockprop manifest")
    return Manifest.loads(raw, where)


# -- directories ------------------------------------------------------------------------------------
class DirectoryFiles(Mapping[str, bytes]):
    """The files of an artifact directory, each read (and its sha256 checked) when it is looked up."""

    CHUNK = 1 << 20

    def __init__(self, path: str, digests: dict[str, str]) -> None:
        self.path, self.digests = path, digests

    def _check(self, fname: str, digest: str) -> None:
        if digest != self.digests[fname]:
            raise _fail(os.path.join(self.path, fname), "sha256 mismatch (truncated or modified)")

    def verify(self, only: str | None = None) -> None:
        """Check every file's sha256 (or just `only`'s), streaming: nothing is kept."""
        for fname in [only] if only is not None else self.digests:
            for _ in self.stream(fname):
                pass

    def stream(self, fname: str) -> Iterator[bytes]:
        """The file's bytes in chunks; ArtifactError after the last one if its sha256 is not the listed one
        (a consumer commits what it wrote only once the stream has ended)."""
        h = hashlib.sha256()
        with open_regular(os.path.join(self.path, fname)) as f:
            while chunk := f.read(self.CHUNK):
                h.update(chunk)
                yield chunk
        self._check(fname, h.hexdigest())

    def size(self, fname: str) -> int:
        """The file's size in bytes (its sha256 is checked when it is read or verified)."""
        with open_regular(os.path.join(self.path, fname)) as f:
            return os.fstat(f.fileno()).st_size

    def local_path(self, fname: str) -> str:
        """Where the file is, for a reader (onnxruntime) that loads it itself; verify(fname) after that read."""
        return os.path.join(self.path, fname)

    def watch(self, fname: str) -> "Watched":
        """Keep the file open to see whether it changes in place from now on (call before verify(fname))."""
        return Watched(os.path.join(self.path, fname))


    def __getitem__(self, fname: str) -> bytes:
        if fname not in self.digests:
            raise KeyError(fname)
        with open_regular(os.path.join(self.path, fname)) as f:
            data = f.read()
        self._check(fname, hashlib.sha256(data).hexdigest())
        return data

    def __iter__(self) -> Iterator[str]:
        return iter(self.digests)

    def __len__(self) -> int:
        return len(self.digests)


class Watched:
    """A file that a reader keeps using after it was verified: onnxruntime maps a directory's external data
    files and reads the weights from them as it runs. The file is kept open, so what is watched is the file
    that was mapped, whatever its name is now: one replaced by a new file (a rename, as durable writes do)
    or removed stays mapped and intact, but one written in place changes what the session computes.
    `check` sees that (its size or modification time differs) and refuses. (A writer that also sets the
    time back is not seen: the check is against accidents such as copying an artifact over a running one.)"""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open_regular(path)
        self._stamp = self._now()

    def _now(self) -> tuple[int, int]:
        st = os.fstat(self._file.fileno())
        return st.st_size, st.st_mtime_ns  # not the change time: a rename sets it, and leaves the mapping intact

    def check(self) -> None:
        """ArtifactError if the file changed in place since it was opened."""
        if self._now() != self._stamp:
            raise _fail(self.path, "changed in place since the artifact was loaded (onnxruntime reads the weights from "
                                   "it while it runs); load the artifact again")


def _read_directory(path: str) -> Bundle:
    mpath = os.path.join(path, MANIFEST_FILE)
    if not os.path.lexists(mpath):
        raise _fail(mpath, "missing (not a pockprop artifact?)")
    with open_regular(mpath) as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    manifest = _manifest(raw, mpath)
    files = DirectoryFiles(path, manifest.files)
    files.verify()
    return Bundle(path, manifest, files, raw)


# -- packed (ustar) ---------------------------------------------------------------------------------
BLOCK = 512
_REGULAR = (b"0", b"\0")
_TYPES = {b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device", b"4": "a block device",
          b"5": "a directory", b"6": "a FIFO", b"7": "a contiguous file", b"S": "a GNU sparse file",
          b"x": "a pax header", b"g": "a pax global header", b"L": "a GNU long name", b"K": "a GNU long link name"}


def _octal(field_: bytes) -> int:
    text = field_.split(b"\0", 1)[0].strip()
    if not text or any(c not in b"01234567" for c in text):
        raise ValueError(f"not an octal number: {field_!r}")
    return int(text, 8)


def _members(f: IO[bytes], size: int, path: str) -> dict[str, tuple[int, int]]:
    """{name: (data offset, data size)} of every member, from the headers alone (no data is read)."""
    members: dict[str, tuple[int, int]] = {}
    pos = 0
    while pos + BLOCK <= size:
        f.seek(pos)
        head = f.read(BLOCK)
        if head == bytes(BLOCK):  # end of archive
            break
        try:
            if sum(head[:148]) + 8 * 32 + sum(head[156:]) != _octal(head[148:156]) or head[257:262] != b"ustar":
                raise ValueError("bad checksum or magic")
            length = _octal(head[124:136])
        except ValueError:
            raise _fail(path, f"not a packed pockprop artifact (no tar header at byte {pos})") from None
        name = head[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if head[257:263] == b"ustar\0" and head[345] != 0:  # a ustar prefix: the name has a folder part
            name = head[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        kind = head[156:157]
        if kind not in _REGULAR or not is_plain_name(name) or "\ufffd" in name:
            what = f" ({_TYPES[kind]})" if kind in _TYPES else ""
            raise _fail(path, f"packed artifact holds {name!r}, which is not a plain file{what}")
        if name in members:
            raise _fail(path, f"packed artifact holds {name!r} twice")
        start = pos + BLOCK
        if start + length > size:
            raise _fail(f"{path}:{name}", "truncated (the pack is cut short)")
        members[name] = (start, length)
        pos = start + -(-length // BLOCK) * BLOCK
    return members


def _read_packed(path: str) -> Bundle:
    with open_regular(path, follow=True) as f:
        size = os.fstat(f.fileno()).st_size
        members = _members(f, size, path)
        mwhere = f"{path}:{MANIFEST_FILE}"
        if MANIFEST_FILE not in members:
            raise _fail(mwhere, "missing (not a pockprop artifact?)")

        def read(name: str, limit: int | None = None) -> bytes:
            start, length = members[name]
            f.seek(start)
            return f.read(length if limit is None else min(length, limit))

        raw = read(MANIFEST_FILE, MAX_MANIFEST_BYTES + 1)
        manifest = _manifest(raw, mwhere)
        unlisted = [n for n in members if n != MANIFEST_FILE and n not in manifest.files]
        if unlisted:
            raise _fail(path, f"packed artifact holds {unlisted[0]!r}, which the manifest does not list")
        missing = [n for n in manifest.files if n not in members]
        if missing:
            raise _fail(f"{path}:{missing[0]}", "missing (truncated pack?)")
        return Bundle(path, manifest, {n: read(n) for n in manifest.files}, raw)


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


USTAR_MAX = 8 ** 11 - 1  # the largest member a ustar header can state (11 octal digits): 8 GiB - 1


def _tar_member(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info.tobuf(tarfile.USTAR_FORMAT)


def _tar_chunks(bundle: Bundle, sizes: dict[str, int]) -> Iterator[bytes]:
    """The pack's bytes: each member's header, data (streamed from a directory, checked as it is read) and
    padding, then the end-of-archive blocks padded to a whole record, as tarfile writes them."""
    total = 0
    for name, size in sizes.items():  # manifest first: a reader streaming the tar meets it before the rest
        yield _tar_member(name, size)
        if name == MANIFEST_FILE:
            yield bundle.manifest_bytes
        elif isinstance(bundle.files, DirectoryFiles):
            yield from bundle.files.stream(name)
        else:
            yield bundle.files[name]
        yield bytes(-size % BLOCK)
        total += BLOCK + size + -size % BLOCK
    end = 2 * BLOCK
    yield bytes(end + -(total + end) % tarfile.RECORDSIZE)


def pack(directory: str, output: str) -> str:
    """Pack a verified artifact (directory or pack) into one uncompressed tar file, written atomically and
    streamed: a directory's files are copied in chunks (checked against their sha256 again as they are read),
    never held whole."""
    bundle = open_artifact(directory)
    sizes = {MANIFEST_FILE: len(bundle.manifest_bytes)}
    for name in bundle.manifest.files:
        sizes[name] = bundle.files.size(name) if isinstance(bundle.files, DirectoryFiles) else len(bundle.files[name])
        if sizes[name] > USTAR_MAX:
            raise _fail(bundle.where(name), f"{sizes[name]} bytes: a packed artifact's files are smaller than 8 GiB "
                                            "each (ustar); copy the artifact directory instead")
    write_atomic(output, _tar_chunks(bundle, sizes))
    return output
