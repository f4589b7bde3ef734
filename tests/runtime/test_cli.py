"""The device subcommands of `pockprop`: train (progress, checkpoints, resume, rounds), eval, export,
inspect, pack; --json; exit codes 0 / 2 (bad input) / 1 (internal error) / 130 (Ctrl-C) / 141 (stdout closed)."""
from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from pockprop.cli import main
from pockprop.errors import EXIT_BROKEN_PIPE
from pockprop.runtime import checkpoint, commands, data
from pockprop.runtime.loop import fit
from pockprop.runtime.progress import Progress
from pockprop.runtime.trainer import Trainer
from tests.runtime.conftest import PY, ROOT, dataset_npz


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_eval_export_inspect(artifact, tmp_path: Path, capsys) -> None:
    art, d, ck = str(artifact()), str(dataset_npz(tmp_path / "d.npz", n=40)), str(tmp_path / "ck")
    assert main(["train", art, "--data", d, "--epochs", "4", "--checkpoint-dir", ck, "--holdout", "0.2",
                 "--schedule", "cosine", "--warmup-steps", "2"]) == 0
    out = capsys.readouterr()
    assert "train [" in out.err and "steps/s" in out.err and "loss" in out.err  # the progress bar
    assert "round 1 on" in out.out and "held-out accuracy" in out.out and "checkpoint:" in out.out
    assert main(["eval", art, "--data", d, "--checkpoint-dir", ck, "--json"]) == 0
    ev = _json(capsys)
    assert ev["ok"] and ev["steps"] == 32 and ev["samples"] == 40 and 0 <= ev["accuracy"] <= 1
    assert main(["export", art, "--checkpoint-dir", ck, "-o", str(tmp_path / "m.onnx"), "--json"]) == 0
    ex = _json(capsys)
    assert ex["max_abs_diff_vs_predict"] < 1e-5 and ex["steps"] == 32
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": np.zeros((4, 6), np.float32)})[0].shape == (4, 3)
    assert main(["inspect", art, "--checkpoint-dir", ck]) == 0
    text = capsys.readouterr().out
    assert "all 3 file hashes verified" in text and "round 1:" in text and "32 steps" in text
    assert main(["inspect", art, "--json"]) == 0
    doc = _json(capsys)
    assert doc["batch_size"] == 4 and doc["state"][0]["name"] == "2.weight"
    assert main(["pack", art, "-o", str(tmp_path / "a.pockprop")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "a.pockprop"), "--data", d, "--checkpoint-dir", ck, "--json"]) == 0
    assert _json(capsys)["accuracy"] == ev["accuracy"]


def test_train_resume_and_rounds(artifact, tmp_path: Path, capsys) -> None:
    art, ck = str(artifact()), str(tmp_path / "ck")
    a, b = str(dataset_npz(tmp_path / "a.npz", seed=1)), str(dataset_npz(tmp_path / "b.npz", seed=2))
    assert main(["train", art, "--data", a, "--epochs", "1", "--checkpoint-dir", ck, "--json"]) == 0
    assert _json(capsys)["round"]["round"] == 1
    assert main(["train", art, "--data", a, "--checkpoint-dir", ck]) == 2  # would overwrite: say so
    assert "pass --resume" in capsys.readouterr().err
    assert main(["train", art, "--data", b, "--epochs", "2", "--checkpoint-dir", ck, "--resume", "--json",
                 "--export", str(tmp_path / "m.onnx")]) == 0
    doc = _json(capsys)
    assert doc["resumed"] and doc["round"]["round"] == 2 and doc["steps"] == 30 and Path(doc["export"]).exists()


