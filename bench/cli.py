"""`pockprop bench`: its parser (`add_parser`) and run function; torch and the compiler load inside `bench_command`."""
from __future__ import annotations

import argparse
import json
import sys

from pockprop import args as cli_args
from pockprop.compiler.cli import lora_option
from pockprop.errors import EXIT_OK


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="benchmark one training step against onnxruntime inference, PyTorch eager and "
                                     "onnxruntime-training (needs the [compile] extra)",
                       description="Each configuration in its own worker process; interleaved rounds; medians and "
                                   "medians of per-round ratios; peak RSS from VmHWM. See docs/benchmarks.md.")
    cli_args.add_model_spec(b, option=True, default="mobilenet_v2", input_shape=None,
                            help="zoo NAME (models:NAME; llama_small and bert_base4 take token ids) or "
                                 "package.module:function (default --num-classes: 10 for a model of images or "
                                 "features, the builder's own for one of token ids)")
    b.add_argument("--scheme", default="sparse", help="scheme preset or YAML file (see docs/schemes.md); several, "
                                                      "comma-separated, are measured in one interleaved run")
    b.add_argument("--lowerings", metavar="CHOICES",
                   help="also measure every scheme's artifact compiled with these lowering choices, comma-separated: "
                        "'default' (the lowering each op had before tuning), 'cost' (the cost model), or a target "
                        "profile (a path, 'machine' for the one shipped for this machine, or a shipped name such "
                        "as x86_64; docs/tuning.md); rows pockprop-SCHEME@CHOICE beside pockprop-SCHEME (compiled "
                        "as `pockprop compile` does)")
    b.add_argument("--lora", type=lora_option, metavar="r=R,alpha=A,targets=M1,M2",
                   help="also measure a LoRA step: pockprop's (compile --lora) against PyTorch + peft's LoRA of the "
                        "same r, alpha and targets (rows pockprop-lora, torch+peft; needs peft)")
    b.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="optimizer of every training row")
    b.add_argument("--lr", type=cli_args.learning_rate, help="learning rate (default: the optimizer's)")
    b.add_argument("--batch", type=cli_args.positive_int, default=8, help="batch size")
    b.add_argument("--resolution", type=cli_args.positive_int, default=128, help="input height and width (image models)")
    b.add_argument("--seq-len", type=cli_args.positive_int, help="token ids of (batch, SEQ_LEN) in [0, the vocabulary "
                   "of the model's input embedding), and tokens/s reported (default: the zoo model's length for a "
                   "model of token ids; given for any other model, it makes the input token ids)")
    cli_args.add_threads(b, default=2, help="intra-op threads for every configuration")
    b.add_argument("--spin", action="store_true", help="let idle threads spin-wait between ops, as onnxruntime and "
                   "OpenMP do unless told otherwise, instead of sleeping as pockprop's runtime does "
                   "(OMP_WAIT_POLICY=PASSIVE)")
    b.add_argument("--rounds", type=cli_args.positive_int, default=10, help="interleaved measured rounds")
    b.add_argument("--warmup", type=cli_args.non_negative_int, default=2, help="unmeasured rounds first")
    b.add_argument("--steps", type=cli_args.positive_int, default=3, help="steps per round per configuration "
                                                                          "(median taken)")
    b.add_argument("--configs", nargs="+", help="only these configurations (names or kinds; default: all)")
    b.add_argument("--no-peers", dest="peers", action="store_false", help="skip the onnxruntime-training and ExecuTorch rows")
    b.add_argument("--no-et", dest="et", action="store_false", help="skip the ExecuTorch rows (a full ExecuTorch "
                   "step takes seconds: docs/benchmarks.md)")
    b.add_argument("--peers-python", metavar="PYTHON",
                   help="the interpreter of the onnxruntime-training venv (default: $POCKPROP_PEERS_PYTHON, else "
                        ".venv-peers/bin/python of the current folder, which `make peers` builds)")
    b.add_argument("--et-python", metavar="PYTHON",
                   help="the interpreter of the ExecuTorch venv (default: $POCKPROP_ET_PYTHON, else "
                        ".venv-et/bin/python of the current folder, which `make peers` builds)")
    b.add_argument("--workdir", help="keep compiled artifacts here (default: a temporary directory)")
    b.add_argument("--json", help="write the results here")
    b.add_argument("--png", help="write a bar chart here (needs matplotlib)")
    b.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    b.set_defaults(func=bench_command)


def bench_command(args: argparse.Namespace) -> int:
    from pockprop.bench.harness import print_table, run, write_png

    for flag, path in (("--json", args.json), ("--png", args.png)):
        if path:
            cli_args.check_output_file(path, flag)
    if args.workdir:
        cli_args.check_output_dir(args.workdir, "--workdir")
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))  # noqa: E731
    result = run(args, log=log)
    print_table(result)
    if args.png:
        why = write_png(result, args.png)
        result["png"] = None if why else args.png
        if why:
            result["png_skipped"] = why
            print(f"note: {why}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return EXIT_OK
