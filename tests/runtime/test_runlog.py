"""`pockprop train --log` (JSON lines per step), `pockprop plot`, and the progress bar's rate and ETA."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pockprop.cli import main
from pockprop.runtime import plot, progress, runlog
from pockprop.runtime.data import Dataset
from pockprop.runtime.loop import fit
from pockprop.runtime.progress import Progress
from pockprop.runtime.trainer import Trainer
from tests.runtime.conftest import dataset_npz

STEP_KEYS = {"event", "round", "epoch", "batch", "step", "loss", "lr", "rejected", "reason", "seconds", "time"}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_log_has_a_record_per_step_and_held_out_metrics_per_epoch(artifact, tmp_path: Path, capsys) -> None:
    art, d, log = artifact(), dataset_npz(tmp_path / "d.npz", n=40), tmp_path / "run.jsonl"
    ck = tmp_path / "ck"
    assert main(["train", str(art), "--data", str(d), "--epochs", "3", "--holdout", "0.2", "--schedule", "cosine",
                 "--checkpoint-dir", str(ck), "--log", str(log), "--no-progress"]) == 0
    recs = _lines(log)
    events = [r["event"] for r in recs]
    assert events[0] == "start" and events[-1] == "end" and events.count("epoch") == 3
    steps = [r for r in recs if r["event"] == "step"]
    assert len(steps) == 3 * 8 and all(set(r) == STEP_KEYS for r in steps)  # 32 samples, batch 4
    assert [r["step"] for r in steps] == list(range(1, 25)) and [r["batch"] for r in steps[:8]] == list(range(1, 9))
    assert all(not r["rejected"] and r["reason"] is None and r["loss"] > 0 and r["seconds"] > 0 for r in steps)
    lrs = [r["lr"] for r in steps]
    assert lrs[0] == pytest.approx(0.1) and lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.01  # cosine, decaying
    epochs = [r for r in recs if r["event"] == "epoch"]
    assert all(set(r["held_out"]) == {"samples", "loss", "accuracy"} and r["held_out"]["samples"] == 8 for r in epochs)
    capsys.readouterr()
    assert main(["inspect", str(art), "--checkpoint-dir", str(ck), "--json"]) == 0
    ckpt = json.loads(capsys.readouterr().out)
    round_ = ckpt["checkpoint"]["rounds"][0]
    assert recs[0]["held_out"] == round_["before"] and epochs[-1]["held_out"] == round_["after"] == recs[-1]["held_out"]
    assert [r["loss"] for r in epochs] == pytest.approx(round_["epoch_losses"])

    # A second round appends to the same file; the first's lines are kept.
    assert main(["train", str(art), "--data", str(dataset_npz(tmp_path / "e.npz", seed=1)), "--checkpoint-dir", str(ck),
                 "--resume", "--log", str(log), "--no-progress"]) == 0
    again = _lines(log)
    assert again[:len(recs)] == recs and again[len(recs)]["event"] == "start" and again[len(recs)]["round"] == 2
    assert not again[len(recs)]["resumed"] and "held_out" not in again[len(recs)]  # no held-out data this time


def test_rejected_steps_are_logged_with_the_reason(artifact) -> None:
    trainer = Trainer.load(str(artifact()))
    x = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    x[0, 0] = np.nan  # one batch of two holds a NaN
    records: list[dict] = []
    fit(trainer, Dataset(x, np.zeros(8, np.int64), "nan.npz"), 1, log=records.append)
    steps = [r for r in records if r["event"] == "step"]
    bad = [r for r in steps if r["rejected"]]
    assert len(steps) == 2 and len(bad) == 1 and bad[0]["loss"] is None and "NaN" in bad[0]["reason"]
    assert records[-1]["rejected"] == 1


def test_log_path_is_checked_before_training(artifact, tmp_path: Path, capsys) -> None:
    art, d = artifact(), dataset_npz(tmp_path / "d.npz")
    ck = tmp_path / "ck"
    code = main(["train", str(art), "--data", str(d), "--checkpoint-dir", str(ck), "--log", str(tmp_path),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"--log {tmp_path}: is a folder" in err and "Traceback" not in err
    assert not ck.exists()  # nothing trained


def test_runlog_lines_are_whole_json_even_after_a_torn_write(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"event": "step", "round": 1, "epoch": 1, "batch": 1, "loss": 2.0}\n{"event": "st')  # torn
    with runlog.RunLog(str(path)) as log:
        log.write({"event": "step", "round": 1, "epoch": 1, "batch": 1, "loss": np.float32(1.5), "lr": float("nan")})
    records, skipped = runlog.read(str(path))
    assert skipped == 1 and [r["loss"] for r in records] == [2.0, 1.5] and records[1]["lr"] is None
    assert path.read_text().endswith("}\n")
    assert [r["loss"] for r in runlog.latest(records, "step")] == [1.5]  # the repeated step replaces the first


def test_plot_writes_a_png_of_the_loss_and_accuracy(artifact, tmp_path: Path, capsys) -> None:
    art, d, log = artifact(), dataset_npz(tmp_path / "d.npz", n=40), tmp_path / "run.jsonl"
    assert main(["train", str(art), "--data", str(d), "--epochs", "2", "--holdout", "0.2", "--log", str(log),
                 "--no-progress"]) == 0
    c = plot.curves(runlog.read(str(log))[0], "run")
    assert c.steps == list(range(1, 17)) and c.eval_steps == [0, 8, 16] and len(c.accuracy) == 3
    capsys.readouterr()
    png = tmp_path / "loss.png"
    assert main(["plot", str(log), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "run: 16 steps" in capsys.readouterr().out


def test_plot_errors_are_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"event": "start", "round": 1}\n')
    assert main(["plot", str(empty), "-o", str(tmp_path / "x.png")]) == 2
    assert "no training steps" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x.png")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    log = tmp_path / "ok.jsonl"
    log.write_text('{"event": "step", "round": 1, "epoch": 1, "batch": 1, "loss": 1.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the [plot] extra were not installed
    assert main(["plot", str(log), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'pockprop[plot]'" in err and err.count("\n") == 1 and not (tmp_path / "x.png").exists()


def test_smooth_is_a_trailing_mean() -> None:
    assert plot.smooth([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]


def test_progress_rate_and_eta_ignore_the_first_step(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    bar = Progress(10, "train ", stream=out, interval=0)
    now[0] = 130.0  # a slow first step (sessions warming up, a held-out evaluation before it)
    bar.update(1, "loss 1")
    assert out.getvalue().splitlines()[-1].endswith("[0:30<?, ? steps/s]")  # no rate from one step
    now[0] = 132.0
    bar.update(5, "loss 1")  # 4 steps in 2 s
    assert out.getvalue().splitlines()[-1].endswith("[0:32<0:02, 2.0 steps/s]")
    bar.begin(5)  # a resumed run counts from its own start
    now[0] = 140.0
    bar.update(6)
    assert out.getvalue().splitlines()[-1].endswith("[0:08<?, ? steps/s]")
    assert progress.clock(3725) == "1:02:05"


def test_train_progress_shows_elapsed_and_eta(artifact, tmp_path: Path, capsys) -> None:
    assert main(["train", str(artifact()), "--data", str(dataset_npz(tmp_path / "d.npz", n=40)), "--epochs", "2"]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("train [")]
    assert lines and lines[-1].startswith("train [########################] 20/20 loss")
    assert "<0:00," in lines[-1] and "steps/s]" in lines[-1]
