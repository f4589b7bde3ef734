"""How far real runs stay from the training guard's limits (runtime.guard), and what it does to absurd ones.

`python -m experiments.guard_margins [--quick]` compiles zoo models for scikit-learn's digits (mlp on the
flat 64 pixels: SGD with momentum, AdamW, BCE, MSE, and batch size 1; mcunet, mobilenet_v2 with the
sparse scheme and resnet18 with last-k:2 on 32x32 images), trains each at reasonable learning rates
(the compiled one and a few times it, from scratch and as a second round from a trained checkpoint) and
at absurd ones, and prints per run:
- the largest value each guard statistic reached with the limits lifted: spike (a step's loss over the
  largest recent loss), drift (the recent mean loss over the round's first), update (a parameter's update
  over its norm) and growth (a parameter's norm over its norm when the round began), each against its limit;
- what the guard then does: the round finishes (and how many steps it rejected), or TrainingFailed.
docs/artifact.md quotes the table. Workstation only (it compiles).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pockprop.errors import TrainingFailed
from pockprop.runtime import guard
from pockprop.runtime.data import Dataset
from pockprop.runtime.loop import fit
from pockprop.runtime.trainer import Trainer

LIMITS = {"spike": guard.SPIKE, "drift": guard.DRIFT, "update": guard.UPDATE, "growth": guard.GROWTH}

SGD, ADAMW = ["--optimizer", "sgd", "--momentum", "0.9"], ["--optimizer", "adamw"]
# name -> `pockprop compile` arguments (10 classes, model-ready inputs: no preprocessing)
ARTIFACTS: dict[str, list[str]] = {
    "mlp-sgd": ["models:mlp", "--input-shape", "32,64", *SGD, "--lr", "0.05"],
    "mlp-adamw": ["models:mlp", "--input-shape", "32,64", *ADAMW, "--lr", "1e-3"],
    "mlp-bce": ["models:mlp", "--input-shape", "32,64", *SGD, "--lr", "0.1", "--loss", "bce_with_logits"],
    "mlp-mse": ["models:mlp", "--input-shape", "32,64", "--optimizer", "sgd", "--lr", "0.05", "--loss", "mse"],
    "mlp-batch1": ["models:mlp", "--input-shape", "1,64", *SGD, "--lr", "0.003"],
    "mcunet-sgd": ["models:mcunet", "--input-shape", "16,3,32,32", *SGD, "--lr", "0.05"],
    "mcunet-adamw": ["models:mcunet", "--input-shape", "16,3,32,32", *ADAMW, "--lr", "1e-3"],
    "mnv2-sparse-sgd": ["models:mobilenet_v2", "--input-shape", "16,3,32,32", *SGD, "--lr", "0.05", "--scheme", "sparse"],
    "mnv2-sparse-adamw": ["models:mobilenet_v2", "--input-shape", "16,3,32,32", *ADAMW, "--lr", "1e-3", "--scheme", "sparse"],
    "r18-lastk-sgd": ["models:resnet18", "--input-shape", "16,3,32,32", *SGD, "--lr", "0.05", "--scheme", "last-k:2"],
}
# (artifact, learning rate, epochs, second round from a trained checkpoint?)
NORMAL = [("mlp-sgd", lr, 5, False) for lr in (0.01, 0.05, 0.2)] + [("mlp-sgd", lr, 3, True) for lr in (0.05, 0.1)] \
    + [("mlp-adamw", lr, 5, False) for lr in (1e-3, 1e-2, 3e-2)] + [("mlp-adamw", lr, 3, True) for lr in (1e-3, 1e-2)] \
    + [("mlp-bce", lr, 5, False) for lr in (0.1, 1.0)] + [("mlp-bce", 0.3, 3, True)] \
    + [("mlp-mse", lr, 5, False) for lr in (0.05, 0.3)] + [("mlp-mse", 0.1, 3, True)] \
    + [("mlp-batch1", lr, 2, False) for lr in (0.001, 0.01)] + [("mlp-batch1", 0.01, 1, True)] \
    + [("mcunet-sgd", lr, 3, False) for lr in (0.05, 0.2)] + [("mcunet-adamw", lr, 3, False) for lr in (1e-3, 1e-2)] \
    + [("mnv2-sparse-sgd", lr, 3, False) for lr in (0.05, 0.2)] + [("mnv2-sparse-adamw", lr, 3, False) for lr in (1e-3, 1e-2)] \
    + [("r18-lastk-sgd", lr, 2, False) for lr in (0.01, 0.05)]
ABSURD = [("mlp-sgd", lr, 3, False) for lr in (2.0, 10.0, 1e30)] + [("mlp-sgd", lr, 3, True) for lr in (0.5, 10.0)] \
    + [("mlp-adamw", lr, 3, False) for lr in (1.0, 1e30)] + [("mlp-bce", 1000.0, 3, False), ("mlp-mse", 1000.0, 3, False)] \
    + [("mlp-batch1", 10.0, 1, True), ("mcunet-sgd", 10.0, 2, False), ("mnv2-sparse-sgd", 10.0, 2, False),
       ("r18-lastk-sgd", 100.0, 1, False)]


def _data(trainer: Trainer, quick: bool) -> tuple[Dataset, Dataset]:
    """Model-ready digits (train, and the same in another order for a second round) for this artifact."""
    from pockprop.models import data as digits

    image, loss = len(trainer.manifest.input.shape) == 4, trainer.manifest.loss["name"]
    x, y = digits.digits(32, 3, "train") if image else digits.digits_flat("train")
    if image:
        x, y = x[:320 if quick else 640], y[:320 if quick else 640]
    if loss == "bce_with_logits":
        y = np.eye(10, dtype=np.float32)[y]
    elif loss == "mse":
        y = np.eye(10, dtype=np.float32)[y] * 3
    return Dataset(x, y, "digits"), Dataset(x[::-1].copy(), y[::-1].copy(), "digits-reversed")


def _statistics(trainer: Trainer, ds: Dataset, lr: float, epochs: int) -> dict[str, float]:
    """The largest value of each guard statistic over a round, with the limits lifted (guard off: every
    step is accepted, and each is measured as the guard would)."""
    peak = dict.fromkeys(LIMITS, 0.0)

    def keep(key: str, values: Any) -> None:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        peak[key] = max([peak[key], *finite])

    trainer.guard = "off"
    step = trainer.step

    def measured(x: Any, y: Any, lr: float | None = None) -> float | None:
        old = [v.copy() for v in trainer._param_views()]
        before = dataclasses.replace(trainer.baseline, recent=list(trainer.baseline.recent))
        loss = step(x, y, lr)
        if loss is not None and math.isfinite(loss):
            keep("spike", [before.spike_ratio(loss)])
            keep("drift", [trainer.baseline.drift_ratio()])
            keep("update", guard.update_ratios(old, trainer._param_views()))
        return loss

    trainer.step = measured  # type: ignore[method-assign]
    try:
        fit(trainer, ds, epochs, schedule={"name": "constant", "base_lr": lr})
    except TrainingFailed:
        pass  # a NaN state with the guard off: the statistics so far stand
    keep("growth", guard.growth_ratios(trainer._param_views(), trainer.baseline.norms))
    return peak


def _run(art: str, ds: Dataset, checkpoint: str | None, lr: float, epochs: int) -> tuple[dict[str, float], str]:
    def load() -> Trainer:
        t = Trainer.load(art, threads=2)
        if checkpoint:
            t.resume(checkpoint)
        return t

    peak = _statistics(load(), ds, lr, epochs)
    trainer = load()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            record = fit(trainer, ds, epochs, schedule={"name": "constant", "base_lr": lr}, checkpoint_dir=tmp)
            outcome = f"trains: {record['rejected']} of {record['steps'] + record['rejected']} steps rejected"
        except TrainingFailed as ex:
            outcome = f"fails: {str(ex).split(': ', 1)[-1].split(';')[0][:110]}"
    return peak, outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="half the images, the mlp runs only")
    args = parser.parse_args()
    from pockprop.cli import main as pockprop  # compiling needs the workstation install

    runs = [r for r in NORMAL + ABSURD if not args.quick or r[0].startswith("mlp")]
    with tempfile.TemporaryDirectory() as tmp:
        built: dict[str, tuple[str, str, Dataset, Dataset]] = {}
        for name, lr, epochs, second in runs:
            if name not in built:
                art = str(Path(tmp) / name)
                if pockprop(["compile", *ARTIFACTS[name], "--num-classes", "10", "--preprocess", "none", "-o", art]):
                    raise SystemExit(f"cannot compile {name}")
                first, other = _data(Trainer.load(art), args.quick)
                trained = str(Path(tmp) / f"{name}-ckpt")
                fit(Trainer.load(art, threads=2), first, 2, checkpoint_dir=trained)  # for second rounds
                built[name] = (art, trained, first, other)
            art, trained, first, other = built[name]
            peak, outcome = _run(art, other if second else first, trained if second else None, lr, epochs)
            kind = "absurd" if (name, lr, epochs, second) in ABSURD else "normal"
            stats = "  ".join(f"{k} {v:6.3g}" for k, v in peak.items())
            print(f"{kind:6s} {name:18s} {'2nd round' if second else 'scratch':9s} lr {lr:<6g} {stats}  {outcome}",
                  flush=True)
    print("limits: " + "  ".join(f"{k} {v:g}" for k, v in LIMITS.items()))


if __name__ == "__main__":
    main()
