"""The device-side `pockprop` subcommands: train, eval, export, inspect, pack (numpy + onnxruntime only).

Each returns an exit code; errors are raised as ArtifactError/DataError and turned into exit code 2
by pockprop.cli.main. Human output goes to stdout (progress to stderr); --json prints one JSON
document on stdout instead.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from typing import Any, Iterator

import numpy as np

from pockprop.artifact.contract import FORMAT_VERSION, REPORT_FILE
from pockprop.runtime import checkpoint
from pockprop.errors import CheckpointError, DataError
from pockprop.runtime.loop import fit
from pockprop.artifact.manifest import open_artifact, pack
from pockprop.runtime.progress import Progress
from pockprop.runtime.schedule import Schedule
from pockprop.runtime.session import session
from pockprop.runtime.trainer import Trainer


def _emit(args: argparse.Namespace, doc: dict[str, Any], lines: list[str]) -> int:
    if args.json:
        print(json.dumps({"ok": True} | doc))
    else:
        print("\n".join(lines))
    return 0


def _trainer(args: argparse.Namespace) -> Trainer:
    trainer = Trainer.load(args.artifact, threads=args.threads)
    if getattr(args, "checkpoint_dir", None):
        trainer.resume(args.checkpoint_dir)
    return trainer


@contextlib.contextmanager
def _warnings_as_lines(command: str) -> Iterator[None]:
    """Warnings (runtime.data.PreprocessWarning) as one stderr line each, like the commands' notes."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # the pipeline warns once itself
        warnings.showwarning = lambda message, *_, **__: print(f"pockprop {command}: warning: {message}",
                                                               file=sys.stderr)
        yield


def _pct(m: dict[str, Any]) -> str:
    return f"{100 * m['accuracy']:.1f}%" if "accuracy" in m else "n/a"


def _schedule(args: argparse.Namespace) -> dict[str, Any]:
    spec = {"name": args.schedule, "base_lr": args.lr, "warmup_steps": args.warmup_steps,
            "step_size": args.step_size, "gamma": args.gamma, "min_lr": args.min_lr}
    try:  # validate now, not after loading data; cosine's length is filled in per round
        Schedule(**{**spec, "base_lr": args.lr if args.lr is not None else 0.0,
                    "total_steps": spec["warmup_steps"] + 1})
    except ValueError as ex:
        raise DataError(f"--schedule {args.schedule}: {ex}") from None
    return spec


