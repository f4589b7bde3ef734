"""Checkpoints: resume is bit-identical, writes are atomic, failures leave the previous checkpoint intact."""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pockprop.runtime import checkpoint, data
from pockprop.artifact import durable
from pockprop.cli import main
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
    assert sorted(os.listdir(ckpt)) == [checkpoint.LOCK_FILE, checkpoint.FILE]  # the temp file was removed
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
    assert sorted(os.listdir(ckpt)) == [checkpoint.LOCK_FILE, checkpoint.FILE]
    assert os.path.getsize(ckpt / checkpoint.FILE) == res["size"]
    assert Trainer.load(str(art)).resume(str(ckpt))["steps"] == 1


def test_stale_temp_files_of_a_killed_writer_are_removed(artifact, tmp_path: Path) -> None:
    stale = tmp_path / f".{checkpoint.FILE}{durable.TMP_MARK}12345"
    stale.write_bytes(b"half a checkpoint")
    Trainer.load(str(artifact())).save_checkpoint(str(tmp_path))
    assert not stale.exists()


HOLDER = """
import sys, time
from pockprop.runtime import checkpoint
sys.argv = ["pockprop", "train", "held-by-the-test"]
with checkpoint.lock(sys.stdin.readline().strip()):
    print("held", flush=True)
    time.sleep(120)
"""


def test_one_training_run_per_checkpoint_directory(artifact, tmp_path: Path, capsys) -> None:
    art, d, ck = str(artifact()), str(dataset_npz(tmp_path / "d.npz")), tmp_path / "ck"
    holder = subprocess.Popen([PY, "-c", HOLDER], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        holder.stdin.write(f"{ck}\n")  # type: ignore[union-attr]
        holder.stdin.flush()  # type: ignore[union-attr]
        assert holder.stdout.readline().strip() == "held"  # type: ignore[union-attr]
        assert main(["train", art, "--data", d, "--checkpoint-dir", str(ck), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"pockprop train: error: {ck}: in use by another training run (pid {holder.pid} on "
                                  f"{socket.gethostname()} since ") and "pockprop train held-by-the-test" in err[-1]
        assert len(err) == 1 and not checkpoint.exists(str(ck))
        trainer = Trainer.load(art)  # the Python API too, before its first step
        with pytest.raises(CheckpointError, match="in use by another training run"):
            fit(trainer, data.load(d), 1, checkpoint_dir=str(ck))
        assert trainer.steps == 0
    finally:
        holder.kill()  # SIGKILL: the OS drops the lock with the process
        holder.wait()
    assert main(["train", art, "--data", d, "--checkpoint-dir", str(ck), "--no-progress"]) == 0  # no stale lock
    with checkpoint.lock(str(ck)), checkpoint.lock(str(ck)):  # re-entrant within a process
        Trainer.load(art).save_checkpoint(str(ck / "other"))


def test_an_unwritable_checkpoint_directory_fails_before_the_first_step(artifact, tmp_path: Path, monkeypatch,
                                                                      capsys) -> None:
    art, d = str(artifact()), str(dataset_npz(tmp_path / "d.npz"))

    def read_only(path: str, flags: int) -> int:  # what creating a file on a read-only mount gives
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(durable, "_exclusive", read_only)
    trainer = Trainer.load(art)
    with pytest.raises(CheckpointError, match=r"ck: cannot write files here \(Read-only file system\)"):
        fit(trainer, data.load(d), 2, checkpoint_dir=str(tmp_path / "ck"))
    assert trainer.steps == 0 and trainer.rejected == 0
    assert main(["train", art, "--data", d, "--checkpoint-dir", str(tmp_path / "ck2"), "--no-progress"]) == 2
    out = capsys.readouterr()
    assert "cannot write files here (Read-only file system)" in out.err and "round 1" not in out.out


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not stop root")
def test_a_read_only_checkpoint_folder_fails_before_the_first_step(artifact, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    ck.chmod(0o555)
    trainer = Trainer.load(str(artifact()))
    with pytest.raises(CheckpointError, match="ck: cannot write"):
        fit(trainer, data.load(str(dataset_npz(tmp_path / "d.npz"))), 2, checkpoint_dir=str(ck))
    assert trainer.steps == 0


def _rewrite_meta(ckpt: Path, change) -> None:  # type: ignore[no-untyped-def]
    tensors, meta = checkpoint.load(str(ckpt))
    change(meta)
    checkpoint.save(str(ckpt), tensors, {k: v for k, v in meta.items() if k not in ("format", "version", "tensors_sha256")})


@pytest.mark.parametrize("change, needle", [
    (lambda m: m["progress"].update(epoch="a"), "progress: 'epoch' is 'a'"),
    (lambda m: m["progress"].pop("batch"), "progress: no 'batch'"),
    (lambda m: m.update(progress=[1, 2]), "progress: expected an object, got [1, 2]"),
    (lambda m: m.update(rounds={"round": 1}), "rounds: expected a list"),
    (lambda m: m["rounds"][0].pop("steps"), "rounds[0]: no 'steps'"),
    (lambda m: m["rounds"][0].update(epoch_losses=["x"]), "rounds[0]: 'epoch_losses' is ['x']"),
    (lambda m: m["rounds"][0].update(after=None), "rounds[0]: 'after' is None"),
    (lambda m: m.update(guard={"floor": -1}), "guard: expected {floor, norms, first, recent}"),
], ids=["epoch", "no-batch", "progress-list", "rounds-dict", "round-no-steps", "losses", "after", "guard"])
def test_malformed_checkpoint_metadata_is_one_line(artifact, tmp_path: Path, capsys, change, needle: str) -> None:
    art, d, ck = str(artifact()), str(dataset_npz(tmp_path / "d.npz")), tmp_path / "ck"
    assert main(["train", art, "--data", d, "--checkpoint-dir", str(ck), "--holdout", "0.25", "--no-progress"]) == 0
    _rewrite_meta(ck, change)
    capsys.readouterr()
    with pytest.raises(CheckpointError, match=re.escape(f"malformed checkpoint metadata ({needle}")):
        Trainer.load(art).resume(str(ck))
    for argv in (["inspect", art], ["train", art, "--data", d, "--resume"]):
        assert main([*argv, "--checkpoint-dir", str(ck)]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and err.count("\n") <= 3
