"""Checkpoints: resume is bit-identical, writes are atomic, failures leave the previous checkpoint intact."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pockprop.runtime import checkpoint, data
from pockprop.artifact import durable
from pockprop.errors import CheckpointError
from pockprop.runtime.loop import fit
from pockprop.runtime.trainer import Trainer
from tests.runtime.conftest import PY, ROOT, batch, dataset_npz


class Crash(Exception):
    pass


def _fit(art: Path, ds: data.Dataset, ckpt: Path | None, crash_at: int | None = None, resume: bool = False) -> Trainer:
    trainer = Trainer.load(str(art), threads=1)
    if resume:
        trainer.resume(str(ckpt))

    def on_batch(done: int, total: int, loss: float | None) -> None:
        if done == crash_at:
            raise Crash()

    fit(trainer, ds, 3, seed=7, schedule={"name": "cosine", "warmup_steps": 2}, holdout=0.25,
        checkpoint_dir=str(ckpt) if ckpt else None, checkpoint_every=3, on_batch=on_batch)
    return trainer


@pytest.mark.parametrize("name", ["mlp", "mlp_adamw"])
def test_crash_and_resume_equals_uninterrupted(artifact, tmp_path: Path, name: str) -> None:
    art = artifact(name)
    ds = data.load(str(dataset_npz(tmp_path / "d.npz", n=42)))
    ref = _fit(art, ds, None)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        _fit(art, ds, ckpt, crash_at=11)  # 8 batches an epoch; the last checkpoint is at batch 9
    _, meta = checkpoint.load(str(ckpt))
    assert meta["progress"]["epoch"] == 1 and meta["progress"]["batch"] == 1 and meta["steps"] == 9
    resumed = _fit(art, ds, ckpt, resume=True)
    assert resumed.steps == ref.steps and resumed.rejected == ref.rejected
    for k, v in ref.state.items():
        np.testing.assert_array_equal(resumed.state[k], v, err_msg=k)
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [strip(r) for r in resumed.rounds] == [strip(r) for r in ref.rounds]
    assert ref.rounds[0]["after"]["accuracy"] >= ref.rounds[0]["before"]["accuracy"]


def test_next_round_continues_from_the_checkpoint(artifact, tmp_path: Path) -> None:
    art = artifact()
    ckpt = str(tmp_path / "ckpt")
    first = data.load(str(dataset_npz(tmp_path / "a.npz", n=24, seed=1)))
    second = data.load(str(dataset_npz(tmp_path / "b.npz", n=24, seed=2)))
    t = Trainer.load(str(art))
    fit(t, first, 2, checkpoint_dir=ckpt)
    after_first = t.state
    t2 = Trainer.load(str(art))
    t2.resume(ckpt)
    for k, v in after_first.items():
        np.testing.assert_array_equal(t2.state[k], v)
    record = fit(t2, second, 1, holdout=0.25, checkpoint_dir=ckpt)
    assert record["round"] == 2 and record["steps"] == 4 and t2.steps == 16
    assert record["data"].endswith("b.npz (train part)") and "before" in record and "after" in record
    t3 = Trainer.load(str(art))
    t3.resume(ckpt)
    assert [r["round"] for r in t3.rounds] == [1, 2] and t3.progress["finished"]


def test_checkpoint_of_another_artifact_is_refused(artifact, tmp_path: Path) -> None:
    a = Trainer.load(str(artifact("mlp")))
    a.save_checkpoint(str(tmp_path / "c"))
    b = Trainer.load(str(artifact("mlp_adamw")))
    with pytest.raises(CheckpointError, match="made for another artifact"):
        b.resume(str(tmp_path / "c"))
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        b.resume(str(tmp_path / "empty"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_damaged_checkpoint_is_a_checkpoint_error(artifact, tmp_path: Path, damage: str) -> None:
    t = Trainer.load(str(artifact()))
    t.step(*batch(0))
    path = Path(t.save_checkpoint(str(tmp_path)))
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-2] ^= 1
    elif damage == "truncate":
        raw = raw[:-10]
    else:
        from pockprop.artifact import safetensors

        raw = bytearray(safetensors.dumps(t.state))
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=str(path)):
        Trainer.load(str(artifact())).resume(str(tmp_path))


def test_disk_full_keeps_the_previous_checkpoint(artifact, tmp_path: Path, monkeypatch) -> None:
    t = Trainer.load(str(artifact()))
    t.step(*batch(0))
    ckpt = tmp_path / "ckpt"
    path = t.save_checkpoint(str(ckpt))
    good = Path(path).read_bytes()
    t.step(*batch(1))

    def full(fd: int) -> None:  # delayed allocation: the data is written, fsync finds no space
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(durable.os, "fsync", full)
    with pytest.raises(CheckpointError, match="disk full.*previous file, if any, is unchanged"):
        t.save_checkpoint(str(ckpt))
    monkeypatch.undo()
    assert Path(path).read_bytes() == good
    assert sorted(os.listdir(ckpt)) == [checkpoint.FILE]  # the temp file was removed
    assert Trainer.load(str(artifact())).resume(str(ckpt))["steps"] == 1


def test_file_size_limit_during_write_keeps_the_previous_checkpoint(artifact, tmp_path: Path) -> None:
    """A real short write: RLIMIT_FSIZE makes the kernel refuse the write (EFBIG), in a child process."""
    art, ckpt = artifact(), tmp_path / "ckpt"
    script = textwrap.dedent(f"""
        import json, os, resource, signal, numpy as np
        from pockprop.runtime.trainer import Trainer
        from pockprop.errors import CheckpointError
        t = Trainer.load({str(art)!r})
        x = np.zeros((4, 6), np.float32); y = np.zeros(4, np.int64)
        t.step(x, y)
        path = t.save_checkpoint({str(ckpt)!r})
        size = os.path.getsize(path)
        t.step(x, y)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))
        try:
            t.save_checkpoint({str(ckpt)!r})
            print(json.dumps({{"error": None}}))
        except CheckpointError as ex:
            print(json.dumps({{"error": str(ex), "size": size}}))
    """)
    out = subprocess.run([PY, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["error"] and "file too large" in res["error"] and checkpoint.FILE in res["error"]
    assert sorted(os.listdir(ckpt)) == [checkpoint.FILE]
    assert os.path.getsize(ckpt / checkpoint.FILE) == res["size"]
    assert Trainer.load(str(art)).resume(str(ckpt))["steps"] == 1


def test_stale_temp_files_of_a_killed_writer_are_removed(artifact, tmp_path: Path) -> None:
    stale = tmp_path / f".{checkpoint.FILE}{durable.TMP_MARK}12345"
    stale.write_bytes(b"half a checkpoint")
    Trainer.load(str(artifact())).save_checkpoint(str(tmp_path))
    assert not stale.exists()
