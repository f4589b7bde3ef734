"""`pockprop search`: the command-line face of pockprop.search (parser in pockprop/cli.py).

MODEL_OR_ARTIFACT is a model spec (as for `pockprop compile`: --num-classes, --model-kwargs, --weights,
--seed, --input-shape, --preprocess) or an artifact compiled by `pockprop compile`, whose manifest
records how to rebuild the model (`source`: spec, kwargs, seed, weights file), its input shape and its
preprocessing; its trained parameters (or a checkpoint's, with --checkpoint-dir) replace the rebuilt
model's. --data is read with runtime.data and preprocessed by runtime.data.Pipeline, as on the device.

Exit codes: 0 ok, 2 bad input (model, artifact, data, budget, outputs), 1 internal error.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

import numpy as np

from pockprop.runtime import data as rdata
from pockprop.artifact.durable import write_atomic
from pockprop.errors import ArtifactError, DataError
from pockprop.artifact.contract import LABELS, TensorSpec

from pockprop.errors import CompileError
from pockprop.search.options import SearchError

EXIT_OK, EXIT_BAD_INPUT = 0, 2
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30}


def parse_bytes(text: str, what: str = "--budget-memory") -> int:
    """'2MB' -> 2097152 (KB/MB/GB are binary: 1024-based, like the reports), '1.5 GB', '300000' (bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise SearchError(f"{what} {text!r}: expected a size like 2MB, 512KB, 1.5GB or a number of bytes")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not value >= 1:
        raise SearchError(f"{what} {text!r}: must be at least one byte")
    return int(value)


def _from_artifact(args: argparse.Namespace) -> tuple[Any, tuple[int, ...], dict[str, Any], dict[str, Any], Any]:
    """(model, input shape, preprocess, optimizer defaults, pipeline) rebuilt from an artifact's manifest."""
    import torch

    from pockprop.runtime.trainer import Trainer

    from pockprop.compiler.cli import build_model

    trainer = Trainer.load(args.model, threads=args.threads)
    if args.checkpoint_dir:
        trainer.resume(args.checkpoint_dir)
    m = trainer.manifest
    src = m.source
    if not isinstance(src, dict) or not isinstance(src.get("model"), str):
        raise SearchError(f"{args.model}: the artifact does not record how to rebuild its model (manifest 'source'; "
                          "artifacts compiled from Python or before pockprop recorded it); pass the model instead, "
                          "e.g. pockprop search models:NAME --weights W.safetensors --data ...")
    weights = (src.get("weights") or {}).get("path")
    if weights and not os.path.isfile(weights):
        raise SearchError(f"{args.model}: its model was compiled from --weights {weights}, which no longer exists")
    model, _ = build_model(src["model"], dict(src.get("kwargs") or {}), int(src.get("seed", 0)), weights)
    state = model.state_dict()
    for name, value in trainer.full_parameters().items():
        if name not in state or tuple(state[name].shape) != value.shape:
            raise SearchError(f"{args.model}: trained parameter {name!r} does not fit the rebuilt model {src['model']}")
        state[name] = torch.from_numpy(np.array(value))
    model.load_state_dict(state)
    opt = dict(m.optimizer or {})
    return model, m.input.shape, dict(m.input.preprocess or {}), opt, trainer.pipeline


def _from_spec(args: argparse.Namespace, batch: int) -> tuple[Any, tuple[int, ...], dict[str, Any], dict[str, Any], Any]:
    from pockprop.compiler.cli import _shape, build_model, model_kwargs
    from pockprop.compiler.preprocess import resolve as resolve_preprocess

    model, default_shape = build_model(args.model, model_kwargs(args), args.seed, args.weights)
    shape = _shape(args.input_shape) if args.input_shape else default_shape
    if shape is None:
        raise SearchError(f"{args.model} has no default input shape; pass --input-shape")
    pre = resolve_preprocess(args.preprocess, shape, args.model)  # as `pockprop compile` records it
    spec = TensorSpec("input", (batch, *shape[1:]), "float32", pre)
    pipeline = rdata.Pipeline(spec, TensorSpec(LABELS, (batch,), "int64"), getattr(model, "num_classes", None))
    return model, tuple(shape), pre, {}, pipeline


def _load_data(args: argparse.Namespace, pipeline: Any) -> Any:
    from pockprop.search import SearchData

    ds = pipeline.load(args.data, args.label_column)
    if ds.y is None:
        raise DataError(f"{args.data}: no labels (an .npz needs an array 'y')")
    x = np.concatenate([pipeline.inputs(ds.x[i:i + 512], ds.source) for i in range(0, len(ds), 512)])
    return SearchData.split(x, pipeline.labels(ds.y, ds.source), args.val_fraction, args.seed)


def _write(path: str, text: str) -> None:
    try:
        write_atomic(path, text.encode())
    except OSError as ex:
        raise SearchError(str(ex)) from None


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


def search_command(args: argparse.Namespace) -> int:
    from pockprop.search import FinetuneConfig, drift_probe, search

    try:
        if not args.drift and not args.budget_memory:
            raise SearchError("--budget-memory is required (e.g. --budget-memory 2MB), unless --drift")
        budget = parse_bytes(args.budget_memory) if args.budget_memory else None
        if args.val_fraction is not None and not 0.0 < args.val_fraction < 1.0:
            raise SearchError(f"--val-fraction {args.val_fraction}: must be in (0, 1)")
        if not os.path.exists(args.data):
            raise DataError(f"--data {args.data}: no such file or folder")
        is_artifact = os.path.exists(args.model) and ":" not in os.path.basename(args.model)
        if is_artifact:
            model, shape, pre, opt, pipeline = _from_artifact(args)
        else:
            if args.checkpoint_dir:
                raise SearchError("--checkpoint-dir applies to an artifact, not a model spec")
            model, shape, pre, opt, pipeline = _from_spec(args, args.batch or 32)
        batch = args.batch or (int(shape[0]) if is_artifact else 32)
        optimizer = {"name": args.optimizer or opt.get("name", "sgd")}
        optimizer["lr"] = args.lr if args.lr is not None else float(opt.get("lr", 0.01))
        if optimizer["name"] == "sgd":
            optimizer["momentum"] = args.momentum if args.momentum is not None else float(opt.get("momentum", 0.9))
        config = FinetuneConfig(batch=batch, epochs=args.epochs, steps=args.steps, optimizer=optimizer,
                                seed=args.seed, threads=args.threads, repeats=args.repeats)
        data = _load_data(args, pipeline)
        progress = not args.no_progress
        print(f"pockprop search: {args.model}: {len(data.y_train)} training / {len(data.y_val)} validation samples, "
              f"input {list(shape[1:])}, batch {batch}", file=sys.stderr)
        if args.drift:
            import torch

            from pockprop.compiler.compile import trace_model

            tm = trace_model(model, (torch.zeros((batch, *shape[1:])),))
            drift = drift_probe(model, shape, data, config=config, progress=progress, cache_dir=args.cache,
                                preprocess=pre, traced=tm, metric=args.metric)
            print(drift.table())
            if args.json:
                _write(args.json, json.dumps(drift.to_json(), indent=1) + "\n")
            if args.output:
                _write(args.output, _preset_yaml(tm.layers, drift.scheme))
                print(f"wrote {args.output}")
            return EXIT_OK
        result = search(model, shape, data, budget_memory=budget, budget_ms=args.budget_ms, ratios=args.ratios,  # type: ignore[arg-type]
                        config=config, cache_dir=args.cache, progress=progress, preprocess=pre,
                        candidates=args.candidates, max_layers=args.max_layers, metric=args.metric,
                        memory=args.memory, name=None, budget_params=parse_params(args.budget_params))
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
            except RuntimeError as ex:
                raise SearchError(f"--plot: {ex}") from None
            print(f"wrote {args.plot}")
    except (CompileError, DataError, ArtifactError) as ex:
        print(f"pockprop search: error: {ex}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


def _preset_yaml(layers: Any, preset: str) -> str:
    """A preset resolved against the model's layers as explicit rules (what --drift chose), as YAML."""
    import yaml

    from pockprop.compiler.scheme import Scheme, _preset_rules
    from pockprop.search.options import scheme_dict

    rules = tuple(dict.fromkeys(_preset_rules(preset, layers)))  # the head can be in the rear block too
    return f"# pockprop search --drift: {preset}\n" + yaml.safe_dump(scheme_dict(Scheme(preset, rules)), sort_keys=False)
