"""Where a training step's time goes: onnxruntime's per-node profile of an artifact's step, by phase and op.

    python -m experiments.step_profile ARTIFACT [ARTIFACT ...] [--steps 5] [--threads 2] [--top 12]

Each artifact is stepped by runtime.Trainer (random data of its input shape, random labels) with
onnxruntime's profiler on; kernel time per step is summed by phase (read back from the emitted node names,
emit/onnx.py: forward, backward, optimizer; "layout" for the NCHWc reorders onnxruntime inserts itself,
"renamed" for the convs its NCHWc transformer rewrote and renamed), by
ONNX op type, and per node. What docs/benchmarks.md's explanations of missed speed targets are read from.
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
from typing import Any

import numpy as np

from pockprop.emit.onnx import split_node_name
from pockprop.runtime import session as sessions
from pockprop.runtime.trainer import Trainer


def _batch(tr: Trainer, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    spec, labels = tr.manifest.input, tr.manifest.labels
    x = rng.standard_normal(spec.shape).astype(spec.dtype)
    y = rng.integers(0, 2, labels.shape).astype(labels.dtype)  # a valid class of any classifier (speed only)
    return x, y


def profile(path: str, steps: int = 5, threads: int = 2) -> list[dict[str, Any]]:
    """One record per node: name, ONNX op, phase, kernel ms per step (averaged over `steps` steps, the first included)."""
    made = sessions.options
    with tempfile.TemporaryDirectory() as tmp:  # onnxruntime writes the profile there, not into the cwd

        def profiled(*a: Any, **k: Any) -> Any:
            opts = made(*a, **k)
            opts.enable_profiling, opts.profile_file_prefix = True, f"{tmp}/profile"
            return opts

        sessions.options = profiled  # type: ignore[assignment]
        try:
            tr = Trainer.load(path, threads=threads)
            x, y = _batch(tr, np.random.default_rng(0))
            for _ in range(steps):
                tr.step(x, y)
            with open(tr._train.end_profiling()) as f:
                events = json.load(f)
        finally:
            sessions.options = made  # type: ignore[assignment]
    per: dict[tuple[str, str], float] = collections.Counter()
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            per[(ev["name"].removesuffix("_kernel_time"), ev["args"]["op_name"])] += ev["dur"] / 1e3 / steps
    out = []
    for (name, op), ms in per.items():
        # onnxruntime renames the convs its NCHWc transformer rewrites ("conv2d_5_nchwc"): their phase is lost
        phase = "layout" if op in ("ReorderInput", "ReorderOutput") else str(split_node_name(name)[1]) \
            if "/" in name else "renamed (NCHWc)"
        out.append({"name": name, "op": op, "phase": phase, "ms": ms})
    return sorted(out, key=lambda r: -r["ms"])


def summary(records: list[dict[str, Any]], top: int) -> list[str]:
    total = sum(r["ms"] for r in records)
    lines = [f"kernel time {total:.1f} ms/step"]
    for key in ("phase", "op"):
        agg: dict[str, float] = collections.Counter()
        for r in records:
            agg[r[key]] += r["ms"]
        lines.append(f"  by {key}: " + ", ".join(f"{k} {v:.1f} ({100 * v / total:.0f}%)"
                                               for k, v in sorted(agg.items(), key=lambda kv: -kv[1])[:top]))
    lines += [f"  {r['ms']:7.2f} ms  {r['op']:<16s} {r['name']}" for r in records[:top]]
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.step_profile", description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    for path in args.artifacts:
        print(f"== {path}")
        print("\n".join(summary(profile(path, args.steps, args.threads), args.top)))


if __name__ == "__main__":
    main()
