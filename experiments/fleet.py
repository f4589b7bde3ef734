"""Federated vs centralized fine-tuning of one sparse artifact on a digits drift task (docs/federated.md).

The input-level drift task of experiments/drift.py (contrast-inverted, noisy digits): the zoo ResNet-18 of
experiments/accuracy.py is pre-trained on the clean source digits (PyTorch, cached), then compiled with the
`bias-only` scheme (SGD, momentum 0.9). Its fine-tuning images are cut among --clients virtual devices by a
Dirichlet label skew (and iid, for reference) and fine-tuned with `pockprop fleet` (Flower's simulation
engine, FedAvg over the biases only) for --rounds rounds of --local-epochs epochs; the same artifact is
fine-tuned centrally (runtime.loop.fit, the same constant lr, batch 32) for rounds x local epochs epochs,
evaluated after each epoch. Both report accuracy on the task's shifted test images. The fleet runs are the
exact `pockprop fleet` commands printed and written to the doc.

    python -m experiments.fleet            # the documented run (a few minutes on 2 cores)
    python -m experiments.fleet --quick    # a smoke run: tiny model, 4 clients, 2 rounds, doc untouched
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from experiments import accuracy
from experiments.drift import make_task

DOC = "docs/federated.md"
BEGIN = "<!-- fleet-results:begin (python -m experiments.fleet writes this part) -->"
END = "<!-- fleet-results:end -->"


@dataclass(frozen=True)
class Setup:
    task: str = "input"
    scheme: str = "bias-only"
    clients: int = 20
    rounds: int = 20
    local_epochs: int = 5
    partitions: tuple[str, ...] = ("dirichlet:0.5", "dirichlet:0.1", "iid")
    lr: float = 0.03  # the bias-only scheme's lr chosen by validation in docs/accuracy.md (input task)
    seed: int = 0
    parallel: int = 2
    model: accuracy.Config = field(default_factory=lambda: accuracy.Config(seeds=(0,)))


QUICK = Setup(clients=4, rounds=2, local_epochs=1, partitions=("dirichlet:0.5",), model=accuracy.QUICK)


def _npz(path: str, x: np.ndarray, y: np.ndarray) -> str:
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))
    return path


def centralized(art: str, x: np.ndarray, y: np.ndarray, test: tuple[np.ndarray, np.ndarray], s: Setup) -> list[float]:
    """Test accuracy before and after each epoch of central fine-tuning (constant lr, full shuffled batches)."""
    from pockprop.runtime.data import Dataset
    from pockprop.runtime.loop import fit
    from pockprop.runtime.trainer import Trainer

    trainer = Trainer.load(art)
    acc = [float(trainer.evaluate(*test)["accuracy"])]
    data = Dataset(x, y, "target")
    for epoch in range(s.rounds * s.local_epochs):
        fit(trainer, data, 1, seed=s.seed + epoch, schedule={"name": "constant", "base_lr": s.lr})
        acc.append(float(trainer.evaluate(*test)["accuracy"]))
    return acc


def fleet_command(art: str, data: str, test: str, partition: str, out: str, s: Setup) -> list[str]:
    return [sys.executable, "-m", "pockprop", "fleet", art, "--data", data, "--test", test, "--clients", str(s.clients),
            "--rounds", str(s.rounds), "--local-epochs", str(s.local_epochs), "--partition", partition,
            "--lr", str(s.lr), "--seed", str(s.seed), "--parallel", str(s.parallel), "--out", out]


def run(s: Setup, out: str) -> dict[str, Any]:
    os.makedirs(out, exist_ok=True)
    cfg = s.model
    task = make_task(s.task, cfg.resolution, cfg.channels, seed=s.seed)
    state = accuracy.pretrain(task, cfg, out)
    costs = accuracy.compile_scheme(state, s.scheme, cfg, os.path.join(out, f"artifact-{s.scheme}"))
    art = costs["dir"]
    data = _npz(os.path.join(out, "target.npz"), task.target.x, task.target.y)
    test = _npz(os.path.join(out, "test.npz"), task.test.x, task.test.y)
    result: dict[str, Any] = {"setup": {k: v for k, v in asdict(s).items() if k != "model"},
                              "model": f"{cfg.model} width {cfg.width}, {cfg.resolution}x{cfg.resolution}, batch {cfg.batch}",
                              "trainable_params": costs["trainable_params"],
                              "trainable_percent": costs["trainable_percent"],
                              "images": {"fine-tune": len(task.target), "test": len(task.test)}, "fleets": {}}
    for p in s.partitions:
        where = os.path.join(out, p.replace(":", "-"))
        cmd = fleet_command(art, data, test, p, where, s)
        accuracy.log("$ " + shlex.join(cmd))
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=os.environ | {"FLWR_TELEMETRY_ENABLED": "0"})
        with open(os.path.join(where, "fleet.json")) as f:
            result["fleets"][p] = {"seconds": time.perf_counter() - t0, "command": cmd, **json.load(f)}
    t0 = time.perf_counter()
    result["centralized"] = {"accuracy": centralized(art, task.target.x, task.target.y, (task.test.x, task.test.y), s),
                             "seconds": time.perf_counter() - t0}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def _doc_command(cmd: list[str]) -> str:
    """A fleet command as the doc shows it: `pockprop` for the interpreter, paths relative to the repo."""
    return "pockprop " + shlex.join([os.path.relpath(c) if os.path.exists(c) else c for c in cmd[3:]])


def _shown(round_: int, last: int) -> bool:
    """The rounds the doc's tables show (fleet.md in out/ has every one)."""
    return round_ <= 2 or round_ % 5 == 0 or round_ == last


