"""A dependency-free progress bar: one line redrawn with carriage returns on a terminal; otherwise
(logs, CI, pipes) a plain line at each quarter of the run and at least every `interval` seconds."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Shows `done/total` with the latest loss and steps per second."""

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None, enabled: bool = True,
                 interval: float | None = None) -> None:
        self.total, self.label, self.enabled = max(total, 1), label, enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.1 if self.tty else 5.0)
        self.start = self._last = time.perf_counter()
        self.done = self.first = self.width = 0
        self.shown = 0  # the `done` last drawn

    def begin(self, done: int) -> None:
        """Start counting from `done` (a resumed run): steps/s covers this run only."""
        self.done = self.first = self.shown = done
        self.start = self._last = time.perf_counter()

    def line(self, done: int, extra: str) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        frac = min(done / self.total, 1.0)
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        return f"{self.label}[{bar}] {done}/{self.total} {extra} {(done - self.first) / elapsed:.1f} steps/s".rstrip()

    def update(self, done: int, extra: str = "", force: bool = False) -> None:
        """Report progress; drawn at most every `interval` seconds unless forced."""
        self.done = done
        now = time.perf_counter()
        quarter = not self.tty and done * 4 // self.total > self.shown * 4 // self.total
        due = now - self._last >= self.interval or quarter or (done >= self.total and self.shown != done)
        if not self.enabled or not (force or due):
            return
        self._last, self.shown = now, done
        text = self.line(done, extra)
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self, extra: str = "") -> None:
        """Draw the final state and end the line."""
        if not self.enabled:
            return
        if self.tty or self.shown != self.done:
            self.update(self.done, extra, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
