"""The stronger reference of issue 14: full fine-tuning as a user would run it in PyTorch, beside the device's.

docs/accuracy.md's `full` row fine-tunes every weight through the device runtime with the BatchNorm statistics
frozen (pockprop compiles BatchNorm in eval form). A user fine-tuning in PyTorch would leave the model in train
mode: batch statistics in the forward, running statistics updated. This runs both in PyTorch on the drift tasks,
with docs/accuracy.md's recipe (the pre-trained model of experiments/accuracy.py, cfg.epochs epochs of the same
seeded batches, SGD momentum 0.9, cosine from the lr to 0, no weight decay, the lr chosen from cfg.lrs on the
validation hold-out with the first seed, then every seed on the test set):
- `torch-bn-train`: BatchNorm in train mode while fine-tuning, eval mode to evaluate (what a user would do);
- `torch-bn-frozen`: the model in eval mode throughout: the device's `full` row, run by PyTorch (a check that
  the two agree; they differ only in float summation order).

    python -m experiments.reference [--task input] [--quick]    # prints the table, writes out/accuracy/reference.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np

from experiments.accuracy import QUICK, Config, _holdout, build, log, pretrain
from experiments.drift import TASKS, make_task
from pockprop.runtime.data import batches

MODES = ("torch-bn-train", "torch-bn-frozen")


def finetune_torch(state: dict[str, np.ndarray], train: tuple[np.ndarray, np.ndarray], cfg: Config, seed: int,
                   lr: float, bn_train: bool) -> Any:
    """The fine-tuned model (eval mode): the recipe of experiments.accuracy.finetune, in PyTorch."""
    import torch

    model = build(cfg, state)
    x, y = train
    total = max(cfg.epochs * (len(y) // cfg.batch), 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum)
    step = 0
    for epoch in range(cfg.epochs):
        model.train(bn_train)
        for bx, by in batches(x, y, cfg.batch, seed=seed * 1000 + epoch):
            for g in opt.param_groups:  # cosine from lr to 0 over all steps, as runtime.schedule's "cosine"
                g["lr"] = 0.5 * lr * (1 + np.cos(np.pi * step / total))
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(bx)), torch.from_numpy(by))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return model.eval()


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(x[i:i + 256])) for i in range(0, len(x), 256)]).argmax(1).numpy()
    return float((pred == y).mean())


def run_task(name: str, cfg: Config, out: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    task0 = make_task(name, cfg.resolution, cfg.channels, seed=cfg.seeds[0])
    state = pretrain(task0, cfg, out)
    test = (task0.test.x, task0.test.y)
    result: dict[str, Any] = {"task": name, "rows": {}, "recipe": recipe_key(cfg)}
    for mode in MODES:
        bn_train = mode == "torch-bn-train"
        splits = {}
        for seed in cfg.seeds:
            task = make_task(name, cfg.resolution, cfg.channels, seed=seed) if name == "input" else task0
            val = _holdout(task.target.y, cfg.val_fraction)
            keep = np.setdiff1d(np.arange(len(task.target.y)), val)
            splits[seed] = ((task.target.x[keep], task.target.y[keep]), (task.target.x[val], task.target.y[val]))
        first = cfg.seeds[0]
        t0 = time.perf_counter()
        grid = {lr: accuracy(finetune_torch(state, splits[first][0], cfg, first, lr, bn_train), *splits[first][1])
                for lr in cfg.lrs}
        lr = max(cfg.lrs, key=lambda v: (grid[v], -v))
        tests = [100 * accuracy(finetune_torch(state, splits[s][0], cfg, s, lr, bn_train), *test) for s in cfg.seeds]
        row = {"lr": lr, "val_grid": {str(k): v for k, v in grid.items()}, "test": tests,
               "mean": float(np.mean(tests)), "std": float(np.std(tests, ddof=1)) if len(tests) > 1 else 0.0, "seconds": time.perf_counter() - t0}
        result["rows"][mode] = row
        log(f"[{name}] {mode:16s} lr {lr:g} (val " + ", ".join(f"{k:g}: {100 * v:.1f}%" for k, v in grid.items())
            + f"): test {row['mean']:.1f} ± {row['std']:.1f}  ({', '.join(f'{t:.1f}' for t in tests)})")
    return result


def recipe_key(cfg: Config) -> dict[str, Any]:
    """What a reference result depends on besides the pre-trained model: a result made with another key is stale."""
    return {"lrs": list(cfg.lrs), "epochs": cfg.epochs, "seeds": list(cfg.seeds), "batch": cfg.batch,
            "model": cfg.key()}


def load(out: str) -> dict[str, dict[str, Any]]:
    """out/<...>/reference.json by task ({} when there is none)."""
    path = os.path.join(out, "reference.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r["task"]: r for r in json.load(f)}


def save(results: list[dict[str, Any]], out: str) -> None:
    """Merge `results` into out/<...>/reference.json, one entry per task (tasks not run here are kept)."""
    merged = load(out) | {r["task"]: r for r in results}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump([merged[t] for t in TASKS if t in merged], f, indent=1)


def ensure(name: str, cfg: Config, out: str) -> dict[str, Any]:
    """The task's reference result, run (and saved) unless reference.json holds one of the same recipe."""
    have = load(out).get(name)
    if have is None or have.get("recipe") != recipe_key(cfg):
        have = run_task(name, cfg, out)
        save([have], out)
    return have


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| task | run | test accuracy (%) | lr (by validation) |", "| --- | --- | ---: | ---: |"]
    for r in results:
        for mode, row in r["rows"].items():
            lines.append(f"| {r['task']} | {mode} | {row['mean']:.1f} ± {row['std']:.1f} | {row['lr']:g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", action="append", choices=TASKS, help="run only this task (repeatable; default all)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny model, one seed, one lr")
    p.add_argument("--out", help="output folder (default out/accuracy, --quick: out/accuracy-quick)")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    out = args.out or ("out/accuracy-quick" if args.quick else "out/accuracy")
    results = [run_task(t, cfg, out) for t in (args.task or TASKS)]
    print(table(results))
    save(results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
