"""The `pockprop` command. Compiler subcommands import torch lazily, so the device-side ones (train,
eval, export, inspect, pack) work where only numpy and onnxruntime are installed.

Exit codes: 0 ok, 2 bad input (arguments, artifact, checkpoint or data), 1 internal error.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from typing import Callable

from pockprop.compiler.preprocess import HELP as PREPROCESS_HELP  # torch-free

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


def _compile_parser(sub: argparse._SubParsersAction) -> None:
    from_engine = lambda name: (lambda args: __import__("pockprop.compiler.cli", fromlist=[name]).__dict__[name](args))  # noqa: E731
    p = sub.add_parser("compile", help="compile a PyTorch model into a training artifact (needs the [compile] extra)",
                       description="Trace a PyTorch model and emit train_step.onnx, infer.onnx, state and manifest.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="models:NAME (zoo: mobilenet_v2, resnet18, resnet26, resnet50, mcunet, mlp) "
                                 "or package.module:function returning an nn.Module")
    p.add_argument("--input-shape", help="input shape incl. batch, e.g. 8,3,128,128 (default: the zoo model's)")
    p.add_argument("--num-classes", type=int, help="passed to the model builder")
    p.add_argument("--model-kwargs", help='JSON builder kwargs, e.g. \'{"width": 8}\'')
    p.add_argument("--weights", help="pretrained weights to fine-tune from: a state_dict saved with safetensors")
    p.add_argument("--loss", default="cross_entropy", choices=["cross_entropy", "bce_with_logits", "mse"])
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--lr", type=float, help="initial learning rate (sgd 0.01, adamw 1e-3)")
    p.add_argument("--momentum", type=float, help="sgd momentum")
    p.add_argument("--nesterov", action="store_true", help="sgd nesterov momentum")
    p.add_argument("--weight-decay", type=float, help="sgd: L2 added to the gradient; adamw: decoupled (default 0.01)")
    p.add_argument("--betas", help="adamw betas, e.g. 0.9,0.999")
    p.add_argument("--eps", type=float, help="adamw epsilon")
    p.add_argument("--trainable", help="comma-separated parameter name patterns, e.g. 'features.17.*,classifier.*' "
                                       "(whole tensors; default: every parameter)")
    p.add_argument("--scheme", help="update scheme instead of --trainable: a preset (full, classifier, last-k:N, "
                                    "bias-only, sparse, tbft-front, tbft-middle, tbft-rear) or a YAML file; "
                                    "see docs/schemes.md")
    p.add_argument("--report", action="store_true",
                   help="print per-layer update kinds, MACs and memory beside full backprop; write report.json")
    p.add_argument("--seed", type=int, default=0, help="torch seed for the model's initial weights")
    p.add_argument("--preprocess", metavar="PRESET_OR_JSON", help=PREPROCESS_HELP)
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.set_defaults(func=from_engine("compile_command"))

    _search_parser(sub, from_engine("search_command"))

    o = sub.add_parser("ops", help="list the ops the compiler supports (needs the [compile] extra)")
    o.add_argument("--markdown", action="store_true", help="print docs/ops.md")
    o.set_defaults(func=from_engine("ops_command"))


def _search_parser(sub: argparse._SubParsersAction, func: Callable[[argparse.Namespace], int]) -> None:
    s = sub.add_parser("search", help="choose a sparse update scheme under a memory budget by probing fine-tuning runs "
                                      "(needs the [compile] extra)",
                       description="Contribution analysis: fine-tune each candidate layer's bias and weight slices "
                                   "briefly through the device runtime, measure the validation gain over the "
                                   "classifier-only baseline, cost each option from the compile report, and pick the "
                                   "best set under the budget (exact knapsack). --drift instead probes "
                                   "tbft-front/middle/rear. See docs/search.md.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("model", metavar="MODEL_OR_ARTIFACT",
                   help="models:NAME or package.module:function (as for compile), or an artifact directory / packed "
                        "file compiled by `pockprop compile` (its model, weights and preprocessing are reused)")
    s.add_argument("--data", required=True, help=".npz (x, y), .csv or a folder of class folders: raw training data, "
                                                 "preprocessed like the runtime does; a part is held out for validation")
    s.add_argument("--budget-memory", help="training-memory budget, e.g. 2MB, 512KB, 1.5GB or bytes "
                                           "(KB = 1024 bytes); required unless --drift")
    s.add_argument("--memory", default="training", choices=["training", "peak"],
                   help="what the budget bounds: training memory (trainable + gradient + optimizer state + kept "
                        "activations) or the planner's estimated peak")
    s.add_argument("--budget-ms", type=float, help="also bound the measured milliseconds per training step")
    s.add_argument("--budget-params", help="also bound the trainable parameters: a count (50000) or a percentage of "
                                           "the model's parameters (10%%); not with --budget-ms")
    s.add_argument("--ratios", default="1/8,1/4,1/2,1", help="weight channel ratios to probe")
    s.add_argument("--candidates", help="comma-separated layer patterns to consider (default: every conv/linear/BN "
                                        "layer but the head)")
    s.add_argument("--max-layers", type=int, help="consider only the last N candidate layers")
    s.add_argument("--metric", default="accuracy", choices=["accuracy", "loss"],
                   help="gain measure (accuracy: validation loss breaks ties)")
    s.add_argument("--input-shape", help="input shape incl. batch (default: the zoo model's; an artifact's own)")
    s.add_argument("--num-classes", type=int, help="passed to the model builder")
    s.add_argument("--model-kwargs", help="JSON builder kwargs")
    s.add_argument("--weights", help="pretrained weights (safetensors state_dict) to start from")
    s.add_argument("--seed", type=int, default=0, help="torch seed for the model's initial weights (no --weights)")
    s.add_argument("--checkpoint-dir", help="artifact only: start from this checkpoint's trained weights")
    s.add_argument("--preprocess", metavar="PRESET_OR_JSON",
                   help=f"model only (an artifact's recorded preprocessing is used as is): {PREPROCESS_HELP}")
    s.add_argument("--label-column", help="CSV: the label column")
    s.add_argument("--val-fraction", type=float, default=0.2, help="stratified share of --data held out for validation")
    s.add_argument("--batch", type=int, help="probe batch size (default: an artifact's, else 32)")
    s.add_argument("--epochs", type=float, default=2.0, help="fine-tuning epochs per probe")
    s.add_argument("--steps", type=int, help="fine-tuning steps per probe (instead of --epochs)")
    s.add_argument("--repeats", type=int, default=1, help="average each probe over this many data orders")
    s.add_argument("--optimizer", choices=["sgd", "adamw"], help="probe optimizer (default: an artifact's, else sgd)")
    s.add_argument("--lr", type=float, help="probe learning rate (default: an artifact's, else 0.01)")
    s.add_argument("--momentum", type=float, help="sgd momentum (default 0.9)")
    s.add_argument("--cache", help="probe cache directory: a re-run skips finished probes, an interrupted one resumes")
    s.add_argument("-o", "--output", help="write the chosen scheme as YAML here (for pockprop compile --scheme)")
    s.add_argument("--plot", help="write a PNG of gain vs memory here (needs matplotlib)")
    s.add_argument("--json", help="write every probe, cost and the choice as JSON here")
    s.add_argument("--drift", action="store_true", help="TBFT: probe tbft-front/middle/rear and choose the block, "
                                                        "with an energy estimate per scheme")
    s.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=func)


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    def bench(args: argparse.Namespace) -> int:
        from pockprop.bench import bench_command  # lazy: torch and the compiler load only for this subcommand
        return bench_command(args)

    def kwargs(text: str) -> dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as ex:
            raise argparse.ArgumentTypeError(f"--model-kwargs: not JSON: {ex}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError("--model-kwargs: expected a JSON object")
        return value

    b = sub.add_parser("bench", help="benchmark one training step against onnxruntime inference, PyTorch eager and "
                                     "onnxruntime-training (needs the [compile] extra)",
                       description="Each configuration in its own worker process; interleaved rounds; medians and "
                                   "medians of per-round ratios; peak RSS from VmHWM. See docs/benchmarks.md.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--model", default="mobilenet_v2", help="zoo NAME or package.module:function")
    b.add_argument("--model-kwargs", type=kwargs, help='JSON builder kwargs, e.g. \'{"width_mult": 0.25}\'')
    b.add_argument("--num-classes", type=int, default=10)
    b.add_argument("--scheme", default="sparse", help="scheme preset or YAML file (see docs/schemes.md)")
    b.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    b.add_argument("--lr", type=float, help="learning rate (default: the optimizer's)")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--resolution", type=int, default=128, help="input height and width (image models)")
    b.add_argument("--threads", type=int, default=2, help="intra-op threads for every configuration")
    b.add_argument("--rounds", type=int, default=10, help="interleaved measured rounds")
    b.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    b.add_argument("--steps", type=int, default=3, help="steps per round per configuration (median taken)")
    b.add_argument("--configs", nargs="+", help="only these configurations (names or kinds); default: all")
    b.add_argument("--no-peers", dest="peers", action="store_false", help="skip the onnxruntime-training rows")
    b.add_argument("--workdir", help="keep compiled artifacts here (default: a temporary directory)")
    b.add_argument("--json", help="write the results here")
    b.add_argument("--png", help="write a bar chart here (needs matplotlib)")
    b.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    b.set_defaults(func=bench)


def _device_parsers(sub: argparse._SubParsersAction) -> None:
    from_runtime = lambda name: (lambda args: getattr(__import__("pockprop.runtime.commands", fromlist=[name]), name)(args))  # noqa: E731
    fmt = argparse.ArgumentDefaultsHelpFormatter

    def common(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
        p.add_argument("artifact", help="artifact directory or packed .pockprop file")
        if checkpoint:
            p.add_argument("--checkpoint-dir", help="use the trained state of this checkpoint directory")
        p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    t = sub.add_parser("train", help="train an artifact on device data (numpy + onnxruntime only)", formatter_class=fmt,
                       description="Train for N epochs; with --checkpoint-dir, checkpoints atomically and can --resume. "
                                   "Resuming with the same data continues an interrupted run bit for bit; with new "
                                   "data it starts the next round from the checkpoint (continual training).")
    common(t, checkpoint=False)
    t.add_argument("--data", required=True, help=".npz (x, y), .csv (features + label column) or a folder of class folders")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--batch", type=int, help="must equal the compiled batch size (the graph's shapes are fixed)")
    t.add_argument("--lr", type=float, help="base learning rate (default: the artifact's)")
    t.add_argument("--schedule", default="constant", choices=["constant", "warmup", "cosine", "step"])
    t.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (any schedule)")
    t.add_argument("--step-size", type=int, default=0, help="step schedule: decay every this many steps")
    t.add_argument("--gamma", type=float, default=0.1, help="step schedule: decay factor")
    t.add_argument("--min-lr", type=float, default=0.0, help="cosine: final learning rate")
    t.add_argument("--seed", type=int, default=0, help="shuffling seed")
    t.add_argument("--last-batch", default="drop", choices=["drop", "wrap"],
                   help="last partial batch of an epoch: drop it, or fill it with the epoch's first samples")
    t.add_argument("--holdout", type=float, default=0.0, help="fraction of --data held out for accuracy before/after")
    t.add_argument("--eval-data", help="held-out data for accuracy before/after (instead of --holdout)")
    t.add_argument("--label-column", help="CSV: the label column (default: label/y/target/class, else the last)")
    t.add_argument("--checkpoint-dir", help="write checkpoints here (atomically)")
    t.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every K batches")
    t.add_argument("--resume", action="store_true", help="start from the checkpoint in --checkpoint-dir if there is one")
    t.add_argument("--guard", default="full", choices=["full", "loss", "off"],
                   help="reject steps with non-finite loss or updated tensors (full), loss only, or never")
    t.add_argument("--export", metavar="ONNX", help="also export the trained inference model here")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=from_runtime("train_command"))

    e = sub.add_parser("eval", help="loss and accuracy of an artifact (optionally its checkpoint) on data", formatter_class=fmt)
    common(e)
    e.add_argument("--data", required=True, help=".npz, .csv or image folder")
    e.add_argument("--label-column", help="CSV: the label column")
    e.set_defaults(func=from_runtime("eval_command"))

    x = sub.add_parser("export", help="write one self-contained inference ONNX model with the trained weights",
                       formatter_class=fmt)
    common(x)
    x.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    x.set_defaults(func=from_runtime("export_command"))

    i = sub.add_parser("inspect", help="validate an artifact and describe it (and a checkpoint)", formatter_class=fmt)
    common(i)
    i.set_defaults(func=from_runtime("inspect_command"))

    k = sub.add_parser("pack", help="pack an artifact directory into one file for copying to a device",
                       formatter_class=fmt)
    k.add_argument("artifact", help="artifact directory")
    k.add_argument("-o", "--output", required=True, help="the file to write, e.g. model.pockprop")
    k.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    k.set_defaults(func=from_runtime("pack_command"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pockprop", description="Compile-ahead sparse training for edge devices.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _compile_parser(sub)
    _bench_parser(sub)
    _device_parsers(sub)
    return parser


def _fail(args: argparse.Namespace, code: int, message: str) -> int:
    print(f"pockprop {args.command}: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "exit_code": code, "error": message}))
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ModuleNotFoundError as ex:
        if ex.name in {"torch", "onnx", "networkx", "yaml"}:
            print(f"pockprop {args.command}: needs {ex.name}; install the compiler with "
                  "`pip install 'pockprop[compile]'`", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise
    except Exception as ex:
        from pockprop.errors import ArtifactError, DataError  # stdlib only

        if args.command in ("compile", "ops"):  # the compiler reports its own errors; anything else is its bug
            raise
        if isinstance(ex, (ArtifactError, DataError)):
            return _fail(args, EXIT_BAD_INPUT, f"error: {ex}")
        traceback.print_exc()
        return _fail(args, EXIT_INTERNAL, f"internal error: {type(ex).__name__}: {ex} (please report it)")


if __name__ == "__main__":
    sys.exit(main())
