"""`make demo`: compile a zoo model, then train, evaluate and export it with the `pockprop` device commands.

The compile half uses torch (the workstation). The rest runs `pockprop train / eval / export` as
subprocesses, the commands a device runs with only numpy + onnxruntime: training on scikit-learn's
bundled digits with a progress bar and checkpoints, held-out accuracy before/after, then one
self-contained inference ONNX model with the fine-tuned weights. Exits 1 if the loss did not fall.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", help="zoo model name")
    p.add_argument("--width", type=float, default=16, help="width (ResNets: base channels; others: multiplier)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--trainable", default=None, help="parameter patterns (default: every parameter)")
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--out", default="out/demo")
    args = p.parse_args(argv)

    import torch

    from pockprop.compiler.compile import compile
    from pockprop.models.data import MEAN, STD, digits
    from pockprop.tracing.loader import ModelSpec

    x_train, y_train = digits(resolution=args.resolution, channels=3, split="train")
    x_test, y_test = digits(resolution=args.resolution, channels=3, split="test")
    width = {"width": int(args.width)} if args.model.startswith("resnet") else \
        {} if args.model == "mlp" else {"width_mult": args.width}
    model = ModelSpec(f"models:{args.model}", {"num_classes": 10, **width}, seed=0).build()[0]
    shape = (args.batch, 3, args.resolution, args.resolution)
    # pockprop trains with frozen BatchNorm statistics (the device fine-tunes; it does not re-estimate
    # them). A fresh model's statistics are mean 0 / var 1, which normalizes nothing, so calibrate them
    # on the workstation first: forward passes in train mode, no gradients.
    calibrate_batchnorm(model, x_train[:512])
    art_dir, ckpt = os.path.join(args.out, "artifact"), os.path.join(args.out, "checkpoints")
    print(f"[1/4] compiling {args.model} (input {shape}, SGD momentum 0.9, cross-entropy) ...", flush=True)
    t0 = time.perf_counter()
    # The device gets raw pixels in [0, 1]; the manifest tells it to normalize them as the model expects.
    art = compile(model, (torch.zeros(shape),), optimizer={"name": "sgd", "lr": args.lr, "momentum": 0.9},
                  trainable=args.trainable, name=args.model,
                  preprocess={"mean": [MEAN] * 3, "std": [STD] * 3})
    art.save(art_dir)
    total = sum(art.parameter_count.values())
    print(f"      {time.perf_counter() - t0:.1f}s -> {art_dir}/ (train_step.onnx: {len(art.train_model.graph.node)} "
          f"ONNX nodes; {art.trainable_count:,}/{total:,} parameters trainable)")
    train_npz, test_npz = os.path.join(args.out, "digits_train.npz"), os.path.join(args.out, "digits_test.npz")
    np.savez(train_npz, x=x_train * STD + MEAN, y=y_train)
    np.savez(test_npz, x=x_test * STD + MEAN, y=y_test)
    shutil.rmtree(ckpt, ignore_errors=True)  # a fresh run, not a new round on the last demo's checkpoint

    print(f"[2/4] training on the device side ({len(x_train)} train / {len(x_test)} held-out digits):", flush=True)
    pockprop(["train", art_dir, "--data", train_npz, "--eval-data", test_npz, "--epochs", str(args.epochs),
              "--schedule", "cosine", "--warmup-steps", "5", "--checkpoint-dir", ckpt, "--checkpoint-every", "20"])
    print("[3/4] evaluating the checkpoint:", flush=True)
    pockprop(["eval", art_dir, "--data", test_npz, "--checkpoint-dir", ckpt])
    print("[4/4] exporting one inference model with the fine-tuned weights:", flush=True)
    pockprop(["export", art_dir, "--checkpoint-dir", ckpt, "-o", os.path.join(args.out, "model.onnx")])

    doc = json.loads(pockprop(["inspect", art_dir, "--checkpoint-dir", ckpt, "--json"], quiet=True))
    round_ = doc["checkpoint"]["rounds"][-1]
    first, last = round_["epoch_losses"][0], round_["epoch_losses"][-1]
    print(f"done: mean loss per epoch {' -> '.join(f'{v:.3f}' for v in round_['epoch_losses'])}; held-out accuracy "
          f"{100 * round_['before']['accuracy']:.1f}% -> {100 * round_['after']['accuracy']:.1f}%")
    if not last < first:
        print("error: the loss did not fall", file=sys.stderr)
        return 1
    return 0


def pockprop(argv: list[str], quiet: bool = False) -> str:
    """Run a `pockprop` device command as the device would (a separate process); its stdout."""
    if not quiet:
        print(f"      $ pockprop {' '.join(argv)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "pockprop", *argv], stdout=subprocess.PIPE, text=True)
    if not quiet:
        print("      " + proc.stdout.rstrip().replace("\n", "\n      "), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"pockprop {argv[0]} failed with exit code {proc.returncode}")
    return proc.stdout


def calibrate_batchnorm(model, x: np.ndarray, batch: int = 64) -> None:  # type: ignore[no-untyped-def]
    """Set BatchNorm running statistics from data (cumulative average), leaving weights untouched."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(torch.from_numpy(x[i:i + batch]))
    model.eval()


if __name__ == "__main__":
    sys.exit(main())
