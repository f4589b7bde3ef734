"""`pockprop compile` and `pockprop ops`: their parsers (`add_parser`) and run functions. Torch loads inside
the run functions only, so pockprop.cli assembles these parsers where just numpy and onnxruntime exist."""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from typing import Any

from pockprop import args as cli_args
from pockprop.compiler.preprocess import HELP as PREPROCESS_HELP  # torch-free
from pockprop.artifact.contract import BY_NAME
from pockprop.artifact.tuning import describe_lowerings
from pockprop.errors import EXIT_OK, CompileError, UsageError
from pockprop.tracing.loader import spec_of


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="compile a PyTorch model into a training artifact (needs the [compile] extra)",
                       description="Trace a PyTorch model and emit train_step.onnx, infer.onnx, state and manifest.")
    cli_args.add_model_spec(p)
    p.add_argument("--loss", default="cross_entropy", choices=["cross_entropy", "bce_with_logits", "mse", "kd"],
                   help="training loss on the model's output (kd: distillation, see --kd)")
    p.add_argument("--kd", metavar="KEY=VALUE,...", help="with --loss kd: task=cross_entropy|bce_with_logits, "
                   "alpha (task weight, 0.5), temperature (2), teacher=model|logits (model: the original model "
                   "compiled into the step; logits: fed as the step's teacher_logits input)")
    p.add_argument("--label-smoothing", type=cli_args.number(0, 1, hi_open=True), default=0.0,
                   help="cross_entropy label smoothing, in [0, 1)")
    p.add_argument("--pos-weight", type=cli_args.numbers(lo=0), metavar="W[,W...]",
                   help="bce_with_logits: weight of the positive term, one for all labels or one per label "
                        "(torch's BCEWithLogitsLoss pos_weight)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="optimizer built into the step")
    p.add_argument("--lr", type=cli_args.learning_rate, help="initial learning rate (default: sgd 0.01, adamw 1e-3)")
    p.add_argument("--momentum", type=cli_args.momentum, help="sgd momentum")
    p.add_argument("--nesterov", action="store_true", help="sgd nesterov momentum")
    p.add_argument("--weight-decay", type=cli_args.number(0), help="sgd: L2 added to the gradient; adamw: decoupled "
                                                                   "(default: sgd 0, adamw 0.01)")
    p.add_argument("--betas", type=cli_args.numbers(2, 0, 1, hi_open=True), help="adamw betas, e.g. 0.9,0.999")
    p.add_argument("--eps", type=cli_args.number(0, lo_open=True), help="adamw epsilon")
    p.add_argument("--trainable", help="comma-separated parameter name patterns, e.g. 'features.17.*,classifier.*' "
                                       "(whole tensors; default: every parameter)")
    p.add_argument("--scheme", help="update scheme instead of --trainable: a preset (full, classifier, last-k:N, "
                                    "bias-only, sparse, tbft-front, tbft-middle, tbft-rear) or a YAML file; "
                                    "see docs/schemes.md")
    p.add_argument("--lora", type=lora_option, metavar="r=R,alpha=A,targets=M1,M2",
                   help="LoRA adapters on the named linear/conv modules (peft's target_modules), e.g. "
                        "r=8,alpha=16,targets=q_proj,v_proj; only they are trained besides --trainable/--scheme "
                        "(docs/peft.md)")
    p.add_argument("--report", action="store_true",
                   help="print per-layer update kinds, MACs and memory beside full backprop; write report.json")
    p.add_argument("--preprocess", metavar="PRESET_OR_JSON", help=PREPROCESS_HELP)
    p.add_argument("--input", dest="inputs", action="append", type=input_decl, metavar="NAME:DTYPE:SHAPE",
                   help="a data input, passed to forward as keyword NAME, e.g. input_ids:int64:8,128; repeat it "
                        "for each input (instead of --input-shape, which declares one float32 input)")
    p.add_argument("--prompt-tokens", type=cli_args.integer(1), metavar="N",
                   help="prepend a trainable soft prompt of N embeddings after the embedding layer (Hugging Face "
                        "text models, ViT); it trains with --trainable/--scheme, or alone")
    p.add_argument("--prompt-init", choices=["vocab", "random"],
                   help="soft prompt initial value: rows of the token embedding (vocab; text models' choice when not "
                        "given) or small random (random; ViT's)")
    p.add_argument("--model-output", metavar="NAME", help="the returned tensor to train on when the model returns "
                                                          "several, e.g. logits (a ModelOutput's field)")
    p.add_argument("--target-profile", metavar="PROFILE",
                   help="choose each op's lowering from a profile measured on the target with `pockprop tune` (a "
                        "JSON file), or a shipped one: default (this machine's architecture), x86_64, aarch64; "
                        "without one the cost model chooses (docs/tuning.md)")
    p.add_argument("--tune-kit", metavar="DIR", help="also write the tuning kit of the training step to DIR, for "
                                                     "`pockprop tune` on the target")
    p.add_argument("--batchnorm", choices=["frozen", "train"],
                   help="frozen: batch norm with its running statistics, as in eval mode; train: as PyTorch's "
                        "model.train(), batch statistics in the step and the running statistics updated as state "
                        "(default: what the --scheme file says, else frozen)")
    p.add_argument("--split-at", action="append", metavar="MODULE",
                   help="cut the model after this module (a path like 'layer2'; twice for a U-shaped split whose "
                        "head and loss stay on the device) into part artifacts part0/, part1/, ... with an index "
                        "split.json in the output directory (docs/split.md)")
    p.add_argument("--local-head", action="store_true",
                   help="with --split-at: also an auxiliary head (average pool + linear) on the first part's output, "
                        "written to local_head/, so the device trains its part with a local loss (SFPrompt)")
    p.add_argument("--private-backprop", action="store_true",
                   help="with --split-at: give the server's parts the gradient and update graphs that private "
                        "backpropagation needs: the device sends the label-dependent gradient hidden among random "
                        "vectors (docs/split.md: what that protects and what not)")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.set_defaults(func=compile_command)

    o = sub.add_parser("ops", help="list the ops the compiler supports (needs the [compile] extra)")
    o.add_argument("--markdown", action="store_true", help="print docs/ops.md")
    o.set_defaults(func=ops_command)


def _optimizer(args: argparse.Namespace) -> dict[str, object]:
    opt: dict[str, object] = {"name": args.optimizer}
    for key in ("lr", "momentum", "weight_decay", "eps", "betas"):
        if getattr(args, key) is not None:
            opt[key] = getattr(args, key)
    if args.nesterov:
        opt["nesterov"] = True
    return opt


def _prompt(args: argparse.Namespace) -> dict[str, object] | None:
    if args.prompt_tokens is None:
        if args.prompt_init is not None:
            raise UsageError("--prompt-init needs --prompt-tokens")
        return None
    return {"tokens": args.prompt_tokens} | ({"init": args.prompt_init} if args.prompt_init else {})


def compile_command(args: argparse.Namespace) -> int:
    import torch  # first: without the [compile] extra, saying so is the answer

    from pockprop.compiler.compile import compile
    from pockprop.compiler.preprocess import describe as describe_preprocess, resolve as resolve_preprocess

    cli_args.check_output_dir(args.output, "-o")  # before the compile, not after it
    if args.tune_kit:
        cli_args.check_output_dir(args.tune_kit, "--tune-kit")
        cli_args.check_not_inside(args.tune_kit, args.output, "--tune-kit")
    target = None
    if args.target_profile:  # a bad profile fails before the trace, writing nothing
        from pockprop.compiler.target import load_target_profile

        target = load_target_profile(args.target_profile)
    if args.inputs and args.input_shape:
        raise UsageError("give either --input (one per data input) or --input-shape, not both")
    spec = spec_of(args)
    model, default_shape = spec.build()
    declared = args.inputs or [("x", spec.input_dtype(), args.input_shape or default_shape)]
    shape = declared[0][2]
    if shape is None:
        raise CompileError(f"{args.model} has no default input shape; pass --input-shape or --input")
    float_first = declared[0][1].startswith("float")
    preprocess = resolve_preprocess(args.preprocess, shape, args.model) if float_first or args.preprocess else {}
    t0 = time.perf_counter()
    what = ", ".join(f"{n}:{d}:{','.join(map(str, s))}" for n, d, s in declared) if args.inputs \
        else ",".join(map(str, shape))
    print(f"compiling {args.model} for input {what} ...", file=sys.stderr)
    print(f"preprocess: {describe_preprocess(preprocess, shape) if float_first else 'none'}", file=sys.stderr)
    # one input (no --input): features or pixels, or token ids where the builder says so (default_input_dtype;
    # zeros are valid ids, and values do not matter to the trace)
    examples = _examples(declared) if args.inputs else (
        torch.randn(*shape) if float_first else torch.zeros(shape, dtype=torch.int64),)
    for flag, given in (("--private-backprop", args.private_backprop), ("--local-head", args.local_head)):
        if given and not args.split_at:
            raise UsageError(f"{flag} applies to a split model (--split-at)")
    if args.split_at:
        return _compile_split(args, model, examples, preprocess, spec, target, t0)
    art = compile(model, examples, loss=args.loss, optimizer=_optimizer(args), pos_weight=args.pos_weight,
                  trainable=args.trainable, scheme=args.scheme, label_smoothing=args.label_smoothing,
                  name=args.model.split(":")[-1], preprocess=preprocess, output=args.model_output,
                  target_profile=target, lora=args.lora, kd=args.kd, prompt=_prompt(args), batchnorm=args.batchnorm)
    art.source = spec.source()
    if args.report:
        from pockprop.compiler.report import compile_report, format_report

        full = compile(model, examples, loss=args.loss, optimizer=_optimizer(args), scheme="full", kd=args.kd,
                       output=args.model_output, prompt=_prompt(args))
        art.report = compile_report(art, full)
    art.save(args.output)
    if art.scheme is not None:
        print(art.scheme.table())
    if art.report is not None:
        print(format_report(art.report, args.model))
    if art.lowerings is not None:
        print(f"lowerings: {describe_lowerings(art.lowerings)}", file=sys.stderr)
    if args.tune_kit:
        from pockprop.compiler.tunekit import build_kit

        assert art.train_graph is not None
        kit = build_kit(art.train_graph, args.tune_kit, model=art.name)
        print(f"wrote tuning kit {args.tune_kit}: {len(kit.entries)} lowering keys, "
              f"{sum(len(e.candidates) for e in kit.entries)} candidates", file=sys.stderr)
    total = sum(art.parameter_count.values())
    print(f"wrote {args.output} in {time.perf_counter() - t0:.1f}s: {len(art.trainable)} trainable tensors, "
          f"{art.trainable_count:,} of {total:,} parameters ({100 * art.trainable_count / max(total, 1):.2f}%), "
          f"train_step.onnx {len(art.train_model.graph.node)} nodes")
    return EXIT_OK


def _compile_split(args: argparse.Namespace, model: Any, examples: Any, preprocess: Any, spec: Any, target: Any,
                   t0: float) -> int:
    """`compile --split-at`: the parts and their index (compiler/split.py)."""
    from pockprop.compiler.split import compile_split, holders, save_split

    for flag, given in (("--report", args.report), ("--tune-kit", args.tune_kit),
                        ("--batchnorm train", args.batchnorm == "train")):
        if given:
            raise UsageError(f"{flag} does not apply to a split model (--split-at)")
    arts = compile_split(model, examples, args.split_at, loss=args.loss, optimizer=_optimizer(args),
                         pos_weight=args.pos_weight, trainable=args.trainable, scheme=args.scheme,
                         label_smoothing=args.label_smoothing, name=args.model.split(":")[-1], preprocess=preprocess,
                         output=args.model_output, target_profile=target, lora=args.lora,
                         prompt=_prompt(args), private=args.private_backprop)
    for art in arts:
        art.source = spec.source()
    head = None
    if args.local_head:
        from pockprop.compiler.split import compile_local_head, default_head

        assert arts[0].train_graph is not None and arts[-1].train_graph is not None
        classes = arts[-1].train_graph.types[arts[-1].output].shape[-1]
        head = compile_local_head(default_head(arts[0].train_graph.types[arts[0].output].shape, classes), arts[0],
                                  loss=args.loss, optimizer=_optimizer(args))
    save_split(arts, args.output, local_head=head)
    for k, (art, holder) in enumerate(zip(arts, holders(len(arts)))):
        grad = "returns its input gradient" if art.split and art.split.input_gradient else "no input gradient"
        print(f"part{k} ({holder}): {len(art.trainable)} trainable tensors, {art.trainable_count:,} parameters, "
              f"{grad}")
    print(f"wrote {args.output} in {time.perf_counter() - t0:.1f}s: {len(arts)} parts cut after "
          f"{', '.join(args.split_at)}")
    return EXIT_OK


def lora_option(text: str) -> object:
    """An argparse type: --lora's KEY=VALUE list, checked as compile(lora=...) checks it."""
    from pockprop.compiler.lora import parse_spec  # numpy only

    try:
        return parse_spec(text)
    except CompileError as ex:
        raise argparse.ArgumentTypeError(str(ex).removeprefix("lora: ")) from None


def input_decl(text: str) -> tuple[str, str, tuple[int, ...]]:
    """An argparse type: NAME:DTYPE:SHAPE, a forward keyword argument with its dtype (from the artifact's
    dtype table) and shape incl. batch."""
    parts = text.split(":")
    if len(parts) != 3 or not parts[0].isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME:DTYPE:SHAPE like input_ids:int64:8,128, got {text!r}")
    if parts[1] not in BY_NAME:
        raise argparse.ArgumentTypeError(f"dtype {parts[1]!r}: choose one of {', '.join(BY_NAME)}, got {text!r}")
    return parts[0], parts[1], cli_args.shape(parts[2])


def _examples(declared: list[tuple[str, str, tuple[int, ...]]]) -> dict[str, object]:
    """Example tensors for --input declarations, as keyword inputs: only their shapes and dtypes matter to
    the trace; integers are 1 (a valid token id of any vocabulary, and 'attend' in a mask)."""
    import torch

    names = [n for n, _, _ in declared]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"--input {', '.join(twice)} declared twice")
    return {n: torch.randn(*s).to(getattr(torch, d)) if d.startswith("float")
            else torch.ones(*s, dtype=getattr(torch, d)) for n, d, s in declared}


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
