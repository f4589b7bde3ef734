"""`pockprop plot LOG... -o PNG`: the loss curves of `pockprop train --log` files, and their held-out accuracy.

The curves are computed here without matplotlib (`curves`); drawing needs the `plot` extra
(`pip install 'pockprop[plot]'`), imported only when a figure is made, on the Agg backend (no display).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from pockprop import args as cli_args
from pockprop.errors import EXIT_OK, UsageError
from pockprop.runtime import runlog


@dataclass
class Curves:
    """One log's curves, x = the batch's position in the log (rounds follow each other)."""

    label: str
    steps: list[int] = field(default_factory=list)  # x of each accepted step
    losses: list[float] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)  # x of each rejected step
    eval_steps: list[int] = field(default_factory=list)  # x of each held-out measurement (0: before training)
    accuracy: list[float] = field(default_factory=list)


def curves(records: list[dict[str, Any]], label: str) -> Curves:
    """The loss per step and the held-out accuracy per epoch (and before each round) of a log's records."""
    c = Curves(label)
    x_of: dict[tuple[Any, Any], int] = {}  # (round, epoch) -> x of its last step
    first_x: dict[Any, int] = {}  # round -> x before its first step
    x = 0
    for r in runlog.latest(records, "step"):
        first_x.setdefault(r.get("round"), x)
        x += 1
        x_of[(r.get("round"), r.get("epoch"))] = x
        if r.get("rejected") or not isinstance(r.get("loss"), (int, float)):
            c.rejected.append(x)
        else:
            c.steps.append(x)
            c.losses.append(float(r["loss"]))
    points = {}
    for r in records:  # the last record of each measurement wins, as for steps
        held = r.get("held_out")
        if not isinstance(held, dict) or not isinstance(held.get("accuracy"), (int, float)):
            continue
        if r.get("event") == "start" and r.get("round") in first_x:
            points[first_x[r["round"]]] = float(held["accuracy"])
        elif r.get("event") == "epoch" and (r.get("round"), r.get("epoch")) in x_of:
            points[x_of[(r["round"], r["epoch"])]] = float(held["accuracy"])
    c.eval_steps, c.accuracy = sorted(points), [points[k] for k in sorted(points)]
    return c


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over up to `window` values (the first ones average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or UsageError saying which extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install 'pockprop[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_loss(ax: Any, c: Curves, color: str | None = None, window: int = 10) -> None:
    """The raw per-step loss (faint), its moving average, and rejected steps (x marks along the bottom) on `ax`."""
    line = ax.plot(c.steps, c.losses, alpha=0.25, linewidth=0.8, color=color)[0]
    ax.plot(c.steps, smooth(c.losses, window), linewidth=1.8, color=line.get_color(), label=c.label)
    if c.rejected:
        ax.plot(c.rejected, [0.02] * len(c.rejected), "x", color=line.get_color(), transform=ax.get_xaxis_transform(),
                label=f"{c.label}: rejected steps")
    ax.set_xlabel("batch")
    ax.set_ylabel("training loss")


def plot(paths: list[str], output: str, window: int = 10) -> list[Curves]:
    """Write the figure of the logs at `paths` to `output`; their curves."""
    all_curves = []
    for path in paths:
        records, skipped = runlog.read(path)
        if skipped:
            print(f"pockprop plot: warning: {path}: skipped {skipped} unreadable line(s)", file=sys.stderr)
        c = curves(records, _label(path, paths))
        if not c.steps:
            raise UsageError(f"{path}: no training steps with a loss in this log (is it a `pockprop train --log` file?)")
        all_curves.append(c)
    plt = pyplot()
    with_acc = any(c.accuracy for c in all_curves)
    fig, axes = plt.subplots(1, 2 if with_acc else 1, figsize=(11 if with_acc else 6.5, 4), squeeze=False)
    for c in all_curves:
        draw_loss(axes[0][0], c, window=window)
        if with_acc and c.accuracy:
            axes[0][1].plot(c.eval_steps, [100 * a for a in c.accuracy], "o-", label=c.label)
    axes[0][0].set_title(f"training loss (moving average over {window} steps)")
    axes[0][0].legend()
    if with_acc:
        axes[0][1].set(title="held-out accuracy", xlabel="batch", ylabel="%")
        axes[0][1].legend()
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return all_curves


def _label(path: str, paths: list[str]) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    same = [p for p in paths if os.path.splitext(os.path.basename(p))[0] == stem]
    return stem if len(same) == 1 else path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw the loss curves of `pockprop train --log` files (needs the [plot] extra)",
                       description="One PNG: the training loss per step of each log (raw and a moving average) "
                                   "and, where the logs have held-out data, the held-out accuracy per epoch.")
    p.add_argument("logs", nargs="+", metavar="LOG", help="JSON-lines files written by `pockprop train --log`")
    p.add_argument("-o", "--output", required=True, help="the PNG to write")
    p.add_argument("--smooth", type=cli_args.positive_int, default=10, help="moving-average window, in steps")
    p.set_defaults(func=plot_command)


def plot_command(args: argparse.Namespace) -> int:
    cli_args.check_output_file(args.output, "-o")
    for c in plot(args.logs, args.output, args.smooth):
        print(f"{c.label}: {len(c.steps)} steps, loss {c.losses[0]:.4f} -> {c.losses[-1]:.4f}"
              + (f", held-out accuracy {100 * c.accuracy[0]:.1f}% -> {100 * c.accuracy[-1]:.1f}%" if c.accuracy else "")
              + (f", {len(c.rejected)} rejected" if c.rejected else ""))
    print(f"wrote {args.output}")
    return EXIT_OK
