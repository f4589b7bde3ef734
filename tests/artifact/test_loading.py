"""Hostile artifacts end in one ArtifactError line: no hang, no unbounded read, nothing unlisted used.

Packed artifacts: duplicate, unlisted, truncated and special members (links, devices, FIFOs, GNU sparse
files, pax headers) are refused from their headers, before any data is read. Directories: only regular
files are opened (a FIFO or a symbolic link, e.g. to /dev/zero, is refused without blocking).
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import tarfile
from pathlib import Path
from typing import Iterator

import pytest

from pockprop.artifact.manifest import open_artifact, pack
from pockprop.cli import main
from pockprop.errors import ArtifactError
from pockprop.runtime.trainer import Trainer


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the block takes longer than `seconds`."""
    def fire(*_: object) -> None:
        raise TimeoutError(f"still loading after {seconds}s: the loader blocked or read without end")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _refused(path: Path, needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with deadline(10), pytest.raises(ArtifactError, match=needle):
        open_artifact(str(path))
    capsys.readouterr()
    with deadline(10):
        assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and str(path) in err


# -- packed ------------------------------------------------------------------------------------------
def _members(packed: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(packed) as tar:
        return [(i, tar.extractfile(i).read()) for i in tar]  # type: ignore[union-attr]


def _repack(out: Path, members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    out.write_bytes(buf.getvalue())
    return out


def _sparse_member(name: str, realsize: int) -> bytes:
    """A GNU sparse member ('S') of `realsize` bytes: one data byte at the end, the rest a hole."""
    info = tarfile.TarInfo(name)
    info.size, info.type = 512, tarfile.GNUTYPE_SPARSE
    head = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    entries = [(realsize - 1, 1)] + [(realsize, 0)] * 3
    for k, (offset, numbytes) in enumerate(entries):
        head[386 + 24 * k:410 + 24 * k] = b"%011o\0%011o\0" % (offset, numbytes)
    head[483:495] = b"%011o\0" % realsize
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    return bytes(head) + b"\1" + bytes(511)


@pytest.fixture
def packed(artifact, tmp_path: Path) -> Path:
    return Path(pack(str(artifact()), str(tmp_path / "ok.pockprop")))


def test_sparse_member_is_refused_before_it_is_read(packed: Path, tmp_path: Path, capsys) -> None:
    """Python's tarfile would expand this 13 KB pack's member to 64 MB of zeros (1 GB just as easily)."""
    raw = packed.read_bytes()
    with tarfile.open(packed) as tar:
        last = tar.getmembers()[-1]
    body = raw[:last.offset_data + -(-last.size // 512) * 512]
    evil = tmp_path / "sparse.pockprop"
    evil.write_bytes(body + _sparse_member("junk.bin", 64 << 20) + bytes(1024))
    assert evil.stat().st_size < 20_000
    _refused(evil, r"holds 'junk.bin', which is not a plain file \(a GNU sparse file\)", capsys)


def test_unlisted_member_is_refused(packed: Path, tmp_path: Path, capsys) -> None:
    extra = tarfile.TarInfo("extra.bin")
    extra.size = 3
    evil = _repack(tmp_path / "extra.pockprop", _members(packed) + [(extra, b"abc")])
    _refused(evil, "holds 'extra.bin', which the manifest does not list", capsys)


def test_duplicate_manifest_is_refused(packed: Path, tmp_path: Path, capsys) -> None:
    members = _members(packed)
    info, raw = members[0]
    assert info.name == "manifest.json"
    second = tarfile.TarInfo("manifest.json")
    doctored = raw.replace(b'"model": "mlp"', b'"model": "other"')
    second.size = len(doctored)
    evil = _repack(tmp_path / "dup.pockprop", members + [(second, doctored)])
    _refused(evil, "holds 'manifest.json' twice", capsys)


@pytest.mark.parametrize("kind, what", [(tarfile.SYMTYPE, "a symbolic link"), (tarfile.LNKTYPE, "a hard link"),
                                        (tarfile.FIFOTYPE, "a FIFO"), (tarfile.CHRTYPE, "a character device"),
                                        (tarfile.DIRTYPE, "a directory")])
def test_special_members_are_refused(packed: Path, tmp_path: Path, kind: bytes, what: str, capsys) -> None:
    members = _members(packed)
    special = tarfile.TarInfo("infer.onnx")
    special.type, special.linkname = kind, "/dev/zero"
    evil = _repack(tmp_path / "special.pockprop", [m for m in members if m[0].name != "infer.onnx"] + [(special, b"")])
    _refused(evil, f"holds 'infer.onnx/?', which is not a plain file \\({what}\\)", capsys)


def test_pax_headers_and_oversized_members_are_refused(packed: Path, tmp_path: Path, capsys) -> None:
    members = _members(packed)
    info, data = members[-1]
    info.pax_headers = {"comment": "x" * 100}
    evil = _repack(tmp_path / "pax.pockprop", members, tarfile.PAX_FORMAT)
    _refused(evil, r"which is not a plain file \(a pax header\)", capsys)
    raw = bytearray(packed.read_bytes())
    with tarfile.open(packed) as tar:
        last = tar.getmembers()[-1]
    head = last.offset_data - 512
    raw[head + 124:head + 136] = b"%011o\0" % (1 << 32)  # claims 4 GB in a file of a few KB
    raw[head + 148:head + 156] = b" " * 8
    raw[head + 148:head + 156] = b"%06o\0 " % sum(raw[head:head + 512])
    (tmp_path / "big.pockprop").write_bytes(bytes(raw))
    _refused(tmp_path / "big.pockprop", f"{last.name}: truncated", capsys)


def test_packed_artifact_still_loads(packed: Path, artifact) -> None:
    assert Trainer.load(str(packed)).digest == Trainer.load(str(artifact())).digest


# -- directories ---------------------------------------------------------------------------------------
def test_fifo_in_an_artifact_directory_is_refused_without_blocking(artifact, capsys) -> None:
    art = artifact()
    os.unlink(art / "infer.onnx")
    os.mkfifo(art / "infer.onnx")
    _refused(art, "infer.onnx: is a FIFO; an artifact holds regular files only", capsys)
    os.unlink(art / "manifest.json")
    os.mkfifo(art / "manifest.json")
    _refused(art, "manifest.json: is a FIFO", capsys)


def test_symlinks_in_an_artifact_directory_are_refused(artifact, tmp_path: Path, capsys) -> None:
    art = artifact()
    os.unlink(art / "infer.onnx")
    os.symlink("/dev/zero", art / "infer.onnx")
    _refused(art, "infer.onnx: is a symbolic link", capsys)
    elsewhere = tmp_path / "manifest-copy.json"
    os.replace(art / "manifest.json", elsewhere)  # a link to a perfectly good manifest: still not the artifact's
    os.symlink(elsewhere, art / "manifest.json")
    _refused(art, "manifest.json: is a symbolic link", capsys)


def test_oversized_manifest_is_refused_without_reading_it_all(artifact, monkeypatch, capsys) -> None:
    from pockprop.artifact import manifest

    art = artifact()
    monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", 1000)
    _refused(art, "manifest.json: larger than", capsys)
