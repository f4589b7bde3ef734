"""Compiler subcommands of `pockprop` (compile, ops, search); pockprop/cli.py dispatches here lazily."""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time

from pockprop.errors import CompileError

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def _optimizer(args: argparse.Namespace) -> dict[str, object]:
    opt: dict[str, object] = {"name": args.optimizer}
    for key in ("lr", "momentum", "weight_decay", "eps"):
        if getattr(args, key) is not None:
            opt[key] = getattr(args, key)
    if args.nesterov:
        opt["nesterov"] = True
    if args.betas:
        opt["betas"] = [float(b) for b in args.betas.split(",")]
    return opt


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        raise CompileError(f"--input-shape {text!r}: expected comma-separated integers like 8,3,128,128") from None
    if not shape or any(s <= 0 for s in shape):
        raise CompileError(f"--input-shape {text!r}: every dimension must be positive")
    return shape


def load_weights(model: object, path: str) -> None:
    """Load a safetensors state_dict into `model`; CompileError naming missing, extra or mis-shaped keys."""
    import torch

    from pockprop.artifact import safetensors

    try:
        tensors, _ = safetensors.load(path)
    except FileNotFoundError:
        raise CompileError(f"--weights {path}: no such file") from None
    except (OSError, ValueError) as ex:
        raise CompileError(f"--weights {path}: cannot read as safetensors ({ex})") from None
    own = model.state_dict()  # type: ignore[attr-defined]
    missing = [k for k in own if k not in tensors]
    extra = [k for k in tensors if k not in own]
    shapes = [f"{k} {list(tensors[k].shape)} (model {list(own[k].shape)})" for k in own
              if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)]
    problems = []
    for what, keys in (("missing keys", missing), ("unexpected keys", extra), ("mis-shaped", shapes)):
        if keys:
            problems.append(f"{what}: {', '.join(keys[:6])}" + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else ""))
    if problems:
        raise CompileError(f"--weights {path} does not fit the model: " + "; ".join(problems))
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()})  # type: ignore[attr-defined]


def model_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """Builder kwargs from --model-kwargs (JSON) and --num-classes."""
    kwargs: dict[str, object] = {}
    if getattr(args, "model_kwargs", None):
        try:
            kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as ex:
            raise CompileError(f"--model-kwargs {args.model_kwargs!r}: not JSON ({ex})") from None
        if not isinstance(kwargs, dict):
            raise CompileError(f"--model-kwargs {args.model_kwargs!r}: expected a JSON object")
    if args.num_classes:
        kwargs["num_classes"] = args.num_classes
    return kwargs


def build_model(spec: str, kwargs: dict[str, object], seed: int, weights: str | None) -> tuple[object, object]:
    """(model, default input shape) from a spec, seeded, with --weights loaded; CompileError if it fails."""
    import torch

    from pockprop import models

    torch.manual_seed(seed)
    try:
        model, default_shape = models.resolve(spec, **kwargs)
    except (ValueError, TypeError) as ex:
        raise CompileError(str(ex)) from None
    if weights:
        load_weights(model, weights)
    return model, default_shape


def source_of(args: argparse.Namespace, kwargs: dict[str, object]) -> dict[str, object]:
    """What the manifest records to rebuild the model (manifest 'source'; read by `pockprop search ARTIFACT`)."""
    import hashlib
    import os

    src: dict[str, object] = {"model": args.model, "kwargs": kwargs, "seed": args.seed}
    if args.weights:
        with open(args.weights, "rb") as f:
            src["weights"] = {"path": os.path.abspath(args.weights), "sha256": hashlib.sha256(f.read()).hexdigest()}
    return src


def compile_command(args: argparse.Namespace) -> int:
    import torch

    from pockprop.compiler.compile import compile
    from pockprop.compiler.preprocess import describe as describe_preprocess, resolve as resolve_preprocess

    try:
        kwargs = model_kwargs(args)
        model, default_shape = build_model(args.model, kwargs, args.seed, args.weights)
        shape = _shape(args.input_shape) if args.input_shape else default_shape
        if shape is None:
            raise CompileError(f"{args.model} has no default input shape; pass --input-shape")
        preprocess = resolve_preprocess(getattr(args, "preprocess", None), shape, args.model)
        t0 = time.perf_counter()
        print(f"compiling {args.model} for input {','.join(map(str, shape))} ...", file=sys.stderr)
        print(f"preprocess: {describe_preprocess(preprocess, shape)}", file=sys.stderr)
        art = compile(model, (torch.randn(*shape),), loss=args.loss, optimizer=_optimizer(args),
                      trainable=args.trainable, scheme=args.scheme, label_smoothing=args.label_smoothing,
                      name=args.model.split(":")[-1], preprocess=preprocess)
        art.source = source_of(args, kwargs)
        if args.report:
            from pockprop.compiler.report import compile_report, format_report

            full = compile(model, (torch.randn(*shape),), loss=args.loss, optimizer=_optimizer(args), scheme="full")
            art.report = compile_report(art, full)
        art.save(args.output)
        if art.scheme is not None:
            print(art.scheme.table())
        if art.report is not None:
            print(format_report(art.report, args.model))
    except CompileError as ex:
        print(f"pockprop compile: error: {ex}", file=sys.stderr)
        return EXIT_BAD_INPUT
    total = sum(art.parameter_count.values())
    print(f"wrote {args.output} in {time.perf_counter() - t0:.1f}s: {len(art.trainable)} trainable tensors, "
          f"{art.trainable_count:,} of {total:,} parameters ({100 * art.trainable_count / max(total, 1):.2f}%), "
          f"train_step.onnx {len(art.train_model.graph.node)} nodes")
    return EXIT_OK


def search_command(args: argparse.Namespace) -> int:
    from pockprop.search.cli import search_command as run

    return run(args)


def supported_ops() -> tuple[list[str], dict[str, str]]:
    """(ATen overloads the frontend imports, IR op name -> one-line math)."""
    from pockprop.ops import ATEN, all_ops

    docs = {name: (inspect.getdoc(type(op)) or "").splitlines()[0] for name, op in sorted(all_ops().items())}
    return sorted(ATEN), docs


def ops_markdown() -> str:
    aten_ops, ir_ops = supported_ops()
    lines = ["# Supported ops", "", "Generated by `pockprop ops --markdown` from the op registry "
             "(`ops/`); a test keeps this file in sync.", "",
             "## ATen ops the frontend imports", "", "After `torch.export` and core-ATen decomposition, a model "
             "may use these ATen overloads:", ""]
    lines += [f"- `{a}`" for a in aten_ops]
    lines += ["", "## IR ops", "", "Each with its shape rule, VJP rule and ONNX lowering in one file of "
              "`ops/`. Ops marked *backward* appear only in gradient graphs.", "",
              "| op | math |", "| --- | --- |"]
    from pockprop.ops import get_op

    for name, doc in ir_ops.items():
        kind = " *(backward)*" if not get_op(name).differentiable and name.endswith("_grad") else ""
        lines.append(f"| `{name}`{kind} | {doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def ops_command(args: argparse.Namespace) -> int:
    if args.markdown:
        sys.stdout.write(ops_markdown())
        return EXIT_OK
    aten_ops, ir_ops = supported_ops()
    print(json.dumps({"aten": aten_ops, "ir": ir_ops}, indent=2))
    return EXIT_OK
