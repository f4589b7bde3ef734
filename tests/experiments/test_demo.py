"""`make demo` on a tiny setting: pre-train, compile sparse and full, fine-tune each through the device
commands, measure, plot, print the table."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from experiments import accuracy, demo  # noqa: E402
from experiments.drift import make_task  # noqa: E402

TINY = ["--width", "4", "--resolution", "8", "--pretrain-epochs", "1", "--epochs", "2", "--threads", "1"]


def test_demo_tiny(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # `python -m experiments...` from the repo root
    out = tmp_path / "demo"
    assert demo.main([*TINY, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    # every device step is printed as the command a user types
    for cmd in ("$ pockprop compile models:resnet18", "--scheme sparse", "--scheme full", "--weights",
                f"$ pockprop train {out}/sparse", f"$ pockprop train {out}/full", f"--log {out}/sparse.jsonl",
                f"$ pockprop eval {out}/full", f"$ pockprop export {out}/full"):
        assert cmd in text, cmd
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith(("| sparse", "| full"))}
    assert set(rows) == {"sparse", "full"}
    sparse, full = rows["sparse"], rows["full"]
    assert "(100.0%)" in full[0] and int(sparse[0].split()[0].replace(",", "")) < int(full[0].split()[0].replace(",", ""))
    assert sparse[1].split(" -> ")[0] == full[1].split(" -> ")[0]  # the same pre-trained model before
    assert all(float(r[2]) > 0 for r in (sparse, full))  # ms/step
    if hasattr(os, "wait4"):  # peak RSS is measured: training adds memory over inference only
        assert all(float(r[4]) > 30 and float(r[5]) > 0 for r in (sparse, full))
    assert "demo took" in text
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    steps = [json.loads(line) for line in (out / "sparse.jsonl").read_text().splitlines()]
    assert len([r for r in steps if r["event"] == "step"]) == 2 * (721 // 32)

    # The pre-trained weights are cached: a second run does not train in PyTorch again.
    cfg = accuracy.Config(width=4, resolution=8, pretrain_epochs=1, threads=1)
    task = make_task("input", 8, 3)
    assert os.path.exists(accuracy.pretrained_path(task, cfg, str(out)))
    monkeypatch.setattr(accuracy, "build", lambda *a, **k: pytest.fail("pre-trained again"))
    assert set(accuracy.pretrain(task, cfg, str(out))) >= {"fc.weight", "conv1.weight"}
