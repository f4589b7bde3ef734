"""A dependency-free progress bar: one line redrawn with carriage returns on a terminal; otherwise
(logs, CI, pipes) a plain line at each quarter of the run and at least every `interval` seconds."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def clock(seconds: float) -> str:
    """Seconds as m:ss, or h:mm:ss from an hour on."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class Progress:
    """Shows `done/total`, the latest loss, steps per second, the time elapsed and the time left (ETA).

    Elapsed time counts from the bar's creation (or `begin`). The rate and the ETA count only steps made
    after the first one the bar was told of, over the time since then: the first step (and what ran before
    it: sessions warming up, a held-out evaluation) has no time of its own to measure, so until a second
    step arrives the rate and the ETA show as "?" rather than a figure made up from it.
    """

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None, enabled: bool = True,
                 interval: float | None = None) -> None:
        self.total, self.label, self.enabled = max(total, 1), label, enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.1 if self.tty else 5.0)
        self.start = self._last = time.perf_counter()
        self.done = self.first = self.width = 0
        self._first_at: float | None = None  # when step `first` was reported: the rate's clock
        self.shown = 0  # the `done` last drawn

    def begin(self, done: int) -> None:
        """Start at `done` steps (a resumed run): restart the clocks; nothing before counts."""
        self.done = self.first = self.shown = done
        self.start = self._last = time.perf_counter()
        self._first_at = None

    def rate(self, now: float | None = None) -> float | None:
        """Steps per second since the first step reported; None until there are two."""
        now = time.perf_counter() if now is None else now
        if self._first_at is None or self.done <= self.first or now <= self._first_at:
            return None
        return (self.done - self.first) / (now - self._first_at)

    def line(self, done: int, extra: str) -> str:
        now = time.perf_counter()
        frac = min(done / self.total, 1.0)
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        rate = self.rate(now)
        speed = f"{rate:.1f} steps/s" if rate else "? steps/s"
        left = clock(max(self.total - done, 0) / rate) if rate else "?"
        return f"{self.label}[{bar}] {done}/{self.total} {extra} [{clock(now - self.start)}<{left}, {speed}]".rstrip()

    def update(self, done: int, extra: str = "", force: bool = False) -> None:
        """Report progress; drawn at most every `interval` seconds unless forced."""
        now = time.perf_counter()
        if self._first_at is None:  # the first step reported: the rate's clock starts now
            self._first_at, self.first = now, done
        self.done = done
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
        """Draw the final state and end the line (nothing if no step was reported)."""
        if not self.enabled or self._first_at is None:
            return
        if self.tty or self.shown != self.done:
            self.update(self.done, extra, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