def markdown(r: dict[str, Any]) -> str:
    s, cent = r["setup"], r["centralized"]["accuracy"]
    e = s["local_epochs"]
    lines = [f"Model: {r['model']}, scheme `{s['scheme']}` ({r['trainable_params']:,} trainable parameters, "
             f"{r['trainable_percent']:.2f} % of the model); {r['images']['fine-tune']} fine-tuning images cut among "
             f"{s['clients']} clients, {r['images']['test']} test images; lr {s['lr']} (constant), SGD momentum 0.9, "
             f"{e} local epoch(s) per round; centralized: the same artifact, lr and batch size for "
             f"{s['rounds'] * e} epochs ({r['centralized']['seconds']:.0f} s).", "",
             "| partition | rounds | fleet test acc. % (best round) | centralized, same epochs % | bytes per round "
             "(down + up) | full model per round | ratio | run |", "| --- |" + " ---: |" * 7]
    for p, fl in r["fleets"].items():
        rows = fl["rounds_table"]
        last, best = rows[-1], max(rows[1:], key=lambda row: row["accuracy"])
        both = last["bytes_down"] + last["bytes_up"]
        lines.append(f"| {p} | {last['round']} | {100 * last['accuracy']:.1f} ({100 * best['accuracy']:.1f} at "
                     f"{best['round']}) | {100 * cent[last['round'] * e]:.1f} | {both:,} | "
                     f"{last['bytes_full_model']:,} | {last['bytes_full_model'] / both:,.0f}x | {fl['seconds']:.0f} s |")
    lines.append("")
    for p, fl in r["fleets"].items():
        rows = fl["rounds_table"]
        lines += [f"**{p}**:", "", "<!-- docs-test: skip (needs the artifact and data that python -m experiments.fleet "
                  "makes in out/fleet) -->", "```sh", _doc_command(fl["command"]), "```", "",
                  "| round | clients | bytes down | bytes up | full model down + up | fleet test acc. % | "
                  f"centralized after round x {e} epochs % |", "|" + "---:|" * 7]
        for row in rows:
            if not _shown(row["round"], rows[-1]["round"]):
                continue
            k = row["round"] * e
            central = f"{100 * cent[k]:.1f}" if k < len(cent) else "-"
            full = f"{row['bytes_full_model']:,}" if row["bytes_full_model"] is not None else "-"
            lines.append(f"| {row['round']} | {row['replies']}/{row['clients']} | {row['bytes_down']:,} | "
                         f"{row['bytes_up']:,} | {full} | {100 * row['accuracy']:.1f} | {central} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.fleet", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny model, 4 clients, 2 rounds, out/fleet-quick")
    p.add_argument("--rounds", type=int)
    p.add_argument("--clients", type=int)
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--partitions", help="comma-separated --partition values (default: dirichlet:0.5,dirichlet:0.1,iid)")
    p.add_argument("--tables-only", action="store_true", help="run nothing: rebuild the table from results.json")
    p.add_argument("--out", help="output folder (default out/fleet, --quick: out/fleet-quick)")
    p.add_argument("--doc", help=f"markdown file to write the tables into (default {DOC}; never with --quick)")
    args = p.parse_args(argv)
    s = QUICK if args.quick else Setup()
    s = replace(s, rounds=args.rounds or s.rounds, clients=args.clients or s.clients,
                local_epochs=args.local_epochs or s.local_epochs,
                partitions=tuple(args.partitions.split(",")) if args.partitions else s.partitions)
    out = args.out or ("out/fleet-quick" if args.quick else "out/fleet")
    accuracy.run_and_document(args, out, lambda: run(s, out), markdown, DOC, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
