"""`make demo`: fine-tune a pre-trained model on a device's drifted data, sparse backprop beside full backprop.

The story, on scikit-learn's real digits (experiments/drift.py):
1. the workstation pre-trains a ResNet-18 in PyTorch on clean digits (cached under --out, so a second run
   skips it);
2. the device sees drifted digits (default: contrast inverted plus sensor noise), where the pre-trained
   model fails;
3. `pockprop compile` turns the pre-trained weights into two training artifacts, `--scheme sparse` and
   `--scheme full`, and `pockprop train` fine-tunes each on the device's data with numpy + onnxruntime only,
   each in a process of its own, exactly as printed.
It reports, for each: held-out accuracy before and after, median ms per training step (from the `--log`
file), and the extra memory of training: the peak RSS of the `pockprop train` process minus that of an
inference-only process that holds the same data and runs the exported model (experiments/infer_only.py).
Writes out/demo/demo.png (loss curves and bars; docs/demo.png is a copy) and ends with a table.
Exits 1 if either run's loss did not fall.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

SCHEMES = ("sparse", "full")


@dataclass
class Run:
    """One scheme's fine-tuning: what the device commands reported."""

    scheme: str
    trainable: int = 0
    total: int = 0
    before: float = float("nan")
    after: float = float("nan")
    ms_per_step: float = float("nan")
    seconds: float = float("nan")
    peak_mb: float | None = None
    extra_mb: float | None = None
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    records: list[dict[str, Any]] = field(default_factory=list)


