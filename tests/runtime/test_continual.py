"""Continual rounds: the replay buffer (reservoir, mixed into batches, in the checkpoint, resumed bit for bit),
the old task evaluated each round (inspect's table), and dataset pruning (loss, EL2N; kept indices logged)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pockprop.cli import main
from pockprop.errors import DataError
from pockprop.runtime import checkpoint, data, prune
from pockprop.runtime.loop import fit
from pockprop.runtime.replay import ReplayBuffer
from pockprop.runtime.trainer import Trainer
from tests.runtime.conftest import dataset_npz, tags_data


def _chunks(n: int, start: int = 0, size: int = 7):
    for i in range(start, start + n, size):
        ids = np.arange(i, min(i + size, start + n))
        yield {"x": ids[:, None].astype(np.float32)}, ids.astype(np.int64)


def test_reservoir_is_uniform_and_seeded() -> None:
    counts = np.zeros(60)
    for seed in range(300):
        buf = ReplayBuffer(10)
        buf.offer(_chunks(30), seed, 1)
        buf.offer(_chunks(30, start=30), seed, 2)
        assert len(buf) == 10 and buf.seen == 60 and len(set(buf.y.tolist())) == 10
        np.testing.assert_array_equal(buf.x["x"][:, 0], buf.y)  # samples and labels stay paired
        counts[buf.y] += 1
    # each of the 60 samples is kept with probability 1/6: 50 expected of 300 runs
    assert counts.min() > 25 and counts.max() < 80
    a, b = ReplayBuffer(10), ReplayBuffer(10)
    for buf in (a, b):
        buf.offer(_chunks(30), 3, 1)
    np.testing.assert_array_equal(a.y, b.y)
    small = ReplayBuffer(100)
    small.offer(_chunks(30), 0, 1)  # filling up: everything, in order
    np.testing.assert_array_equal(small.y, np.arange(30))
    assert small.per_batch(8) == 2 and ReplayBuffer(3).per_batch(8) == 0
    with pytest.raises(ValueError):
        ReplayBuffer(0)


def _fit(art: Path, rounds: list[data.Dataset], ckpt: Path, crash_at: tuple[int, int] | None = None,
         resume: bool = False, replay: int = 12) -> Trainer:
    trainer = Trainer.load(str(art), threads=1)
    trainer.replay = ReplayBuffer(replay, 0.25)
    if resume:
        trainer.resume(str(ckpt))
    done = len(trainer.rounds)
    for r, ds in enumerate(rounds):
        if r < done:
            continue

        def on_batch(i: int, total: int, loss: float | None, r: int = r) -> None:
            if crash_at == (r, i):
                raise KeyboardInterrupt  # not Ctrl-C's handler (fit installs it only in the main thread's SIGINT)

        fit(trainer, ds, 2, seed=5, checkpoint_dir=str(ckpt), checkpoint_every=2, on_batch=on_batch)
    return trainer


def test_replay_rounds_resume_bit_for_bit(artifact, tmp_path: Path) -> None:
    """The buffer is in the checkpoint: a run stopped in round 2 and resumed ends exactly like one that never
    stopped, and the stored buffer is the one the round started with."""
    art = artifact()
    rounds = [data.load(str(dataset_npz(tmp_path / f"r{i}.npz", n=20, seed=i))) for i in range(3)]
    ref = _fit(art, rounds, tmp_path / "ref")
    assert [r["replay"] for r in ref.rounds] == [12, 12, 12] and ref.replay.seen == 60
    # round 2 trains 20 new samples 3 to a batch (the buffer fills 1 of 4 places): 6 batches an epoch
    assert ref.rounds[0]["steps"] == 10 and ref.rounds[1]["steps"] == 12
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        _fit(art, rounds, ck, crash_at=(1, 9))
    tensors, meta = checkpoint.load(str(ck))
    assert meta["progress"]["round"] == 2 and meta["steps"] == 18 and meta["replay"]["seen"] == 20
    assert tensors["replay/y"].shape == (12,) and tensors["replay/x/input"].shape == (12, 6)
    resumed = _fit(art, rounds, ck, resume=True)
    assert resumed.steps == ref.steps
    for k, v in ref.state.items():
        np.testing.assert_array_equal(resumed.state[k], v, err_msg=k)
    np.testing.assert_array_equal(resumed.replay.y, ref.replay.y)
    np.testing.assert_array_equal(resumed.replay.x["input"], ref.replay.x["input"])


def test_cli_replay_eval_old_and_inspect_table(artifact, tmp_path: Path, capsys) -> None:
    art, ck = str(artifact("tags")), str(tmp_path / "ck")
    for i in range(3):
        x, y = tags_data(24, seed=i)
        np.savez(tmp_path / f"r{i}.npz", x=x, y=y)
    old = str(tmp_path / "r0.npz")
    for i in range(3):
        argv = ["train", art, "--data", str(tmp_path / f"r{i}.npz"), "--checkpoint-dir", ck, "--resume",
                "--replay", "8", "--eval-old", old, "--eval-data", str(tmp_path / "r2.npz")]
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert "old task mAP" in out and "replay buffer: 8 samples" in out
    assert main(["train", art, "--data", old, "--checkpoint-dir", ck, "--resume", "--replay", "5"]) == 2
    assert "holds up to 8 samples; pass --replay 8" in capsys.readouterr().err
    assert main(["inspect", art, "--checkpoint-dir", ck]) == 0
    out = capsys.readouterr().out
    table = out[out.index("new task mAP"):].splitlines()
    assert len([row for row in table[1:4] if row.split()[0] in "123"]) == 3
    assert "replay buffer: 8 of up to 8 samples (72 seen)" in out
    assert main(["inspect", art, "--checkpoint-dir", ck, "--json"]) == 0
    rounds = json.loads(capsys.readouterr().out)["checkpoint"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3] and all("mAP" in r["old"] and "mAP" in r["old_before"]
                                                              for r in rounds)
    assert rounds[0]["old"]["mAP"] > rounds[0]["old_before"]["mAP"]  # round 1 trains on the old task itself


def test_prune_scores_by_hand() -> None:
    z = np.array([[2.0, 0.0], [0.0, 0.0], [-3.0, 1.0]])
    y = np.array([0, 1, 1])
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    ce = {"name": "cross_entropy"}
    np.testing.assert_allclose(prune.scores(ce, z, y, "loss"), -np.log(p[np.arange(3), y]))
    np.testing.assert_allclose(prune.scores(ce, z, y, "el2n"), np.linalg.norm(p - np.eye(2)[y], axis=1))
    t = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    bce = {"name": "bce_with_logits"}
    np.testing.assert_allclose(prune.scores(bce, z, t, "el2n"), np.linalg.norm(1 / (1 + np.exp(-z)) - t, axis=1))
    want = np.mean(np.log1p(np.exp(-z)) * t + np.log1p(np.exp(z)) * (1 - t), axis=1)
    np.testing.assert_allclose(prune.scores(bce, z, t, "loss"), want)
    np.testing.assert_array_equal(prune.keep(np.array([0.1, 0.5, 0.5, 0.2, 0.9]), 0.5), [1, 2, 4])
    np.testing.assert_array_equal(prune.keep(np.array([0.3, 0.1]), 0.1), [0])  # at least one
    with pytest.raises(DataError, match="el2n"):
        prune.scores(ce, z, y, "grand")


def test_pruned_round_logs_and_resumes_the_kept_samples(artifact, tmp_path: Path, capsys) -> None:
    art, ck, log = str(artifact()), str(tmp_path / "ck"), tmp_path / "run.jsonl"
    d = str(dataset_npz(tmp_path / "d.npz", n=24))
    argv = ["train", art, "--data", d, "--epochs", "2", "--checkpoint-dir", ck, "--prune-keep", "0.5",
            "--prune-score", "loss", "--log", str(log), "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["round"]["kept"] == 12 and doc["round"]["steps"] == 6  # 12 samples, batch 4, 2 epochs
    pruned = [json.loads(line) for line in log.read_text().splitlines() if '"prune"' in line]
    assert len(pruned) == 1 and pruned[0]["kept"] == 12 and pruned[0]["of"] == 24
    trainer = Trainer.load(art)
    ds = data.load(d)
    z = trainer.predict(ds.x)
    want = prune.keep(prune.scores(trainer.manifest.loss, z, ds.y, "loss"), 0.5)
    assert pruned[0]["indices"] == want.tolist()
    _, meta = checkpoint.load(ck)
    assert meta["progress"]["kept"] == want.tolist()


def _kd_fit(art: Path, rounds: list[data.Dataset], ckpt: Path, crash_at: tuple[int, int] | None = None,
            resume: bool = False) -> Trainer:
    trainer = Trainer.load(str(art), threads=1)
    trainer.replay = ReplayBuffer(8, 0.25)
    if resume:
        trainer.resume(str(ckpt))
    for r, ds in enumerate(rounds[len(trainer.rounds):], start=len(trainer.rounds)):
        def on_batch(i: int, total: int, loss: float | None, r: int = r) -> None:
            if crash_at == (r, i):
                raise KeyboardInterrupt
        fit(trainer, ds, 2, seed=3, checkpoint_dir=str(ckpt), checkpoint_every=2, on_batch=on_batch, kd_previous=True)
    return trainer


def test_kd_from_the_previous_round(artifact, tmp_path: Path) -> None:
    """The teacher is the model as the round starts: at a round's first step student and teacher agree, so the
    kd term is 0 and the loss is alpha x the task loss. Its logits ride in the checkpoint until the round ends,
    so a round stopped half way and resumed ends exactly like an uninterrupted one."""
    art = artifact("tags_kd")
    rounds = [data.Dataset(*tags_data(20, seed=i), f"r{i}") for i in range(2)]
    trainer = Trainer.load(str(art), threads=1)
    first = data.batch_indices(data.epoch_order(20, 3, 1, 0), 4)[0]
    x, y = rounds[0].x[first], rounds[0].y[first]
    task = trainer.evaluate(x, y)["loss"]  # BCE of the starting weights on the first batch
    records = []
    fit(trainer, rounds[0], 1, seed=3, kd_previous=True, log=records.append)
    step1 = next(r for r in records if r["event"] == "step")
    assert step1["loss"] == pytest.approx(0.5 * task, rel=1e-5)

    ref = _kd_fit(art, rounds, tmp_path / "ref")
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        _kd_fit(art, rounds, ck, crash_at=(1, 5))
    tensors, meta = checkpoint.load(str(ck))
    assert meta["progress"]["round"] == 2 and tensors["kd/teacher_logits"].shape == (20, 3)
    assert tensors["replay/x/teacher_logits"].shape == (8, 3)  # the buffer's, from the same teacher
    resumed = _kd_fit(art, rounds, ck, resume=True)
    for k, v in ref.state.items():
        np.testing.assert_array_equal(resumed.state[k], v, err_msg=k)
    tensors, _ = checkpoint.load(str(ck))
    assert "kd/teacher_logits" not in tensors  # the finished round's teacher is not kept


def test_kd_previous_needs_a_kd_artifact(artifact, tmp_path: Path, capsys) -> None:
    d = str(dataset_npz(tmp_path / "d.npz", n=12))
    assert main(["train", str(artifact()), "--data", d, "--kd-previous"]) == 2
    assert "needs an artifact compiled with loss kd and teacher logits" in capsys.readouterr().err
