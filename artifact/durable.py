"""Crash-safe file replacement: write a temp file, fsync it, rename it over the target, fsync the folder.

A reader sees either the old file or the complete new one, never a torn write, whatever moment the
process is killed or the machine loses power (on file systems with atomic rename, i.e. all POSIX
ones). A failed write (disk full, quota, file-size limit), or an exception raised while the data is
being produced, removes the temp file and leaves the old file untouched. The data may be given as
chunks, so a file of several GB is written without ever being held whole in memory. The temp file is
created exclusively under a random name, never through an existing file or symbolic link, so nobody who
can write to the folder can make a write land elsewhere.
"""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
from typing import BinaryIO, Iterable, Iterator, Union

TMP_MARK = ".tmp-"
_REASONS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file too large for this file system or process limit"}


def fsync_dir(directory: str) -> None:
    """Make a rename in `directory` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exclusive(path: str, flags: int) -> int:
    """open(2) `path` as a new file only: O_EXCL fails on anything already there, a symbolic link included."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                   | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0), 0o666)


def _temp_name(path: str) -> str:
    """A fresh temp name beside `path`: the prefix remove_stale_temps looks for, then pid and random suffix."""
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}{TMP_MARK}{os.getpid()}-{secrets.token_hex(8)}")


def _create_temp(path: str) -> tuple[BinaryIO, str]:
    """A new temp file beside `path`, open for writing, and its name."""
    for _ in range(100):  # a name already taken (by chance, or planted) is never opened: draw another
        tmp = _temp_name(path)
        try:
            return open(tmp, "xb", opener=_exclusive), tmp
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, "no free temp file name")


Data = Union[bytes, Iterable[Union[bytes, bytearray, memoryview]]]


class _ProducerError(Exception):
    """An exception raised by the iterable of chunks (not by the write): re-raised as it was."""


def _chunks(data: Data) -> Iterator[Union[bytes, bytearray, memoryview]]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield data
        return
    it = iter(data)
    while True:
        try:
            chunk = next(it)
        except StopIteration:
            return
        except BaseException as ex:
            raise _ProducerError() from ex
        yield chunk


def write_atomic(path: str, data: Data) -> str:
    """Replace `path` with `data` (bytes, or an iterable of byte chunks written in order) durably; returns
    the sha256 (hex) of what was written. OSError (with the path and reason) if it cannot be written; an
    exception raised by the iterable propagates unchanged, and in both cases the old file stays."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    digest = hashlib.sha256()
    try:
        f, tmp = _create_temp(path)
        with f:
            for chunk in _chunks(data):
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, _ProducerError) as ex:
        if tmp is not None:  # ours: remove it (a name we could not create is not ours to touch)
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(ex, _ProducerError):
            raise ex.__cause__ from None  # type: ignore[misc]
        reason = _REASONS.get(ex.errno or 0, ex.strerror or str(ex))
        raise OSError(ex.errno, f"{path}: cannot write ({reason}); the previous file, if any, is unchanged") from None
    fsync_dir(directory)
    return digest.hexdigest()


def check_writable(path: str) -> None:
    """OSError (with the folder and reason) unless write_atomic(path, ...) could create its temp file now:
    one is created exclusively and removed (so a read-only mount or folder is found before work that would
    be lost; permission bits alone do not show it to root). A kill in between leaves a temp file that
    remove_stale_temps removes."""
    tmp = _temp_name(path)
    try:
        os.close(_exclusive(tmp, 0))
    except OSError as ex:
        reason = _REASONS.get(ex.errno or 0, ex.strerror or str(ex))
        raise OSError(ex.errno, f"{os.path.dirname(os.path.abspath(path))}: cannot write files here ({reason})") from None
    os.unlink(tmp)


def remove_stale_temps(directory: str, name: str) -> None:
    """Delete temp files a killed writer of `name` left behind (they never replaced anything)."""
    prefix = f".{name}{TMP_MARK}"
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        if entry.startswith(prefix):
            try:
                os.unlink(os.path.join(directory, entry))
            except OSError:
                pass
