"""`make demo`: compile a zoo model, then train it on scikit-learn's bundled digits through onnxruntime.

The compile half uses torch (on the workstation); the training half uses only runtime.Trainer
(numpy + onnxruntime), as a device would. Prints the loss falling and test accuracy before/after.
"""
from __future__ import annotations

import argparse
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

    import models
    from engine.compile import compile
    from models.data import digits
    from runtime.trainer import Trainer, batches

    x_train, y_train = digits(resolution=args.resolution, channels=3, split="train")
    x_test, y_test = digits(resolution=args.resolution, channels=3, split="test")
    torch.manual_seed(0)
    width = {"width": int(args.width)} if args.model.startswith("resnet") else \
        {} if args.model == "mlp" else {"width_mult": args.width}
    model = models.resolve(f"models:{args.model}", num_classes=10, **width)[0]
    shape = (args.batch, 3, args.resolution, args.resolution)
    # pockprop trains with frozen BatchNorm statistics (the device fine-tunes; it does not re-estimate
    # them). A fresh model's statistics are mean 0 / var 1, which normalizes nothing, so calibrate them
    # on the workstation first: forward passes in train mode, no gradients.
    calibrate_batchnorm(model, x_train[:512])
    print(f"[1/3] compiling {args.model} (input {shape}, SGD momentum 0.9, cross-entropy) ...", flush=True)
    t0 = time.perf_counter()
    art = compile(model, (torch.zeros(shape),), optimizer={"name": "sgd", "lr": args.lr, "momentum": 0.9},
                  trainable=args.trainable, name=args.model)
    art.save(args.out)
    total = sum(art.parameter_count.values())
    print(f"      {time.perf_counter() - t0:.1f}s -> {args.out}/ (train_step.onnx: "
          f"{len(art.train_model.graph.node)} ONNX nodes; {art.trainable_count:,}/{total:,} parameters trainable)")

    print("[2/3] training with runtime.Trainer (numpy + onnxruntime only) on sklearn digits "
          f"({len(x_train)} train / {len(x_test)} test images)", flush=True)
    trainer = Trainer.load(args.out)
    before = trainer.evaluate(batches(x_test, y_test, args.batch, seed=None))["accuracy"]
    t0, losses = time.perf_counter(), []
    for epoch in range(args.epochs):
        for i, (x, y) in enumerate(batches(x_train, y_train, args.batch, seed=epoch)):
            losses.append(trainer.step(x, y))
            if trainer.steps % 10 == 0:
                print(f"      step {trainer.steps:4d}  epoch {epoch + 1}  loss {np.mean(losses[-10:]):.4f}", flush=True)
    rate = trainer.steps / (time.perf_counter() - t0)
    after = trainer.evaluate(batches(x_test, y_test, args.batch, seed=None))["accuracy"]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"[3/3] loss {first:.3f} -> {last:.3f} over {trainer.steps} steps ({rate:.1f} steps/s); "
          f"test accuracy {100 * before:.1f}% -> {100 * after:.1f}%")
    if not last < first:
        print("error: the loss did not fall", file=sys.stderr)
        return 1
    return 0


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
