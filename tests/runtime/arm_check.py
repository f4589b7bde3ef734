"""`make arm-check`: train an artifact compiled on x86 under emulated aarch64 and compare with x86.

    python -m tests.runtime.arm_check [--strict]        # the whole check (needs torch for the compile)
    python -m tests.runtime.arm_check train ART DATA OUT  # one training run (numpy + onnxruntime only)

The emulated Python comes from shared/arm/arm-python-setup.sh (Debian arm64 python3 + aarch64 wheels of
numpy and onnxruntime under qemu-user; cached in .cache/aarch64). If it cannot be built (no network,
not Debian, ...) the check is skipped with the reason and exits 0, unless --strict. Otherwise both
runs train the same artifact (a small CNN with AdamW) on the same batches, then checkpoint, resume
and export; the losses and predictions must agree within rtol 1e-4.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT.parent / "shared" / "arm" / "arm-python-setup.sh"
TARGET = ROOT / ".cache" / "aarch64"
STEPS, RTOL = 12, 1e-4


def train(art: str, data_path: str, out: str) -> None:
    """Train STEPS steps, checkpoint halfway and resume in a fresh Trainer, export; write the figures."""
    from pockprop.runtime.trainer import Trainer

    t0 = time.perf_counter()
    d = np.load(data_path)
    x, y = d["x"], d["y"]
    trainer = Trainer.load(art, threads=1)
    b = trainer.batch_size
    losses = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(STEPS):
            if i == STEPS // 2:  # the second half runs on a resumed trainer
                trainer.save_checkpoint(tmp)
                trainer = Trainer.load(art, threads=1)
                trainer.resume(tmp)
            j = (i * b) % (len(x) - b + 1)
            losses.append(trainer.step(x[j:j + b], y[j:j + b]))
        exported = os.path.join(tmp, "model.onnx")
        trainer.export_inference(exported)
        import onnxruntime as ort

        pred = ort.InferenceSession(exported, providers=["CPUExecutionProvider"]).run(None, {"input": x[:b]})[0]
    Path(out).write_text(json.dumps({"machine": platform.machine(), "losses": losses, "prediction": pred.tolist(),
                                     "seconds": round(time.perf_counter() - t0, 2)}))


def _artifact(work: Path) -> tuple[Path, Path]:
    import torch

    from pockprop.compiler.compile import compile

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 4 * 4, 5))
    art = compile(model, (torch.randn(4, 3, 8, 8),), optimizer={"name": "adamw", "lr": 3e-3}, name="arm_cnn")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    np.savez(work / "data.npz", x=x, y=(x[:, 0].mean(axis=(1, 2)) > 0).astype(np.int64) + 2 * (x[:, 1, 0, 0] > 0))
    return Path(art.save(str(work / "art"))), work / "data.npz"


def _child(python: list[str], art: Path, data: Path, out: Path, timeout: int) -> dict:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*python, "-m", "tests.runtime.arm_check", "train", str(art), str(data), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(python)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def compare(work: Path, arm_python: str) -> tuple[dict, dict, float, bool]:
    """Compile an artifact, run `train` natively and under `arm_python`; (native, arm, loss rel diff, preds agree)."""
    art, data = _artifact(work)
    native = _child([sys.executable], art, data, work / "x86.json", 300)
    t1 = time.perf_counter()
    arm = _child([arm_python], art, data, work / "arm.json", 600)
    arm["wall"] = round(time.perf_counter() - t1, 1)
    loss_diff = float(np.max(np.abs(np.subtract(arm["losses"], native["losses"])) / np.abs(native["losses"])))
    return native, arm, loss_diff, bool(np.allclose(arm["prediction"], native["prediction"], rtol=RTOL, atol=1e-5))


def check(strict: bool) -> int:
    t0 = time.perf_counter()
    if not SETUP.exists():
        return _skip(f"{SETUP} not found", strict)
    setup = subprocess.run(["bash", str(SETUP), str(TARGET)], capture_output=True, text=True, timeout=900)
    if setup.returncode != 0:
        return _skip("the emulator could not be built: " + (setup.stderr.strip().splitlines() or ["?"])[-1], strict)
    t_setup = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="arm-check-"))
    try:
        native, arm, loss_diff, pred_ok = compare(work, str(TARGET / "bin" / "python3"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = loss_diff <= RTOL and pred_ok
    print(f"arm-check: {STEPS} AdamW steps of a small CNN compiled on {native['machine']}, trained on "
          f"{arm['machine']} (emulated, QEMU_CPU={os.environ.get('QEMU_CPU', 'cortex-a53')}) with a checkpoint/resume "
          "halfway and an export")
    print(f"  losses {native['machine']}: {' '.join(f'{v:.6f}' for v in native['losses'])}")
    print(f"  losses {arm['machine']}: {' '.join(f'{v:.6f}' for v in arm['losses'])}")
    print(f"  max relative loss difference {loss_diff:.2e} (rtol {RTOL}); exported predictions "
          f"{'agree' if pred_ok else 'DIFFER'}")
    print(f"  time: emulator setup {t_setup:.1f}s, emulated run {arm['wall']}s (its own figure {arm['seconds']}s), "
          f"total {time.perf_counter() - t0:.1f}s")
    print("arm-check: " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def _skip(reason: str, strict: bool) -> int:
    print(f"arm-check: SKIPPED ({reason})")
    return 1 if strict else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        train(*argv[1:4])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strict", action="store_true", help="fail (exit 1) instead of skipping when no emulator")
    return check(p.parse_args(argv).strict)


if __name__ == "__main__":
    sys.exit(main())