def train_command(args: argparse.Namespace) -> int:
    if args.epochs < 1:
        raise DataError(f"--epochs must be >= 1, got {args.epochs}")
    if args.resume and not args.checkpoint_dir:
        raise DataError("--resume needs --checkpoint-dir")
    schedule = _schedule(args)
    trainer = Trainer.load(args.artifact, threads=args.threads)
    if args.batch is not None and args.batch != trainer.batch_size:
        raise DataError(f"--batch {args.batch}: the artifact was compiled for batch {trainer.batch_size} and its graph "
                        "shapes are fixed; recompile with another --input-shape to change it")
    trainer.guard = args.guard
    notes = []
    resumed = False
    if args.checkpoint_dir and checkpoint.exists(args.checkpoint_dir):
        if not args.resume:
            raise CheckpointError(f"{checkpoint.path_of(args.checkpoint_dir)} exists; pass --resume to continue "
                                  "from it, or choose another --checkpoint-dir")
        trainer.resume(args.checkpoint_dir)
        resumed = True
        notes.append(f"resumed from {checkpoint.path_of(args.checkpoint_dir)} at step {trainer.steps}")
    elif args.resume:
        notes.append(f"no checkpoint in {args.checkpoint_dir} yet: starting from the artifact's weights")
    if not args.checkpoint_dir and not args.export:
        notes.append("no --checkpoint-dir or --export: the trained weights will not be saved")
    notes.append(f"preprocessing: {trainer.pipeline.describe()}")
    for note in notes:
        print(f"pockprop train: {note}", file=sys.stderr)

    train = trainer.pipeline.load(args.data, args.label_column)
    held = trainer.pipeline.load(args.eval_data, args.label_column) if args.eval_data else None
    bar: Progress | None = None
    recent: list[float] = []

    def on_batch(done: int, total: int, loss: float | None) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress(total, "train ", enabled=not (args.json or args.no_progress))
            bar.begin(done - 1)
        if loss is not None:
            recent[:] = (recent + [loss])[-20:]
        bar.update(done, f"loss {np.mean(recent):.4f}" if recent else "loss -")

    with _warnings_as_lines("train"):
        record = fit(trainer, train, args.epochs, seed=args.seed, last_batch=args.last_batch, schedule=schedule,
                     holdout=args.holdout, eval_data=held, checkpoint_dir=args.checkpoint_dir,
                     checkpoint_every=args.checkpoint_every, on_batch=on_batch)
    if bar is not None:
        bar.close(f"loss {np.mean(recent):.4f}" if recent else "")
    exported = trainer.export_inference(args.export) if args.export else None
    ckpt = checkpoint.path_of(args.checkpoint_dir) if args.checkpoint_dir else None
    losses = " ".join("-" if v is None else f"{v:.4f}" for v in record["epoch_losses"])
    lines = [f"round {record['round']} on {record['data']}: {record['steps']} steps ({record['rejected']} rejected), "
             f"{record['epochs']} epochs, {record['seconds']:.1f}s; total {trainer.steps} steps, {trainer.rejected} rejected",
             f"  loss per epoch: {losses}"]
    if "after" in record:
        lines.append(f"  held-out accuracy: {_pct(record['before'])} -> {_pct(record['after'])} "
                     f"({record['held_out']} samples)")
    if ckpt:
        lines.append(f"checkpoint: {ckpt}")
    if exported:
        lines.append(f"exported: {exported}")
    return _emit(args, {"round": record, "steps": trainer.steps, "rejected": trainer.rejected, "resumed": resumed,
                        "checkpoint": ckpt, "export": exported}, lines)


def eval_command(args: argparse.Namespace) -> int:
    trainer = _trainer(args)
    with _warnings_as_lines("eval"):
        m = trainer.evaluate(trainer.pipeline.load(args.data, args.label_column))
    loss = f"loss {m['loss']:.4f}" if "loss" in m else "loss n/a"
    return _emit(args, {"data": args.data, "steps": trainer.steps, **m},
                 [f"{loss}, accuracy {_pct(m)} on {m['samples']} samples of {args.data} (after {trainer.steps} steps)"])


def export_command(args: argparse.Namespace) -> int:
    trainer = _trainer(args)
    path = trainer.export_inference(args.output)
    # Self-check: any ONNX runtime must give what `predict` gives; run the file on a seeded batch.
    spec = trainer.manifest.input
    x = np.random.default_rng(0).standard_normal(spec.shape).astype(spec.dtype)
    sess = session(path, args.threads)
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    diff = float(np.max(np.abs(got - trainer.predict(x)))) if got.size else 0.0
    size = os.path.getsize(path)
    return _emit(args, {"output": path, "bytes": size, "steps": trainer.steps, "max_abs_diff_vs_predict": diff},
                 [f"wrote {path} ({size:,} bytes, weights after {trainer.steps} steps); "
                  f"self-check vs predict: max |diff| {diff:.2e}"])


