"""The `pockprop` command. Compiler subcommands import torch lazily, so the device-side ones work
where only numpy and onnxruntime are installed."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


def _compile_parser(sub: argparse._SubParsersAction) -> None:
    from_engine = lambda name: (lambda args: __import__("engine.cli", fromlist=[name]).__dict__[name](args))  # noqa: E731
    p = sub.add_parser("compile", help="compile a PyTorch model into a training artifact (needs the [compile] extra)",
                       description="Trace a PyTorch model and emit train_step.onnx, infer.onnx, state and manifest.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="models:NAME (zoo: mobilenet_v2, resnet18, resnet26, resnet50, mcunet, mlp) "
                                 "or package.module:function returning an nn.Module")
    p.add_argument("--input-shape", help="input shape incl. batch, e.g. 8,3,128,128 (default: the zoo model's)")
    p.add_argument("--num-classes", type=int, help="passed to the model builder")
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
    p.add_argument("--seed", type=int, default=0, help="torch seed for the model's initial weights")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.set_defaults(func=from_engine("compile_command"))

    o = sub.add_parser("ops", help="list the ops the compiler supports (needs the [compile] extra)")
    o.add_argument("--markdown", action="store_true", help="print docs/ops.md")
    o.set_defaults(func=from_engine("ops_command"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pockprop", description="Compile-ahead sparse training for edge devices.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _compile_parser(sub)
    return parser


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


if __name__ == "__main__":
    sys.exit(main())
