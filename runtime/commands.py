"""The device-side `pockprop` subcommands: train, eval, export, inspect, pack (numpy + onnxruntime only):
their parsers (`add_parser`) and run functions.

Each returns an exit code; errors are raised (ArtifactError, DataError, UsageError, ...) and turned into
exit codes by pockprop.cli.main. Human output goes to stdout (progress to stderr); --json prints one
JSON document on stdout instead.
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

from pockprop import args as cli_args
from pockprop.artifact import onnx_wire
from pockprop.artifact.contract import FORMAT_VERSION, OUTPUT_GRADIENT, REPORT_FILE
from pockprop.runtime import checkpoint, guard, multilabel
from pockprop.errors import ArtifactError, CheckpointError, DataError, Interrupted
from pockprop.runtime.loop import fit
from pockprop.artifact.manifest import open_artifact, pack
from pockprop.artifact.tuning import describe_lowerings
from pockprop.runtime.inputs import example as example_inputs
from pockprop.runtime.progress import Progress
from pockprop.runtime.replay import ReplayBuffer
from pockprop.runtime.runlog import RunLog
from pockprop.runtime.schedule import Schedule
from pockprop.runtime.session import PROVIDER_NAMES, session
from pockprop.runtime.trainer import Trainer


LABEL_COLUMNS_HELP = ("CSV, multi-label: the label columns, comma-separated names or patterns like 'tag_*' "
                      "(each value 0 or 1)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
        p.add_argument("artifact", help="artifact directory or packed .pockprop file")
        if checkpoint:
            p.add_argument("--checkpoint-dir", help="use the trained state of this checkpoint directory")
        cli_args.add_threads(p)
        p.add_argument("--provider", default="cpu", choices=list(PROVIDER_NAMES),
                       help="onnxruntime execution provider: cpu, or cuda (onnxruntime-gpu, e.g. on a Jetson); "
                            "falls back to the CPU with a warning where the provider is unavailable")
        cli_args.add_json_flag(p)

    t = sub.add_parser("train", help="train an artifact on device data (numpy + onnxruntime only)",
                       description="Train for N epochs; with --checkpoint-dir, checkpoints atomically and can --resume. "
                                   "Resuming with the same data continues an interrupted run bit for bit; with new "
                                   "data it starts the next round from the checkpoint (continual training).",
                       epilog="Exit codes: 0 trained; 2 bad input (arguments, artifact, checkpoint, data, an output "
                              "path, or a checkpoint directory another run is using); 3 training failed: the state "
                              f"diverged, or {guard.STOP_AFTER} steps in a row or most of the round's steps were "
                              "rejected by the guard (nothing diverged is saved: the last good checkpoint stays); "
                              "130 Ctrl-C (the state at the next batch boundary is checkpointed first; a second "
                              "Ctrl-C stops at once, leaving the last complete checkpoint); 1 internal error.")
    common(t, checkpoint=False)
    t.add_argument("--data", required=True, help=".npz (x or one array per input name; y or labels), .csv (features + "
                                                 "label column) or a folder of class folders")
    t.add_argument("--epochs", type=cli_args.positive_int, default=1, help="passes over --data")
    t.add_argument("--batch", type=cli_args.positive_int,
                   help="must equal the compiled batch size (the graph's shapes are fixed)")
    t.add_argument("--lr", type=cli_args.learning_rate, help="base learning rate (default: the artifact's)")
    t.add_argument("--schedule", default="constant", choices=["constant", "warmup", "cosine", "step"],
                   help="learning-rate schedule")
    t.add_argument("--warmup-steps", type=cli_args.non_negative_int, default=0, help="linear warmup steps (any schedule)")
    t.add_argument("--step-size", type=cli_args.non_negative_int, default=0,
                   help="step schedule: decay every this many steps")
    t.add_argument("--gamma", type=cli_args.number(0, lo_open=True), default=0.1, help="step schedule: decay factor")
    t.add_argument("--min-lr", type=cli_args.number(0), default=0.0, help="cosine: final learning rate")
    t.add_argument("--seed", type=cli_args.seed, default=0, help="shuffling seed")
    t.add_argument("--last-batch", default="drop", choices=["drop", "wrap"],
                   help="last partial batch of an epoch: drop it, or fill it with the epoch's first samples")
    t.add_argument("--holdout", type=cli_args.number(0, 1, hi_open=True), default=0.0,
                   help="fraction of --data held out for accuracy before/after")
    t.add_argument("--eval-data", help="held-out data for accuracy before/after (instead of --holdout)")
    t.add_argument("--label-column", help="CSV: the label column (default: label/y/target/class, else the last)")
    t.add_argument("--label-columns", metavar="A,B,...", help=LABEL_COLUMNS_HELP)
    t.add_argument("--replay", type=cli_args.positive_int, metavar="N",
                   help="continual rounds: keep up to N past samples on the device (reservoir sampling, seeded, "
                        "stored in the checkpoint) and mix them into later rounds' batches")
    t.add_argument("--replay-fraction", type=cli_args.fraction, default=0.25,
                   help="the share of each batch the replayed samples take (the batch size is fixed)")
    t.add_argument("--eval-old", metavar="DATA", help="the old task's data: evaluated before and after the round and "
                                                      "recorded, so forgetting shows in `pockprop inspect`")
    t.add_argument("--prune-keep", type=cli_args.number(0, 1, lo_open=True), default=1.0, metavar="FRACTION",
                   help="before the round, keep this fraction of --data: the samples with the highest --prune-score "
                        "at the round's starting weights (the kept indices go to --log)")
    t.add_argument("--prune-score", default="el2n", choices=["loss", "el2n"],
                   help="pruning score: the sample's loss, or EL2N (L2 norm of softmax/sigmoid minus the labels)")
    t.add_argument("--threshold", type=cli_args.fraction, default=0.5,
                   help="multi-label metrics: a label is predicted where sigmoid(logit) >= this")
    t.add_argument("--kd-previous", action="store_true",
                   help="distill from the model as the round starts (the previous round's): its logits on the "
                        "round's data and the replay buffer feed a kd artifact's teacher_logits (compile --loss kd "
                        "--kd teacher=logits)")
    t.add_argument("--checkpoint-dir", help="write checkpoints here (atomically)")
    t.add_argument("--checkpoint-every", type=cli_args.non_negative_int, default=0,
                   help="also checkpoint every K batches (0: only at each epoch's end)")
    t.add_argument("--resume", action="store_true", help="start from the checkpoint in --checkpoint-dir if there is one")
    t.add_argument("--guard", default="full", choices=["full", "loss", "off"],
                   help=f"reject steps with NaN data, a loss that is non-finite or over {guard.SPIKE:g}x the recent "
                        f"ones, or an update that is non-finite or over {guard.UPDATE:g}x the weights' norm, and "
                        "never save a diverged state (full); the same without the update checks (loss); no checks "
                        "but never saving NaN/Inf (off)")
    t.add_argument("--export", metavar="ONNX", help="also export the trained inference model here")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--log", metavar="FILE", help="append per-step metrics to FILE as JSON lines (docs/artifact.md); "
                                                 "`pockprop plot FILE -o loss.png` draws them")
    t.set_defaults(func=train_command)

    e = sub.add_parser("eval", help="loss and accuracy of an artifact (optionally its checkpoint) on data")
    common(e)
    e.add_argument("--data", required=True, help=".npz, .csv or image folder")
    e.add_argument("--label-column", help="CSV: the label column")
    e.add_argument("--label-columns", metavar="A,B,...", help=LABEL_COLUMNS_HELP)
    e.add_argument("--threshold", type=cli_args.fraction, default=0.5,
                   help="multi-label: a label is predicted where sigmoid(logit) >= this (F1, per-label accuracy)")
    e.set_defaults(func=eval_command)

    x = sub.add_parser("export", help="write one self-contained inference ONNX model with the trained weights")
    common(x)
    x.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    x.set_defaults(func=export_command)

    i = sub.add_parser("inspect", help="validate an artifact and describe it (and a checkpoint)")
    common(i)
    i.set_defaults(func=inspect_command)

    k = sub.add_parser("pack", help="pack an artifact directory into one file for copying to a device")
    k.add_argument("artifact", help="artifact directory")
    k.add_argument("-o", "--output", required=True, help="the file to write, e.g. model.pockprop")
    cli_args.add_json_flag(k)
    k.set_defaults(func=pack_command)


def _check_output(path: str, artifact: str, flag: str) -> None:
    cli_args.check_not_inside(path, artifact, flag)
    cli_args.check_output_file(path, flag)


def _emit(args: argparse.Namespace, doc: dict[str, Any], lines: list[str]) -> int:
    if args.json:
        print(json.dumps({"ok": True} | doc))
    else:
        print("\n".join(lines))
    return 0


def _load(args: argparse.Namespace) -> Trainer:
    with _warnings_as_lines(args.command):  # a provider falling back to the CPU says so in one line
        return Trainer.load(args.artifact, threads=args.threads, provider=args.provider)


def _trainer(args: argparse.Namespace) -> Trainer:
    trainer = _load(args)
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


def _score(m: dict[str, Any]) -> str:
    """The metric a round is judged by: mAP (multi-label), else accuracy."""
    return f"mAP {100 * m['mAP']:.2f}" if "mAP" in m else f"accuracy {_pct(m)}"


def _rounds_table(rounds: list[dict[str, Any]]) -> list[str]:
    """Per round: the new task's held-out metric and the old task's (forgetting), where recorded."""
    if not any("old" in r or "after" in r for r in rounds):
        return []
    def cell(m: Any) -> str:
        return "-" if not m else f"{100 * m['mAP']:.2f}" if "mAP" in m else _pct(m)
    metric = "mAP" if any("mAP" in (r.get("after") or r.get("old") or {}) for r in rounds) else "accuracy"
    lines = [f"    {'round':>5}  {'new task ' + metric:>16}  {'old task ' + metric:>16}  {'old before':>10}"]
    for r in rounds:
        lines.append(f"    {r['round']:>5}  {cell(r.get('after')):>16}  {cell(r.get('old')):>16}  "
                     f"{cell(r.get('old_before')):>10}")
    return lines


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
    if args.resume and not args.checkpoint_dir:
        raise DataError("--resume needs --checkpoint-dir")
    schedule = _schedule(args)
    if args.export:  # every output path before the first step: a bad one must not cost the training
        _check_output(args.export, args.artifact, "--export")
    if args.log:
        _check_output(args.log, args.artifact, "--log")
    if not args.checkpoint_dir:
        return _train(args, schedule)
    cli_args.check_output_dir(args.checkpoint_dir, "--checkpoint-dir")
    # held from before the checkpoint is read until the last one is written: one run per directory
    with checkpoint.lock(args.checkpoint_dir):
        try:
            return _train(args, schedule)
        except KeyboardInterrupt as ex:  # a second Ctrl-C (the first stops at a batch boundary: Interrupted)
            if isinstance(ex, Interrupted):
                raise
            raise Interrupted(checkpoint.describe(args.checkpoint_dir)) from None


def _train(args: argparse.Namespace, schedule: dict[str, Any]) -> int:
    trainer = _load(args)
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

    train = trainer.pipeline.load(args.data, args.label_column, args.label_columns)
    held = trainer.pipeline.load(args.eval_data, args.label_column, args.label_columns) if args.eval_data else None
    old = trainer.pipeline.load(args.eval_old, args.label_column, args.label_columns) if args.eval_old else None
    if args.replay is not None:
        have = trainer.replay
        if have is not None and have.capacity != args.replay:
            raise DataError(f"--replay {args.replay}: the checkpoint's replay buffer holds up to {have.capacity} "
                            f"samples; pass --replay {have.capacity}")
        if have is None:
            trainer.replay = ReplayBuffer(args.replay, args.replay_fraction)
    bar = Progress(0, "train ", enabled=not (args.json or args.no_progress))  # elapsed time counts from here
    recent: list[float] = []

    def on_batch(done: int, total: int, loss: float | None) -> None:
        bar.total = total
        if loss is not None:
            recent[:] = (recent + [loss])[-20:]
        bar.update(done, f"loss {np.mean(recent):.4f}" if recent else "loss -")

    log = RunLog(args.log) if args.log else None
    try:
        with _warnings_as_lines("train"):
            record = fit(trainer, train, args.epochs, seed=args.seed, last_batch=args.last_batch, schedule=schedule,
                         holdout=args.holdout, eval_data=held, checkpoint_dir=args.checkpoint_dir,
                         checkpoint_every=args.checkpoint_every, on_batch=on_batch, log=log.write if log else None,
                         eval_old=old, prune_keep=args.prune_keep, prune_score=args.prune_score,
                         threshold=args.threshold, kd_previous=args.kd_previous)
    finally:  # a failed or interrupted round still ends the bar's line and keeps the log's records
        bar.close(f"loss {np.mean(recent):.4f}" if recent else "")
        if log:
            log.close()
    exported = trainer.export_inference(args.export) if args.export else None
    ckpt = checkpoint.path_of(args.checkpoint_dir) if args.checkpoint_dir else None
    losses = " ".join("-" if v is None else f"{v:.4f}" for v in record["epoch_losses"])
    lines = [f"round {record['round']} on {record['data']}: {record['steps']} steps ({record['rejected']} rejected), "
             f"{record['epochs']} epochs, {record['seconds']:.1f}s; total {trainer.steps} steps, {trainer.rejected} rejected",
             f"  loss per epoch: {losses}"]
    if "after" in record:
        lines.append(f"  held-out {_score(record['before'])} -> {_score(record['after'])} "
                     f"({record['held_out']} samples)")
    if "old" in record:
        lines.append(f"  old task {_score(record.get('old_before', {}))} -> {_score(record['old'])}")
    if "kept" in record:
        lines.append(f"  pruned: trained on {record['kept']} samples ({args.prune_score}, keep {args.prune_keep:g})")
    if "replay" in record:
        lines.append(f"  replay buffer: {record['replay']} samples")
    if ckpt:
        lines.append(f"checkpoint: {ckpt}")
    if exported:
        lines.append(f"exported: {exported}")
    return _emit(args, {"round": record, "steps": trainer.steps, "rejected": trainer.rejected, "resumed": resumed,
                        "checkpoint": ckpt, "export": exported}, lines)


def eval_command(args: argparse.Namespace) -> int:
    trainer = _trainer(args)
    with _warnings_as_lines("eval"):
        ds = trainer.pipeline.load(args.data, args.label_column, args.label_columns)
        m = trainer.evaluate(ds, threshold=args.threshold)
    loss = f"loss {m['loss']:.4f}" if "loss" in m else "loss n/a"
    lines = [f"{loss}, accuracy {_pct(m)} on {m['samples']} samples"
             + (f" ({m['tokens']} labelled tokens)" if "tokens" in m else "")
             + f" of {args.data} (after {trainer.steps} steps)"]
    if "mAP" in m:
        lines.append("  " + multilabel.describe(m, ds.classes))
    return _emit(args, {"data": args.data, "steps": trainer.steps, **m}, lines)


def export_command(args: argparse.Namespace) -> int:
    _check_output(args.output, args.artifact, "-o")
    trainer = _trainer(args)
    path = trainer.export_inference(args.output)
    # Self-check: any ONNX runtime must give what `predict` gives; run the file on a seeded valid batch.
    x = example_inputs(trainer.manifest.data, seed=0)
    sess = session(path, args.threads, providers=trainer.providers)
    got = sess.run(None, x)[0]
    diff = float(np.max(np.abs(got - trainer.predict(x)))) if got.size else 0.0
    with open(path, "rb") as f:  # a large model's initializers are in one external file beside it
        data = path + ".data" if onnx_wire.external_tensors(f.read()) else None
    size = os.path.getsize(path) + (os.path.getsize(data) if data else 0)
    return _emit(args, {"output": path, "data": data, "bytes": size, "steps": trainer.steps,
                        "max_abs_diff_vs_predict": diff},
                 [f"wrote {path}{f' and {data}' if data else ''} ({size:,} bytes, weights after {trainer.steps} steps); "
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
           "scheme": m.scheme, "adapters": [a.to_json() for a in m.adapters], "state": state,
           "batch_size": trainer.batch_size,
           "preprocessing": trainer.pipeline.describe()}
    if m.lowerings is not None:  # compiled where ops had a choice of lowering, or with a target profile
        doc["lowerings"] = m.lowerings
    if m.split is not None:
        doc["split"] = m.split.to_json()
    if args.checkpoint_dir:
        doc["checkpoint"] = {"path": checkpoint.path_of(args.checkpoint_dir), "steps": trainer.steps,
                             "rejected": trainer.rejected, "schedule": trainer.schedule.to_json(),
                             "rounds": trainer.rounds}
    t = m.trainable or {}
    lines = [f"{args.artifact}: {m.model} (format {FORMAT_VERSION}, pockprop {m.pockprop_version}, "
             f"ONNX opset {(m.onnx or {}).get('opset')}) - all {len(bundle.files)} file hashes verified",
             *(f"  input  {d.name}: {d.dtype}{list(d.shape)}"
               + (f", values {d.range[0]}..{d.range[1]}" if d.range else "") for d in m.data),
             *([f"  split: part {m.split.index} of {m.split.parts} (cuts {m.split.cut_in or 'input'} .. "
                f"{m.split.cut_out or 'output'}); "
                + (f"its step returns the input gradient {m.split.input_gradient}" if m.split.input_gradient
                   else "no input gradient: nothing below trains")] if m.split else []),
             *([f"  preprocessing of raw data: {doc['preprocessing']}"] if not (m.split and m.split.index) else []),
             f"  {'labels' if m.loss.get('name') != OUTPUT_GRADIENT else 'output gradient (labels)'} "
             f"{m.labels.name}: {m.labels.dtype}{list(m.labels.shape)}",
             f"  loss {m.loss}; optimizer {m.optimizer}; lr {m.lr.initial}",
             f"  trainable: {t.get('count', '?'):,} of {t.get('total', '?'):,} parameters"
             + (f", scheme {m.scheme['name']}" if m.scheme else "")]
    for e in state:
        where = f" slice axis {e['slice']['axis']} [{e['slice']['start']}:{e['slice']['stop']}] of {e['full_shape']}" \
            if "slice" in e else ""
        lines.append(f"    {e['role']:9s} {e['name']}: {e['dtype']}{e['shape']}{where}")
    if m.lowerings is not None:
        lines.append(f"  lowerings: {describe_lowerings(m.lowerings)}")
    for a in m.adapters:  # LoRA: merged into the weight for predict, eval and export
        lines.append(f"  lora {a.kind} {a.weight}{list(a.shape)} += {a.scale:g} * {a.b} @ {a.a}")
    for name, info in doc["files"].items():
        lines.append(f"  file {name}: {info['bytes']:,} bytes")
    if REPORT_FILE in bundle.files:  # written by `pockprop compile --report`
        try:
            doc["report"] = report = json.loads(bundle.files[REPORT_FILE])
            lines += _report_lines(report)
        except (ValueError, KeyError, TypeError, AttributeError) as ex:  # JSON, a missing field, a wrong type
            raise ArtifactError(f"{bundle.where(REPORT_FILE)}: not a readable compile report "
                                f"({type(ex).__name__}: {ex})") from None
    if "checkpoint" in doc:
        c = doc["checkpoint"]
        lines.append(f"  checkpoint {c['path']}: {c['steps']} steps, {c['rejected']} rejected, {len(c['rounds'])} rounds")
        for r in c["rounds"]:
            acc = f", held-out {_score(r['before'])} -> {_score(r['after'])}" if "after" in r else ""
            lines.append(f"    round {r['round']}: {r['data']}, {r['steps']} steps, epoch losses "
                         f"{[None if v is None else round(v, 4) for v in r['epoch_losses']]}{acc}")
            if "mAP" in r.get("after", {}):
                lines.append("      " + multilabel.describe(r["after"]))
        lines += _rounds_table(c["rounds"])
        if trainer.replay is not None:
            doc["checkpoint"]["replay"] = trainer.replay.meta()
            lines.append(f"    replay buffer: {len(trainer.replay)} of up to {trainer.replay.capacity} samples "
                         f"({trainer.replay.seen} seen)")
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
    _check_output(args.output, args.artifact, "-o")
    path = pack(args.artifact, args.output)
    size = os.path.getsize(path)
    return _emit(args, {"output": path, "bytes": size}, [f"wrote {path} ({size:,} bytes)"])