def parse(argv: list[str] | None) -> argparse.Namespace:
    from experiments.drift import TASKS

    p = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__.splitlines()[0])
    p.add_argument("--task", default="input", choices=TASKS, help="drift task of experiments/drift.py")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 base channels")
    p.add_argument("--resolution", type=int, default=24)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pretrain-epochs", type=int, default=6, help="PyTorch pre-training epochs (workstation)")
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs (device)")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate (cosine to 0), both schemes")
    p.add_argument("--threads", type=int, help="onnxruntime and PyTorch threads (default: theirs)")
    p.add_argument("--out", default="out/demo")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t_start = time.perf_counter()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's deprecation notes
    from experiments import accuracy
    from experiments.drift import make_task

    os.makedirs(args.out, exist_ok=True)
    cfg = replace(accuracy.Config(), width=args.width, resolution=args.resolution, batch=args.batch,
                  pretrain_epochs=args.pretrain_epochs, threads=args.threads)
    task = make_task(args.task, args.resolution, cfg.channels, seed=0)
    files = write_data(task, args)

    say(f"[1/5] pre-training ResNet-18 (width {args.width}, {args.resolution}x{args.resolution}) on the workstation, "
        f"PyTorch, {len(task.source)} {_source_words(args.task)} digits ...")
    weights = accuracy.pretrained_path(task, cfg, args.out)
    if os.path.exists(weights):
        say(f"      cached by an earlier run: {weights}")
    accuracy.pretrain(task, cfg, args.out)  # logs its epochs and where it saved the weights
    say(f"      the device's data: {len(task.target)} digits with {task.kind} drift ({_drift_words(args.task)}), "
        f"{len(task.test)} more held out for accuracy")

    say("[2/5] compiling both schemes from the pre-trained weights (workstation):")
    runs = {s: compile_scheme(s, weights, args) for s in SCHEMES}

    threads = ["--threads", str(args.threads)] if args.threads else []
    say("[3/5] the pre-trained model on clean held-out digits (the workstation's setting), on the device:")
    stdout, _ = pockprop(["eval", _out(args, "full"), "--data", files["clean"], "--json", *threads], echo=False)
    clean = json.loads(stdout)
    say(f"      accuracy {100 * clean['accuracy']:.1f}% on {clean['samples']} clean digits")

    say("[4/5] fine-tuning on the device (numpy + onnxruntime; each run a fresh process):")
    for run in runs.values():
        fine_tune(run, files, args, threads)

    say("[5/5] memory baseline: the pre-trained model exported, then run for inference only on the same data:")
    onnx = _out(args, "pretrained.onnx")
    pockprop(["export", _out(args, "full"), "-o", onnx, *threads])
    _, base = run_measured([sys.executable, "-m", "experiments.infer_only", onnx, _out(args, "full"), files["data"],
                            files["held"]])
    for r in runs.values():
        r.extra_mb = r.peak_mb - base if r.peak_mb is not None and base is not None else None

    png = figure(runs, clean["accuracy"], _out(args, "demo.png"))
    say("")
    say(table(runs, clean["accuracy"], base, args))
    say(f"\nplot: {png} (loss curves, accuracy, ms/step, memory); logs: "
        + ", ".join(_out(args, f"{s}.jsonl") for s in runs))
    say(f"demo took {time.perf_counter() - t_start:.0f}s")
    bad = [r.scheme for r in runs.values() if not r.last_loss < r.first_loss]
    if bad:
        print(f"error: the loss did not fall for {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def _out(args: argparse.Namespace, name: str) -> str:
    return os.path.join(args.out, name)


def write_data(task: Any, args: argparse.Namespace) -> dict[str, str]:
    """The device's files: its drifted training data, the drifted held-out test images, and the same test
    images undrifted. Raw pixels in [0, 1]: the artifact's preprocessing normalizes them as pre-training did."""
    from pockprop.models.data import MEAN, STD, digits

    files = {"data": _out(args, "device_data.npz"), "held": _out(args, "device_heldout.npz"),
             "clean": _out(args, "clean_heldout.npz")}
    x_clean, y_clean = digits(args.resolution, task.test.x.shape[1], split="test")
    for name, x, y in (("data", task.target.x, task.target.y), ("held", task.test.x, task.test.y),
                       ("clean", x_clean, y_clean)):
        np.savez(files[name], x=x * STD + MEAN, y=y)
    return files


def compile_scheme(scheme: str, weights: str, args: argparse.Namespace) -> Run:
    """`pockprop compile` of the pre-trained weights with `scheme`; its Run with the trainable counts."""
    from pockprop.models.data import MEAN, STD

    pockprop(["compile", "models:resnet18", "--num-classes", "10", "--model-kwargs", json.dumps({"width": args.width}),
              "--weights", weights, "--input-shape", f"{args.batch},3,{args.resolution},{args.resolution}",
              "--scheme", scheme, "--lr", str(args.lr), "--momentum", "0.9",
              "--preprocess", json.dumps({"mean": MEAN, "std": STD}), "-o", _out(args, scheme)], in_process=True)
    with open(os.path.join(_out(args, scheme), "manifest.json")) as f:
        t = json.load(f)["trainable"]
    return Run(scheme, trainable=int(t["count"]), total=int(t["total"]))


def fine_tune(run: Run, files: dict[str, str], args: argparse.Namespace, threads: list[str]) -> None:
    """`pockprop train` in a fresh process, from the artifact's weights; fills `run` from its log and peak RSS."""
    log, ckpt = _out(args, f"{run.scheme}.jsonl"), _out(args, f"{run.scheme}-checkpoint")
    shutil.rmtree(ckpt, ignore_errors=True)  # a fresh run, not a new round on the last demo's checkpoint
    if os.path.exists(log):
        os.remove(log)
    _, run.peak_mb = pockprop(["train", _out(args, run.scheme), "--data", files["data"], "--eval-data", files["held"],
                               "--epochs", str(args.epochs), "--schedule", "cosine", "--seed", "0",
                               "--checkpoint-dir", ckpt, "--log", log, *threads])
    _read_log(run, log)


def say(text: str) -> None:
    print(text, flush=True)


def _source_words(task: str) -> str:
    return {"input": "clean", "feature": "one writing style's", "output": "clean"}[task]


def _drift_words(task: str) -> str:
    return {"input": "contrast inverted plus sensor noise", "feature": "the other writing style",
            "output": "the classes renamed"}[task]


def pockprop(argv: list[str], in_process: bool = False, echo: bool = True) -> tuple[str, float | None]:
    """Run `pockprop ARGV` as a user would type it (printed first): in a fresh process (its stdout, echoed
    unless not `echo`, and peak RSS in MB), or, for the workstation's compile where torch is already
    loaded, through the same entry point in this process."""
    show = "pockprop " + " ".join(shlex.quote(a) for a in argv)
    if not in_process:
        return run_measured([sys.executable, "-m", "pockprop", *argv], echo=echo)
    from pockprop.cli import main

    say(f"      $ {show}")
    with contextlib.redirect_stdout(io.StringIO()) as text, contextlib.redirect_stderr(text):
        code = main(argv)
    lines = text.getvalue().splitlines()
    if code != 0:
        raise SystemExit(f"`{show}` failed with exit code {code}:\n" + "\n".join(lines[-5:]))
    say("      " + (lines[-1] if lines else ""))  # the summary; the scheme table is in `pockprop inspect`
    return text.getvalue(), None


def run_measured(cmd: list[str], echo: bool = True) -> tuple[str, float | None]:
    """Run `cmd` (`python -m MODULE ...`, shown as the user types it) in a fresh process, through
    experiments.peak_rss where os.wait4 exists; its stdout (echoed, indented, unless not `echo`) and its
    peak resident memory in MB (None where not measured). Its stderr (progress bar, notes) passes through."""
    module = cmd[2]
    show = " ".join(["pockprop" if module == "pockprop" else f"python -m {module}", *map(shlex.quote, cmd[3:])])
    say(f"      $ {show}")
    with tempfile.TemporaryDirectory(prefix="pockprop-demo-") as tmp:
        report = os.path.join(tmp, "peak.json")
        wrap = [sys.executable, "-m", "experiments.peak_rss", report] if hasattr(os, "wait4") else []
        proc = subprocess.run([*wrap, *cmd], stdout=subprocess.PIPE, text=True, check=False)
        peak = None
        if os.path.exists(report):
            with open(report) as f:
                peak = json.load(f)["peak_rss_mb"]
    if echo and proc.stdout.strip():
        say("      " + proc.stdout.rstrip().replace("\n", "\n      "))
    if proc.returncode != 0:
        raise SystemExit(f"`{show}` failed with exit code {proc.returncode}")
    return proc.stdout, peak


def _read_log(run: Run, path: str) -> None:
    from pockprop.runtime import runlog

    run.records, _ = runlog.read(path)
    steps = runlog.latest(run.records, "step")
    start = next(r for r in run.records if r["event"] == "start")
    end = next(r for r in run.records if r["event"] == "end")
    times = [r["seconds"] for r in steps][2:] or [r["seconds"] for r in steps]  # the first steps warm up
    losses = [r["loss"] for r in steps if r["loss"] is not None]
    run.before, run.after = start["held_out"]["accuracy"], end["held_out"]["accuracy"]
    run.ms_per_step, run.seconds = 1e3 * float(np.median(times)), float(end["seconds"])
    run.first_loss, run.last_loss = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))


