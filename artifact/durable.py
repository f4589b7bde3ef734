"""Crash-safe file replacement: write a temp file, fsync it, rename it over the target, fsync the folder.

A reader sees either the old file or the complete new one, never a torn write, whatever moment the
process is killed or the machine loses power (on file systems with atomic rename, i.e. all POSIX
ones). A failed write (disk full, quota, file-size limit) removes the temp file and leaves the old
file untouched.
"""
from __future__ import annotations

import errno
import os

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


def write_atomic(path: str, data: bytes) -> None:
    """Replace `path` with `data` durably; OSError (with the path and reason) if it cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as ex:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        reason = _REASONS.get(ex.errno or 0, ex.strerror or str(ex))
        raise OSError(ex.errno, f"{path}: cannot write ({reason}); the previous file, if any, is unchanged") from None
    fsync_dir(directory)


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
