"""Child process of test_crash: trains an artifact with checkpoints, resuming from the last one.

`python -m tests.runtime.crash_child ART DATA CKPT HOOK N` (imports numpy + onnxruntime only). HOOK
announces a moment inside the N-th checkpoint write of this process on stdout and then stalls, so
the parent can SIGKILL it exactly there: "write" (the temp file half written), "rename" (temp file
complete, not yet renamed), "renamed" (renamed, folder not yet fsynced), or "none".
"""
from __future__ import annotations

import builtins
import os
import sys
import time

from pockprop.runtime import checkpoint, data
from pockprop.artifact import durable
from pockprop.runtime.loop import fit
from pockprop.runtime.trainer import Trainer

EPOCHS, SEED, EVERY = 5, 3, 4
SCHEDULE = {"name": "cosine", "warmup_steps": 3}


def announce(word: str) -> None:
    print(word, flush=True)
    time.sleep(30)  # the parent kills us now


def install(hook: str, target: int) -> None:
    writes = {"n": 0}
    real_open, real_replace = builtins.open, os.replace

    class HalfWriter:
        def __init__(self, f):  # type: ignore[no-untyped-def]
            self.f = f

        def write(self, b: bytes) -> int:
            self.f.write(b[: len(b) // 2])
            self.f.flush()
            announce("WRITE")
            return self.f.write(b[len(b) // 2:])

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(self.f, name)

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *exc) -> None:  # type: ignore[no-untyped-def]
            self.f.__exit__(*exc)

    def hooked_open(path, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        f = real_open(path, mode, *args, **kwargs)
        if durable.TMP_MARK in str(path) and ("w" in mode or "x" in mode):
            writes["n"] += 1
            if hook == "write" and writes["n"] == target:
                return HalfWriter(f)
        return f

    def hooked_replace(src, dst):  # type: ignore[no-untyped-def]
        if hook == "rename" and writes["n"] == target:
            announce("RENAME")
        real_replace(src, dst)
        if hook == "renamed" and writes["n"] == target:
            announce("RENAMED")

    builtins.open = hooked_open
    os.replace = hooked_replace


def main() -> int:
    art, data_path, ckpt, hook, target = sys.argv[1:6]
    if hook != "none":
        install(hook, int(target))
    trainer = Trainer.load(art, threads=1)
    if checkpoint.exists(ckpt):
        trainer.resume(ckpt)
        if trainer.progress and trainer.progress.get("finished"):
            print("DONE", flush=True)
            return 0
    ds = data.load(data_path)
    fit(trainer, ds, EPOCHS, seed=SEED, last_batch="wrap", schedule=SCHEDULE, checkpoint_dir=ckpt,
        checkpoint_every=EVERY, on_batch=lambda done, total, loss: time.sleep(0.002))
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
