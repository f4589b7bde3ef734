"""Split fine-tuning on a digits drift task: plain split training against SFPrompt's local loss and pruning,
through the device runtime (docs/split.md "Local loss and pruning").

The ResNet-18 of docs/accuracy.md, pre-trained on the task's source digits (experiments/accuracy.py's cached
pre-training), is cut after `layer1`: the device holds the stem and layer1, the server the rest with the
loss. Every row fine-tunes the whole model for the same epochs,
SGD momentum 0.9, cosine from the same lr, the same batch order per seed:
- split:      every step forward to the server and its gradient back (runtime/split_train.split_step);
- local:      the device's part trains through its auxiliary head alone; activations and labels of every
              batch go up, nothing comes down, the server steps on them by itself (local_step);
- local+prune: as local, each epoch after the first on the half of each class's data that the device's own
              head scores hardest (EL2N);
- local/2:    as local, one batch in two sent to the server.
Reported per row (3 seeds): test accuracy of the split model (device part, server part; mean ± std), bytes
the device sent and received per epoch, device compute (seconds in its own parts, and MACs from the
artifacts' counts), and how many server steps.

    python -m experiments.split [--task feature] [--epochs 10] [--quick] [--out out/split]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np

from experiments.accuracy import Config, QUICK, build, log, pretrain
from experiments.drift import make_task
from pockprop.runtime.schedule import Schedule

CUT = "layer1"
ROWS = ("split", "local", "local+prune", "local/2")


def compile_all(cfg: Config, state: dict[str, np.ndarray], out: str) -> str:
    import torch

    from pockprop.compiler.split import compile_local_head, compile_split, default_head, save_split

    shape = (cfg.batch, cfg.channels, cfg.resolution, cfg.resolution)
    arts = compile_split(build(cfg, state), torch.zeros(shape), [CUT], optimizer=cfg.optimizer())
    act = arts[0].train_graph.types[arts[0].output].shape
    head = compile_local_head(default_head(act, 10), arts[0], optimizer=cfg.optimizer())
    directory = os.path.join(out, f"split-{cfg.model}-{cfg.key()}")
    save_split(arts, directory, local_head=head)
    with open(os.path.join(directory, "macs.json"), "w") as f:
        json.dump(device_macs(arts, head), f)
    return directory


def device_macs(arts: list[Any], head: Any) -> dict[str, int]:
    """MACs per step on the device (compile-time counts, loss excluded): a plain split runs its part forward
    (to send the activation) and then its step (forward again, backward); a local loss adds the head's step;
    federated fine-tuning would run the whole model's step on the device."""
    from pockprop.compiler.report import summarize

    (f0, b0), (f1, b1), (fh, bh) = ((s["forward_macs"], s["backward_macs"]) for s in map(summarize, [*arts, head]))
    return {"split": 2 * f0 + b0, "local": 2 * f0 + b0 + fh + bh, "whole_model": f0 + f1 + b0 + b1}


def load(directory: str, cfg: Config) -> tuple[Any, Any, Any]:
    from pockprop.runtime.split import Part, load_index

    doc = load_index(directory)
    bottom, server = (Part.load(os.path.join(directory, p["path"]), cfg.threads) for p in doc["parts"])
    head = Part.load(os.path.join(directory, doc["local_head"]["path"]), cfg.threads)
    return bottom, server, head


def run(row: str, directory: str, task: Any, cfg: Config, seed: int, lr: float) -> dict[str, Any]:
    from pockprop.runtime.split_train import fit

    bottom, server, head = load(directory, cfg)
    x, y = task.target.x, task.target.y
    keep = 0.5 if row == "local+prune" else 1.0
    full, per_epoch = len(y) // cfg.batch, int(np.ceil(keep * len(y))) // cfg.batch
    total = full + (cfg.epochs - 1) * per_epoch  # the first epoch is never pruned (fit)
    sched = Schedule("cosine", lr, total_steps=total)
    t0 = time.perf_counter()
    traffic = fit([bottom, server], x, y, cfg.epochs, batch=cfg.batch, seed=seed, schedule=sched,
                  local_head=None if row == "split" else head, send_every=2 if row == "local/2" else 1,
                  prune_keep=keep).traffic
    correct = 0
    tx, ty = task.test.x, task.test.y
    b = cfg.batch
    for i in range(0, len(ty) - len(ty) % b, b):
        correct += int((server.forward(bottom.forward(tx[i:i + b])).argmax(-1) == ty[i:i + b]).sum())
    n = len(ty) - len(ty) % b
    return {"row": row, "seed": seed, "accuracy": 100.0 * correct / n, "epochs": cfg.epochs,
            "seconds": time.perf_counter() - t0, **traffic.to_json()}


