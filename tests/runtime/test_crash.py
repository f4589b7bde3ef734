"""Crash test: a child trains with checkpoints and is SIGKILLed at random points and inside checkpoint
writes; after every kill the checkpoint loads, and the final state equals an uninterrupted run's."""
from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pockprop.runtime import checkpoint, data
from pockprop.runtime.loop import fit
from pockprop.runtime.trainer import Trainer
from tests.runtime import crash_child as child
from tests.runtime.conftest import PY, ROOT

TRIALS = 12
HOOKS = ["write", "rename", "renamed"]


def _data(path: Path) -> Path:
    """42 samples (the last batch of each epoch wraps) with one NaN sample: its batches are rejected."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((42, 6)).astype(np.float32)
    y = x[:, :3].argmax(axis=1)
    x[17, 2] = np.nan
    np.savez(path, x=x, y=y)
    return path


@functools.lru_cache(maxsize=None)
def _reference(art: str, data_path: str) -> tuple[dict[str, np.ndarray], dict]:
    trainer = Trainer.load(art, threads=1)
    fit(trainer, data.load(data_path), child.EPOCHS, seed=child.SEED, last_batch="wrap", schedule=child.SCHEDULE)
    return trainer.state, {"steps": trainer.steps, "rejected": trainer.rejected,
                           "epoch_losses": trainer.rounds[0]["epoch_losses"]}


def _run(art: Path, data_path: Path, ckpt: Path, hook: str, target: int, delay: float | None) -> tuple[bool, str]:
    """Run the child once; kill it at the hook's announcement or after `delay` s. (killed, output)."""
    proc = subprocess.Popen([PY, "-m", "tests.runtime.crash_child", str(art), str(data_path), str(ckpt), hook,
                             str(target)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = False
    try:
        if hook != "none":
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if line.strip() in ("WRITE", "RENAME", "RENAMED"):
                proc.send_signal(signal.SIGKILL)
                killed = True
        elif delay is not None:
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                killed = True
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if not killed:
        assert proc.returncode == 0, err
    return killed, out


@pytest.mark.parametrize("trial", range(TRIALS))
def test_sigkill_anywhere_then_resume_equals_uninterrupted(compiled, tmp_path: Path, trial: int) -> None:
    art = compiled("mlp")
    data_path = _data(tmp_path / "d.npz")
    ckpt = tmp_path / "ckpt"
    ref_state, ref = _reference(str(art), str(data_path))
    rng = random.Random(trial)
    # Two kills per trial: inside the n-th checkpoint write of a fresh run (the hooks in rotation), then
    # at a random moment of the resumed run (an uninterrupted child takes about 0.5 s, start-up included).
    plans = [(HOOKS[trial % 3], rng.randint(1, 6), None), ("none", 0, rng.uniform(0.05, 0.55))]
    kills = 0
    for hook, target, delay in plans:
        killed, _ = _run(art, data_path, ckpt, hook, target, delay)
        kills += killed
        if checkpoint.exists(str(ckpt)):  # every checkpoint left behind loads and verifies
            Trainer.load(str(art), threads=1).resume(str(ckpt))
        leftovers = [f for f in os.listdir(ckpt) if f not in (checkpoint.FILE, checkpoint.LOCK_FILE)] if ckpt.exists() else []
        assert all(f.startswith(f".{checkpoint.FILE}") for f in leftovers)  # at most a dead writer's temp file
    assert kills >= 1  # the hook always fires: a fresh run writes more than 6 checkpoints
    for _ in range(3):  # then run to the end (a random kill may have hit before the first checkpoint)
        killed, out = _run(art, data_path, ckpt, "none", 0, None)
        if "DONE" in out:
            break
    tensors, meta = checkpoint.load(str(ckpt))
    assert meta["steps"] == ref["steps"] and meta["rejected"] == ref["rejected"] > 0
    assert meta["rounds"][0]["epoch_losses"] == ref["epoch_losses"] and len(meta["rounds"]) == 1
    for k, v in ref_state.items():
        np.testing.assert_array_equal(tensors[k], v, err_msg=k)


def test_child_announces_inside_a_checkpoint_write(compiled, tmp_path: Path) -> None:
    """The hooks really stop the child mid-write: the half-written temp file is there, the old checkpoint too."""
    art = compiled("mlp")
    data_path = _data(tmp_path / "d.npz")
    ckpt = tmp_path / "ckpt"
    killed, _ = _run(art, data_path, ckpt, "write", 3, None)
    assert killed
    temps = [f for f in os.listdir(ckpt) if f.startswith(f".{checkpoint.FILE}")]
    assert len(temps) == 1 and 0 < (ckpt / temps[0]).stat().st_size < (ckpt / checkpoint.FILE).stat().st_size
    _, meta = checkpoint.load(str(ckpt))
    assert meta["progress"]["epoch"] * 11 + meta["progress"]["batch"] == 2 * child.EVERY
    time.sleep(0)  # nothing else to wait for: the child is gone
