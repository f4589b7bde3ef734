"""`pockprop search`: its parser (`add_parser`) and run function; torch loads inside `search_command` only.

MODEL_OR_ARTIFACT is a model spec (as for `pockprop compile`: --num-classes, --model-kwargs, --weights,
--seed, --input-shape or one --input NAME:DTYPE:SHAPE, --preprocess) or an artifact compiled by `pockprop
compile`. Search handles a model with one data input of any dtype (token ids stay int64; models with several
inputs are refused) and one class label per sample. An artifact's manifest
records how its model was built (`source`: spec, kwargs, seed, weights file), its input shape and its
preprocessing; tracing.loader.from_source rebuilds it without letting the file choose code to import (a
zoo model is rebuilt as recorded, any other needs --model naming the same spec), and its trained
parameters (or a checkpoint's, with --checkpoint-dir) replace the rebuilt model's. --data is read with
runtime.data and preprocessed by runtime.data.Pipeline, as on the device.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from typing import Any

from pockprop import args as cli_args
from pockprop.compiler.cli import input_decl  # torch-free
from pockprop.compiler.preprocess import HELP as PREPROCESS_HELP  # torch-free
from pockprop.errors import EXIT_OK, DataError, UsageError
from pockprop.search.options import SearchError, parse_ratios

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30}
_SPEC_ONLY = {"num_classes": "--num-classes", "model_kwargs": "--model-kwargs", "input_shape": "--input-shape",
              "preprocess": "--preprocess", "inputs": "--input"}  # an artifact records its own


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("search", help="choose a sparse update scheme under a memory budget by probing fine-tuning runs "
                                      "(needs the [compile] extra)",
                       description="Contribution analysis: fine-tune each candidate layer's bias and weight slices "
                                   "briefly through the device runtime, measure the validation gain over the "
                                   "classifier-only baseline, cost each option from the compile report, probe the "
                                   "best third again for longer at several learning rates, pick the best set under "
                                   "the budget (exact knapsack) and a greedy set measured together; then fine-tune "
                                   "every candidate that fits (each preset, those sets) with the recipe at each "
                                   "learning rate and return the best on validation. --drift instead probes "
                                   "tbft-front/middle/rear. See docs/search.md.")
    cli_args.add_model_spec(
        s, metavar="MODEL_OR_ARTIFACT", input_shape="the zoo model's; model only",
        help="models:NAME or package.module:function (as for compile), or an artifact directory / packed file "
             "compiled by `pockprop compile` (its model, weights and preprocessing are reused)",
        weights_help="; with an artifact: where the file it was compiled from is now (same sha256)",
        seed_help="seed of the model's initial weights (model only, without --weights), the validation split and "
                  "the probes' data order")
    s.add_argument("--model", dest="named_model", metavar="SPEC",
                   help="artifact only: the package.module:function its model was compiled from, when it is not a "
                        "zoo model (an artifact never makes pockprop import code by itself); must equal the "
                        "manifest's source")
    s.add_argument("--input", dest="inputs", action="append", type=input_decl, metavar="NAME:DTYPE:SHAPE",
                   help="model only: its one data input, passed to forward as keyword NAME, e.g. "
                        "input_ids:int64:32,128 (instead of --input-shape, which declares one float32 input; "
                        "models with several inputs cannot be searched yet)")
    s.add_argument("--data", required=True, help=".npz (x, y), .csv or a folder of class folders: raw training data, "
                                                 "preprocessed like the runtime does; a part is held out for validation")
    s.add_argument("--budget-memory", help="training-memory budget, e.g. 2MB, 512KB, 1.5GB or bytes "
                                           "(KB = 1024 bytes); required unless --drift")
    s.add_argument("--memory", default="training", choices=["training", "peak"],
                   help="what the budget bounds: training memory (trainable + gradient + optimizer state + kept "
                        "activations) or the planner's estimated peak")
    s.add_argument("--budget-ms", type=cli_args.number(0, lo_open=True),
                   help="also bound the measured milliseconds per training step")
    s.add_argument("--budget-params", help="also bound the trainable parameters: a count (50000) or a percentage of "
                                           "the model's parameters (10%%); not with --budget-ms")
    s.add_argument("--ratios", default="1/8,1/4,1/2,1", help="weight channel ratios to probe")
    s.add_argument("--candidates", help="comma-separated layer patterns to consider (default: every conv/linear/BN "
                                        "layer but the head)")
    s.add_argument("--max-layers", type=cli_args.positive_int, help="consider only the last N candidate layers")
    s.add_argument("--metric", default="accuracy", choices=["accuracy", "loss"],
                   help="gain measure (accuracy: validation loss breaks ties)")
    s.add_argument("--checkpoint-dir", help="artifact only: start from this checkpoint's trained weights")
    s.add_argument("--preprocess", metavar="PRESET_OR_JSON",
                   help=f"model only (an artifact's recorded preprocessing is used as is): {PREPROCESS_HELP}")
    s.add_argument("--label-column", help="CSV: the label column")
    s.add_argument("--val-fraction", type=cli_args.fraction, default=0.2,
                   help="stratified share of --data held out for validation")
    s.add_argument("--batch", type=cli_args.positive_int, help="probe batch size (default: an artifact's, else 32)")
    s.add_argument("--epochs", type=cli_args.number(0, lo_open=True), default=2.0, help="fine-tuning epochs per probe")
    s.add_argument("--steps", type=cli_args.positive_int, help="fine-tuning steps per probe (instead of --epochs)")
    s.add_argument("--repeats", type=cli_args.positive_int, default=1,
                   help="average each probe over this many data orders")
    s.add_argument("--final-epochs", type=cli_args.number(0, lo_open=True),
                   help="the recipe of the longer runs (refined options, greedy selection, final candidates, --drift): "
                        "this many epochs, cosine from the learning rate to 0 (default: 5 x --epochs)")
    s.add_argument("--lrs", type=cli_args.numbers(lo=0, lo_open=True),
                   help="learning rates the longer runs try, each candidate keeping its best on validation, e.g. "
                        "0.003,0.01,0.03 (default: --lr / 3, --lr, 3 x --lr)")
    s.add_argument("--batchnorm", choices=["frozen", "train", "both"], default="both",
                   help="the candidates' batch norm: frozen statistics, train mode (batch statistics, running "
                        "statistics updated), or both, each candidate in each mode (default: both; frozen alone "
                        "halves the final runs; a model without batch norm has one mode)")
    s.add_argument("--budget-time", type=cli_args.number(0, lo_open=True), metavar="SECONDS",
                   help="start no new probe once the probes have spent this many device-seconds fine-tuning")
    s.add_argument("--no-validate", action="store_true",
                   help="return the knapsack's selection of the screen probes, without the longer runs")
    s.add_argument("--optimizer", choices=["sgd", "adamw"], help="probe optimizer (default: an artifact's, else sgd)")
    s.add_argument("--lr", type=cli_args.learning_rate, help="probe learning rate (default: an artifact's, else 0.01)")
    s.add_argument("--momentum", type=cli_args.momentum, help="sgd momentum (default: 0.9)")
    s.add_argument("--cache", help="probe cache directory: a re-run skips finished probes, an interrupted one resumes")
    s.add_argument("-o", "--output", help="write the chosen scheme as YAML here (for pockprop compile --scheme)")
    s.add_argument("--plot", help="write a PNG of gain vs memory here (needs matplotlib)")
    s.add_argument("--json", help="write every probe, cost and the choice as JSON here")
    s.add_argument("--drift", action="store_true", help="TBFT: probe tbft-front/middle/rear and choose the block, "
                                                        "with an energy estimate per scheme")
    cli_args.add_threads(s)
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=search_command)


def parse_bytes(text: str, what: str = "--budget-memory") -> int:
    """'2MB' -> 2097152 (KB/MB/GB are binary: 1024-based, like the reports), '1.5 GB', '300000' (bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise SearchError(f"{what} {text!r}: expected a size like 2MB, 512KB, 1.5GB or a number of bytes")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not (math.isfinite(value) and value >= 1):
        raise SearchError(f"{what} {text!r}: must be a finite size of at least one byte")
    return int(value)


def parse_params(text: str | None) -> float | None:
    """--budget-params: '10%' -> 0.1 (a fraction of the model's parameters), '50000' -> 50000.0, None -> None."""
    if text is None:
        return None
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(int(t.replace(",", "").replace("_", "")))
    except ValueError:
        raise SearchError(f"--budget-params {text!r}: write a count like 50000 or a percentage like 10%") from None
    if not value > 0 or (t.endswith("%") and value > 1):
        raise SearchError(f"--budget-params {text!r}: must be a positive count or a percentage in (0, 100]")
    return value


def _check(args: argparse.Namespace, is_artifact: bool) -> None:
    """Every option checked before the model is built or the data read."""
    if args.preprocess is not None:
        from pockprop.compiler.preprocess import parse as parse_preprocess

        parse_preprocess(args.preprocess)
    if not args.drift and not args.budget_memory:
        raise SearchError("--budget-memory is required (e.g. --budget-memory 2MB), unless --drift")
    if args.budget_memory:
        parse_bytes(args.budget_memory)
    parse_params(args.budget_params)
    parse_ratios(args.ratios)
    if not os.path.exists(args.data):
        raise DataError(f"--data {args.data}: no such file or folder")
    if args.inputs:
        _one_input([name for name, _, _ in args.inputs], "--input")
        if args.input_shape:
            raise SearchError("give either --input or --input-shape, not both")
    if is_artifact:
        given = [flag for k, flag in _SPEC_ONLY.items() if getattr(args, k) is not None]
        if given:
            raise SearchError(f"{' '.join(given)}: apply to a model spec; the artifact {args.model} records its own")
    else:
        for flag, value in (("--checkpoint-dir", args.checkpoint_dir), ("--model", args.named_model)):
            if value is not None:
                raise SearchError(f"{flag} applies to an artifact, not a model spec ({args.model})")
    for flag, path in (("-o", args.output), ("--json", args.json), ("--plot", args.plot)):
        if path:
            cli_args.check_output_file(path, flag)
    if args.cache:
        cli_args.check_output_dir(args.cache, "--cache")


def _one_input(names: list[str], where: str) -> None:
    """SearchError unless there is exactly one data input: the probes' data split, batches and tracing hold one
    array."""
    if len(names) != 1:
        raise SearchError(f"{where} declares {len(names)} data inputs ({', '.join(names)}); pockprop search supports "
                          "models with one data input only")


def _from_artifact(args: argparse.Namespace) -> tuple[Any, tuple[int, ...], dict[str, Any], dict[str, Any], Any]:
    """(model, input shape, preprocess, optimizer defaults, pipeline) rebuilt from an artifact's manifest."""
    import numpy as np
    import torch

    from pockprop.runtime.trainer import Trainer
    from pockprop.tracing.loader import from_source

    trainer = Trainer.load(args.model, threads=args.threads)
    if args.checkpoint_dir:
        trainer.resume(args.checkpoint_dir)
    m = trainer.manifest
    _one_input([d.name for d in m.data], f"{args.model}'s manifest")
    spec = from_source(m.source, args.model, model=args.named_model, weights=args.weights)
    model, _ = spec.build()
    state = model.state_dict()
    for name, value in trainer.full_parameters().items():
        if name not in state or tuple(state[name].shape) != value.shape:
            raise SearchError(f"{args.model}: trained parameter {name!r} does not fit the rebuilt model {spec.spec}")
        state[name] = torch.from_numpy(np.array(value))
    model.load_state_dict(state)
    return model, m.input.shape, dict(m.input.preprocess or {}), dict(m.optimizer or {}), trainer.pipeline


def _from_spec(args: argparse.Namespace, batch: int) -> tuple[Any, tuple[int, ...], dict[str, Any], Any, Any]:
    """(model, input shape, preprocess, its trace, pipeline): the model built and traced as `pockprop compile`
    would (a named --input goes in as that keyword), the pipeline with the input's name, dtype and index range."""
    from pockprop.artifact.contract import LABELS, TensorSpec
    from pockprop.compiler.compile import trace_model
    from pockprop.compiler.preprocess import resolve as resolve_preprocess
    from pockprop.compiler.signature import index_ranges
    from pockprop.runtime import data as rdata
    from pockprop.search.select import zeros_input
    from pockprop.tracing.loader import spec_of

    model, default_shape = spec_of(args).build()
    name, dtype, shape = args.inputs[0] if args.inputs else ("input", "float32", args.input_shape or default_shape)
    if shape is None:
        raise SearchError(f"{args.model} has no default input shape; pass --input-shape or --input")
    # as `pockprop compile` records it: a float input is preprocessed, any other only when asked (and refused)
    pre = resolve_preprocess(args.preprocess, shape, args.model) if dtype.startswith("float") or args.preprocess else {}
    example = zeros_input(batch, shape[1:], dtype)
    tm = trace_model(model, {name: example} if args.inputs else (example,))
    index = index_ranges(tm.traced.graph, tm.traced.user_inputs)
    spec = TensorSpec(name, (batch, *shape[1:]), dtype, pre, next(iter(index.values()), None))
    pipeline = rdata.Pipeline(spec, TensorSpec(LABELS, (batch,), "int64"), getattr(model, "num_classes", None))
    return model, tuple(shape), pre, tm, pipeline


def _load_data(args: argparse.Namespace, pipeline: Any) -> Any:
    import numpy as np

    from pockprop.search import SearchData
    from pockprop.search.contribution import LABELS_PER_SAMPLE

    ds = pipeline.load(args.data, args.label_column)
    if ds.y is None:
        raise DataError(f"{args.data}: no labels (an .npz needs an array 'y')")
    if ds.y.ndim != 1:
        raise SearchError(f"{args.data}: {LABELS_PER_SAMPLE.format(shape=list(ds.y.shape[1:]))}")
    x = np.concatenate([pipeline.inputs(ds.x[i:i + 512], ds.source) for i in range(0, len(ds), 512)])
    return SearchData.split(x, pipeline.labels(ds.y, ds.source), args.val_fraction, args.seed)


def _write(path: str, text: str) -> None:
    from pockprop.artifact.durable import write_atomic

    write_atomic(path, text.encode())


def search_command(args: argparse.Namespace) -> int:
    from pockprop.search import FinetuneConfig, drift_probe, search

    is_artifact = os.path.exists(args.model) and ":" not in os.path.basename(args.model)
    _check(args, is_artifact)
    tm = None
    if is_artifact:
        model, shape, pre, opt, pipeline = _from_artifact(args)
    else:
        (model, shape, pre, tm, pipeline), opt = _from_spec(args, args.batch or 32), {}
    batch = args.batch or (int(shape[0]) if is_artifact else 32)
    optimizer = {"name": args.optimizer or opt.get("name", "sgd")}
    optimizer["lr"] = args.lr if args.lr is not None else float(opt.get("lr", 0.01))
    if optimizer["name"] == "sgd":
        optimizer["momentum"] = args.momentum if args.momentum is not None else float(opt.get("momentum", 0.9))
    config = FinetuneConfig(batch=batch, epochs=args.epochs, steps=args.steps, optimizer=optimizer,
                            seed=args.seed, threads=args.threads, repeats=args.repeats)
    recipe = None  # the search's default: 5 x the probes' length
    if args.final_epochs is not None:
        recipe = dataclasses.replace(config, epochs=args.final_epochs, steps=None, schedule="cosine")
    longer = dict(recipe=recipe, lrs=args.lrs, batchnorm=args.batchnorm, budget_time=args.budget_time)
    data = _load_data(args, pipeline)
    progress = not args.no_progress
    print(f"pockprop search: {args.model}: {len(data.y_train)} training / {len(data.y_val)} validation samples, "
          f"input {list(shape[1:])}, batch {batch}", file=sys.stderr)
    if tm is None:  # an artifact's model: its one input, positionally, in the manifest's dtype
        from pockprop.compiler.compile import trace_model
        from pockprop.search.select import zeros_input

        tm = trace_model(model, (zeros_input(batch, shape[1:], pipeline.dtype),))
    if args.drift:
        drift = drift_probe(model, shape, data, config=config, progress=progress, cache_dir=args.cache,
                            preprocess=pre, traced=tm, metric=args.metric, **longer)
        print(drift.table())
        if args.json:
            _write(args.json, json.dumps(drift.to_json(), indent=1) + "\n")
        if args.output:
            _write(args.output, _preset_yaml(tm.layers, drift.scheme, drift.batchnorm))
            print(f"wrote {args.output}")
        return EXIT_OK
    result = search(model, shape, data, budget_memory=parse_bytes(args.budget_memory), budget_ms=args.budget_ms,
                    ratios=args.ratios, config=config, cache_dir=args.cache, progress=progress, preprocess=pre,
                    candidates=args.candidates, max_layers=args.max_layers, metric=args.metric,
                    memory=args.memory, name=None, budget_params=parse_params(args.budget_params), traced=tm,
                    validate=not args.no_validate, **longer)
    result.model = args.model
    print(result.table())
    if args.output:
        _write(args.output, result.yaml())
        print(f"wrote {args.output} (pockprop compile {args.model} --scheme {args.output} ...)")
    if args.json:
        _write(args.json, json.dumps(result.to_json(), indent=1) + "\n")
    if args.plot:
        try:
            result.plot(args.plot)
        except UsageError as ex:  # matplotlib missing
            raise SearchError(f"--plot: {ex}") from None
        print(f"wrote {args.plot}")
    return EXIT_OK


def _preset_yaml(layers: Any, preset: str, batchnorm: str = "frozen") -> str:
    """A preset resolved against the model's layers as explicit rules (what --drift chose), as YAML."""
    import yaml

    from pockprop.compiler.scheme import preset_scheme
    from pockprop.search.options import scheme_dict

    scheme = preset_scheme(preset, layers, batchnorm)  # the head can be in the rear block too: ruled once
    return f"# pockprop search --drift: {preset}\n" + yaml.safe_dump(scheme_dict(scheme), sort_keys=False)