def inspect_command(args: argparse.Namespace) -> int:
    bundle = open_artifact(args.artifact)  # verifies every hash
    m = bundle.manifest
    trainer = _trainer(args)  # validates the graphs against the manifest (and the checkpoint, if given)
    entries = [e.to_json() for e in m.state]
    state = [{k: e[k] for k in ("name", "role", "shape", "dtype", "slice", "full_shape", "slot") if k in e}
             for e in entries]
    doc = {"artifact": args.artifact, "model": m.model, "format_version": FORMAT_VERSION,
           "pockprop_version": m.pockprop_version, "onnx": m.onnx,
           "files": {n: {"bytes": len(b), "sha256": m.files[n]} for n, b in bundle.files.items()},
           "data": [d.to_json() for d in m.data], "labels": m.labels.to_json(), "loss": m.loss,
           "optimizer": m.optimizer, "lr": {"name": m.lr.name, "initial": m.lr.initial}, "trainable": m.trainable,
           "scheme": m.scheme, "state": state, "batch_size": trainer.batch_size,
           "preprocessing": trainer.pipeline.describe()}
    if args.checkpoint_dir:
        doc["checkpoint"] = {"path": checkpoint.path_of(args.checkpoint_dir), "steps": trainer.steps,
                             "rejected": trainer.rejected, "schedule": trainer.schedule.to_json(),
                             "rounds": trainer.rounds}
    d, t = m.input, m.trainable or {}
    lines = [f"{args.artifact}: {m.model} (format {FORMAT_VERSION}, pockprop {m.pockprop_version}, "
             f"ONNX opset {(m.onnx or {}).get('opset')}) - all {len(bundle.files)} file hashes verified",
             f"  input  {d.name}: {d.dtype}{list(d.shape)}",
             f"  preprocessing of raw data: {doc['preprocessing']}",
             f"  labels {m.labels.name}: {m.labels.dtype}{list(m.labels.shape)}",
             f"  loss {m.loss}; optimizer {m.optimizer}; lr {m.lr.initial}",
             f"  trainable: {t.get('count', '?'):,} of {t.get('total', '?'):,} parameters"
             + (f", scheme {m.scheme['name']}" if m.scheme else "")]
    for e in state:
        where = f" slice axis {e['slice']['axis']} [{e['slice']['start']}:{e['slice']['stop']}] of {e['full_shape']}" \
            if "slice" in e else ""
        lines.append(f"    {e['role']:9s} {e['name']}: {e['dtype']}{e['shape']}{where}")
    for name, info in doc["files"].items():
        lines.append(f"  file {name}: {info['bytes']:,} bytes")
    if REPORT_FILE in bundle.files:  # written by `pockprop compile --report`
        doc["report"] = report = json.loads(bundle.files[REPORT_FILE])
        lines += _report_lines(report)
    if "checkpoint" in doc:
        c = doc["checkpoint"]
        lines.append(f"  checkpoint {c['path']}: {c['steps']} steps, {c['rejected']} rejected, {len(c['rounds'])} rounds")
        for r in c["rounds"]:
            acc = f", held-out accuracy {_pct(r['before'])} -> {_pct(r['after'])}" if "after" in r else ""
            lines.append(f"    round {r['round']}: {r['data']}, {r['steps']} steps, epoch losses "
                         f"{[None if v is None else round(v, 4) for v in r['epoch_losses']]}{acc}")
    return _emit(args, doc, lines)


def _report_lines(report: dict[str, Any]) -> list[str]:
    """The compile report's totals beside full backprop (per-layer rows are in the JSON)."""
    s, f, r = report["scheme"], report["full"], report["ratio_to_full"]
    lines = ["  compile report (this scheme vs full backprop):"]
    for key, label, unit in (("trainable_params", "trainable parameters", 1), ("backward_macs", "backward MACs", 1e6),
                             ("kept_bytes", "activations kept for backward", 2**20), ("peak_bytes", "estimated peak memory", 2**20)):
        suffix, digits = {1: ("", 0), 1e6: ("M", 2), 2**20: (" MB", 2)}[unit]
        lines.append(f"    {label:30s} {s[key] / unit:12,.{digits}f}{suffix}  vs {f[key] / unit:12,.{digits}f}{suffix}"
                     f"  ratio {r[key]:.3f}")
    return lines


def pack_command(args: argparse.Namespace) -> int:
    path = pack(args.artifact, args.output)
    size = os.path.getsize(path)
    return _emit(args, {"output": path, "bytes": size}, [f"wrote {path} ({size:,} bytes)"])
