"""Run a command and record its peak resident memory: `python -m experiments.peak_rss OUT.json CMD...`.

The demo runs each device command through this small process rather than starting it itself: Linux
counts into a process's peak RSS the pages it was forked with (the parent's, until its exec), so a child
of the demo, which has torch loaded, would report at least the demo's own size. Forked from this small
process instead, the command's peak is its own (from about this process's ~10 MB up). The command's
output passes through; OUT.json gets {"peak_rss_mb": ..., "exit_code": ...}; the exit code is the command's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def main(argv: list[str]) -> int:
    out, *cmd = argv
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
    code = os.waitstatus_to_exitcode(status)
    mb = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux
    with open(out, "w") as f:
        json.dump({"peak_rss_mb": mb, "exit_code": code}, f)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