def table(runs: dict[str, Run], clean: float, base: float | None, args: argparse.Namespace) -> str:
    mb = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    first = next(iter(runs.values()))
    lines = [f"ResNet-18 (width {args.width}) pre-trained on clean digits: {100 * clean:.1f}% on clean held-out digits, "
             f"{100 * first.before:.1f}% on the device's ({args.task}-level drift).",
             f"Fine-tuned on the device: {args.epochs} epochs, SGD momentum 0.9, lr {args.lr} cosine, batch {args.batch}:",
             "| scheme | trainable parameters | held-out accuracy | ms/step | train s | peak RSS MB | extra memory MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs.values():
        lines.append(f"| {r.scheme} | {r.trainable:,} ({100 * r.trainable / max(r.total, 1):.1f}%) | "
                     f"{100 * r.before:.1f}% -> {100 * r.after:.1f}% | {r.ms_per_step:.1f} | {r.seconds:.1f} | "
                     f"{mb(r.peak_mb)} | {mb(r.extra_mb)} |")
    lines.append(f"extra memory = peak RSS of `pockprop train` minus {mb(base)} MB, the peak RSS of inference only "
                 "(experiments/infer_only.py: the exported model on the same data); ms/step: median of the --log "
                 "file's step times")
    return "\n".join(lines)


def figure(runs: dict[str, Run], clean: float, path: str) -> str:
    """Loss curves of both runs, then bars: accuracy (pre-trained on clean and drifted data, each run after
    fine-tuning), ms per step, extra memory."""
    from pockprop.runtime.plot import curves, draw_loss, pyplot

    plt = pyplot()
    colors = {"sparse": "tab:green", "full": "tab:blue"}
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8), gridspec_kw={"width_ratios": [2.2, 1.3, 1, 1]})
    for r in runs.values():
        draw_loss(axes[0], curves(r.records, r.scheme), color=colors.get(r.scheme))
    axes[0].set_title("fine-tuning loss on the device")
    axes[0].legend()
    names = list(runs)
    first = next(iter(runs.values()))
    labels = ["before\n(clean)", "before\n(drifted)", *names]
    accs = [100 * clean, 100 * first.before, *[100 * runs[n].after for n in names]]
    bars = axes[1].bar(labels, accs, color=["silver", "tab:gray", *[colors.get(n) for n in names]])
    axes[1].bar_label(bars, fmt="%.1f")
    axes[1].set(title="held-out accuracy %", ylim=(0, 105))
    for ax, values, title in ((axes[2], [runs[n].ms_per_step for n in names], "ms per step"),
                              (axes[3], [runs[n].extra_mb or 0.0 for n in names], "extra memory MB")):
        bars = ax.bar(names, values, color=[colors.get(n) for n in names])
        ax.bar_label(bars, fmt="%.1f")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
