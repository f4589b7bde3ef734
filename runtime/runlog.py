"""Per-step training metrics as JSON lines (`pockprop train --log FILE`; the format is in docs/artifact.md).

Each record is one line written with one `write` call on a file opened for appending, so a line is never
interleaved with another writer's and a crash leaves whole lines behind (at worst a torn last one, which
`read` skips and the next writer closes with a newline first). A resumed run appends to the same file: its
`start` record says where it resumed, and steps after the last checkpoint appear twice; `latest` keeps the
last copy of each.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any


class RunLog:
    """An append-only JSON-lines file; `write(record)` stamps the record with the Unix time and appends it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # writes always go to the end
        try:
            end = os.lseek(self._fd, 0, os.SEEK_END)
            if end and os.lseek(self._fd, end - 1, os.SEEK_SET) >= 0 and os.read(self._fd, 1) != b"\n":
                self._append(b"\n")  # close the torn last line of an interrupted writer
        except BaseException:
            os.close(self._fd)
            raise

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(_clean({**record, "time": round(time.time(), 3)}), allow_nan=False)
        self._append(line.encode() + b"\n")

    def _append(self, data: bytes) -> None:
        if os.write(self._fd, data) != len(data):  # a regular file takes all of it unless the disk is full
            raise OSError(f"{self.path}: short write (disk full?)")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clean(value: Any) -> Any:
    """JSON-ready: numpy scalars as Python numbers, non-finite floats as null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read(path: str) -> tuple[list[dict[str, Any]], int]:
    """(the records of a log file in order, the number of lines skipped as unreadable)."""
    records, skipped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("event"), str):
                records.append(rec)
            else:
                skipped += 1
    return records, skipped


def latest(records: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    """The records of one event ("step", "epoch"), one per (round, epoch, batch) in first-seen order: one
    logged again after a resume (the resumed run repeats it exactly) replaces the first copy in place."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:
        if r.get("event") == event:
            out[(r.get("round"), r.get("epoch"), r.get("batch"))] = r
    return list(out.values())