@pytest.mark.parametrize("argv,needle", [
    (["--data", "{tmp}/missing.npz"], "missing.npz: no such file or folder"),
    (["--data", "{tmp}/d.npz", "--batch", "8"], "--batch 8: the artifact was compiled for batch 4"),
    (["--data", "{tmp}/wide.npz"], r"wide.npz: samples of shape (7,); the model expects (6,)"),
    (["--data", "{tmp}/d.npz", "--resume"], "--resume needs --checkpoint-dir"),
    (["--data", "{tmp}/d.npz", "--schedule", "step"], "--schedule step: the step schedule needs step_size > 0"),
    (["--data", "{tmp}/d.npz", "--epochs", "0"], "argument --epochs: must be an integer >= 1, got '0'"),
])
def test_bad_input_exits_2_with_a_message(artifact, tmp_path: Path, capsys, argv: list[str], needle: str) -> None:
    dataset_npz(tmp_path / "d.npz")
    np.savez(tmp_path / "wide.npz", x=np.zeros((8, 7), np.float32), y=np.zeros(8, np.int64))
    code = main(["train", str(artifact())] + [a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_internal_error_exits_1(artifact, tmp_path: Path, capsys, monkeypatch) -> None:
    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    monkeypatch.setattr(commands, "fit", broken)
    assert main(["train", str(artifact()), "--data", str(dataset_npz(tmp_path / "d.npz")), "--json"]) == 1
    out = capsys.readouterr()
    assert "internal error: RuntimeError: boom" in out.err and json.loads(out.out)["exit_code"] == 1


def test_progress_bar_redraws_on_a_terminal_and_prints_lines_otherwise() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, log = Tty(), io.StringIO()
    for stream in (tty, log):
        bar = Progress(100, "train ", stream=stream, interval=0 if stream is tty else 60)
        for i in range(1, 101):
            bar.update(i, f"loss {1 / i:.2f}")
        bar.close("loss 0.01")
    assert tty.getvalue().count("\r") == 101 and tty.getvalue().endswith("\n") and "100/100 loss 0.01" in tty.getvalue()
    lines = log.getvalue().splitlines()  # a line per quarter, not 100
    assert [ln.split()[2] for ln in lines] == ["25/100", "50/100", "75/100", "100/100"] and "\r" not in log.getvalue()


@pytest.mark.parametrize("argv,needle", [
    (["--export", "{art}/infer.onnx"], "is inside the artifact"),
    (["--export", "{tmp}/no/such/folder/m.onnx"], "does not exist"),
    (["--export", "{tmp}"], "is a folder"),
    (["--checkpoint-dir", "{tmp}/d.npz"], "--checkpoint-dir {tmp}/d.npz: exists and is not a folder"),
])
def test_train_outputs_are_checked_before_any_step(artifact, tmp_path: Path, capsys, argv: list[str],
                                                                needle: str) -> None:
    art, d = artifact(), dataset_npz(tmp_path / "d.npz")
    argv = [a.format(tmp=tmp_path, art=art) for a in argv]
    code = main(["train", str(art), "--data", str(d), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle.format(tmp=tmp_path) in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert main(["inspect", str(art)]) == 0  # the artifact is intact


@pytest.mark.parametrize("command,target", [("export", "infer.onnx"), ("export", "."), ("pack", "manifest.json"),
                                            ("pack", "state.safetensors"), ("pack", ".")])
def test_export_and_pack_refuse_to_write_into_the_artifact(artifact, capsys, command: str, target: str) -> None:
    art = artifact()
    before = {p.name: p.read_bytes() for p in art.iterdir()}
    assert main([command, str(art), "-o", str(art / target)]) == 2
    err = capsys.readouterr().err
    assert "is inside the artifact" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before
    assert main(["inspect", str(art)]) == 0


def test_export_and_pack_output_errors_are_one_line(artifact, tmp_path: Path, capsys) -> None:
    art = artifact()
    packed = tmp_path / "a.pockprop"
    assert main(["pack", str(art), "-o", str(packed)]) == 0
    assert main(["export", str(packed), "-o", str(packed)]) == 2  # the packed artifact is the artifact too
    assert "is inside the artifact" in capsys.readouterr().err
    for command in ("export", "pack"):
        assert main([command, str(art), "-o", str(tmp_path / "missing" / "x")]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'missing'} does not exist" in err and err.count("\n") == 1 and "Traceback" not in err


def test_ctrl_c_exits_130_in_one_line(artifact, tmp_path: Path, capsys, monkeypatch) -> None:
    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "fit", interrupted)
    assert main(["train", str(artifact()), "--data", str(dataset_npz(tmp_path / "d.npz")), "--no-progress"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "pockprop train: interrupted"


@pytest.mark.parametrize("flags", [[], ["--json"]], ids=["text", "json"])
def test_a_closed_stdout_exits_141_quietly(artifact, flags: list[str]) -> None:
    """`pockprop inspect A | head`: the reader is gone before the output; 141 (128 + SIGPIPE), nothing said."""
    proc = subprocess.Popen([PY, "-m", "pockprop", "inspect", str(artifact()), *flags], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # type: ignore[union-attr]
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_BROKEN_PIPE == 141 and err == b""


def test_ctrl_c_during_training_checkpoints_at_a_batch_boundary(artifact, tmp_path: Path, capsys) -> None:
    """SIGINT mid-training: a consistent checkpoint, exit 130 and one line saying so; resuming it ends
    where an uninterrupted run ends, bit for bit."""
    art, d, ck = str(artifact()), str(dataset_npz(tmp_path / "d.npz", n=40)), tmp_path / "ck"
    argv = ["train", art, "--data", d, "--epochs", "100", "--checkpoint-dir", str(ck), "--checkpoint-every", "25",
            "--no-progress"]
    proc = subprocess.Popen([PY, "-m", "pockprop", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not checkpoint.exists(str(ck)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    found = re.fullmatch(rf"pockprop train: interrupted: saved {re.escape(str(ck / checkpoint.FILE))} at step (\d+) "
                         r"\(round 1: (\d+) epochs and (\d+) batches done\); resuming on the same data continues "
                         r"from there", line)
    assert found, line
    steps, epochs, batches = map(int, found.groups())
    _, meta = checkpoint.load(str(ck))
    assert meta["steps"] == steps == 10 * epochs + batches < 1000
    assert meta["progress"]["epoch"] == epochs and meta["progress"]["batch"] == batches
    assert main([*argv, "--resume"]) == 0
    reference = Trainer.load(art)
    fit(reference, data.load(d), 100)
    tensors, meta = checkpoint.load(str(ck))
    assert meta["steps"] == reference.steps == 1000
    for k, v in reference.state.items():
        np.testing.assert_array_equal(tensors[k], v, err_msg=k)


def test_train_help_lists_the_exit_codes(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Exit codes: 0 trained; 2 bad input" in text and "3 training failed: the state diverged" in text
    assert "130 Ctrl-C" in text