def trainable_counts(directory: str) -> dict[str, int]:
    """Trainable parameters of the device part, the server part and the auxiliary head."""
    from pockprop.runtime.split import load_index

    doc = load_index(directory)
    out = {}
    for key, entry in (("device_part", doc["parts"][0]), ("server_part", doc["parts"][1]), ("head", doc["local_head"])):
        with open(os.path.join(directory, entry["path"], "manifest.json")) as f:
            out[key] = json.load(f)["trainable"]["count"]
    return out


def table(records: list[dict[str, Any]], cfg: Config, data_bytes: int, macs: dict[str, int]) -> str:
    lines = ["| run | test accuracy (%) | device → server per epoch | server → device per epoch | device s per epoch "
             "| device GMACs per epoch | server steps per epoch |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = None
    for row in ROWS:
        rs = [r for r in records if r["row"] == row]
        if not rs:
            continue
        acc = np.array([r["accuracy"] for r in rs])
        up, down = np.mean([r["up"] for r in rs]) / cfg.epochs, np.mean([r["down"] for r in rs]) / cfg.epochs
        dev = np.mean([r["device_seconds"] for r in rs]) / cfg.epochs
        base = base or (up + down, dev)
        gmacs = np.mean([r["steps"] for r in rs]) / cfg.epochs * macs["split" if row == "split" else "local"] / 1e9
        lines.append(f"| {row} | {acc.mean():.1f} ± {acc.std():.1f} | {up / 1e6:.2f} MB | {down / 1e6:.2f} MB | "
                     f"{dev:.2f} ({dev / base[1]:.2f}×) | {gmacs:.2f} | "
                     f"{np.mean([r['server_steps'] for r in rs]) / cfg.epochs:.0f} |")
    lines.append("")
    lines.append(f"Sending the fine-tuning images once instead (float32 model inputs): {data_bytes / 1e6:.2f} MB. "
                 f"Device MACs per step: split {macs['split'] / 1e6:.1f} M, local loss {macs['local'] / 1e6:.1f} M, "
                 f"the whole model's step (federated training) {macs['whole_model'] / 1e6:.1f} M; pruning adds one "
                 "forward of the device's part and head per scored sample.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and one seed (seconds; for tests)")
    ap.add_argument("--out", default="out/split")
    ap.add_argument("--task", default="feature", choices=["input", "feature", "output"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.01)
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else Config(epochs=args.epochs)
    task = make_task(args.task, cfg.resolution, cfg.channels, seed=0)
    state = pretrain(task, cfg, os.path.join("out", "accuracy") if not args.quick else args.out)
    directory = compile_all(cfg, state, args.out)
    records = []
    for seed in cfg.seeds:
        task = make_task(args.task, cfg.resolution, cfg.channels, seed=seed)
        for row in ROWS:
            r = run(row, directory, task, cfg, seed, args.lr)
            log(f"  {row:12s} seed {seed}: accuracy {r['accuracy']:.1f}%, up {r['up'] / 1e6:.2f} MB, "
                f"down {r['down'] / 1e6:.2f} MB, device {r['device_seconds']:.1f}s")
            records.append(r)
    data_bytes = int(task.target.x.nbytes + task.target.y.nbytes)
    with open(os.path.join(directory, "macs.json")) as f:
        macs = json.load(f)
    text = table(records, cfg, data_bytes, macs)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"split-{args.task}.json"), "w") as f:
        json.dump({"config": {"model": cfg.model, "width": cfg.width, "epochs": cfg.epochs, "cut": CUT,
                              "task": args.task, "lr": args.lr},
                   "records": records, "trainable": trainable_counts(directory), "macs": macs}, f, indent=1)
    with open(os.path.join(args.out, f"split-{args.task}.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
