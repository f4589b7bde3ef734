"""Whole training steps with the cost model's lowerings against the default ones, interleaved in one process.

For each model and scheme: compile once with each op's default lowering and once with
compiler/lowering_cost.py's choices (one trace), load both artifacts in the device runtime (Trainer, 2
threads), then run rounds A B, B A, A B ...: each round times `--steps` steps of each and keeps their median;
the result is the median over rounds of cost/default (wall time and process CPU time, which other load
on a shared machine disturbs less). With --profile, onnxruntime's profiler also runs on the default
and the cost model's artifacts' steps and the kernel time per ONNX op type is printed (layout reorders
included).

    python -m experiments.lowering_steps [--models resnet18,mobilenet_v2] [--schemes sparse,full] [--rounds 8]
"""
from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time

import numpy as np
import torch

from pockprop.compiler.compile import compile_traced, trace_model
from pockprop.compiler.lowering_cost import cost_model_lowering
from pockprop.passes.lowerings import default_lowering
from pockprop.runtime.trainer import Trainer
from pockprop.tracing import loader

from experiments import step_profile

OPTIMIZER = {"name": "sgd", "lr": 0.01, "momentum": 0.9}


def _step_times(tr: Trainer, x: np.ndarray, y: np.ndarray, steps: int) -> tuple[float, float]:
    wall, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        tr.step(x, y)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def profile(path: str) -> list[tuple[str, float]]:
    """Kernel milliseconds per step by ONNX op type in the training session of the artifact at `path`."""
    per_op: dict[str, float] = collections.Counter()
    for r in step_profile.profile(path, steps=7):
        per_op[r["op"]] += r["ms"]
    return sorted(per_op.items(), key=lambda kv: -kv[1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--schemes", default="sparse,full")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 128, 128)).astype(np.float32)
    y = rng.integers(0, 10, 8).astype(np.int64)
    for name in args.models.split(","):
        torch.manual_seed(0)
        model, _ = loader.resolve(f"models:{name}", num_classes=10)
        tm = trace_model(model, (torch.from_numpy(x),))
        for scheme in args.schemes.split(","):
            trainers, changed = [], collections.Counter()

            def cost_model(key, node, options, types):  # type: ignore[no-untyped-def]
                pick = cost_model_lowering(key, node, options, types)
                if pick != options[0]:
                    changed[f"{node.op} {pick}"] += 1
                return pick

            with tempfile.TemporaryDirectory() as tmp:
                for k, chooser in enumerate((default_lowering, cost_model)):  # the cost model is compile's default
                    art = compile_traced(tm, optimizer=OPTIMIZER, scheme=scheme, choose_lowering=chooser)
                    trainers.append(Trainer.load(art.save(f"{tmp}/{k}"), threads=2))
                for k, which in enumerate(("default", "cost model") if args.profile else ()):
                    top = profile(f"{tmp}/{k}")
                    total = sum(ms for _, ms in top)
                    print(f"{name} {scheme} {which}: {total:.1f} ms kernel time per step; top op types: "
                          + ", ".join(f"{op} {ms:.1f}" for op, ms in top[:12]), flush=True)
                for tr in trainers:
                    _step_times(tr, x, y, 2)  # warm up
                ratios_wall, ratios_cpu, base = [], [], []
                for r in range(args.rounds):  # A B, B A, ...: neither artifact always runs second
                    order = trainers if r % 2 == 0 else trainers[::-1]
                    times = dict(zip(map(id, order), (_step_times(tr, x, y, args.steps) for tr in order)))
                    (w0, c0), (w1, c1) = times[id(trainers[0])], times[id(trainers[1])]
                    ratios_wall.append(w1 / w0)
                    ratios_cpu.append(c1 / c0)
                    base.append(w0)
            what = ", ".join(f"{n} {k}" for k, n in sorted(changed.items())) or "nothing (the noise floor)"
            print(f"{name} {scheme}, cost model changed {what}: default {statistics.median(base):.1f} ms/step; "
                  f"cost model / default: wall "
                  f"{statistics.median(ratios_wall):.3f} (rounds {min(ratios_wall):.2f}-{max(ratios_wall):.2f}), "
                  f"cpu {statistics.median(ratios_cpu):.3f}", flush=True)


if __name__ == "__main__":
    main()
