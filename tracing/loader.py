"""The model loader: the one place a model spec becomes a torch module (for compile, search, bench, experiments).

A spec is `models:NAME`, looked up in the zoo table (pockprop.models.ZOO) and nowhere else, or
`package.module:function`, whose module is imported and whose function is called: only ever because the
user wrote it (command line or Python). `ModelSpec` adds the builder's kwargs, the torch seed of the initial
weights and a safetensors state_dict (--weights); `build()` returns (model, default input shape).

An artifact records its spec in the manifest (`source`, written from `ModelSpec.source()`). An artifact
is data: `from_source` turns that record back into a spec without letting the file choose code to
import. A zoo name is rebuilt as is; any other spec must be the one the user names (--model); the
kwargs must be JSON values and the weights file must still have the recorded sha256.

Stdlib only at import time; torch loads inside `build()`.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pockprop.errors import CompileError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

ZOO_PREFIX = "models"
INPUT_DTYPES = ("float32", "int64")  # a builder's default_input_dtype: features or pixels, or token ids
Shape = tuple[int, ...]


def parse(spec: Any) -> tuple[str, str]:
    """'package.module:function' -> its two halves; CompileError when malformed."""
    parts = spec.split(":") if isinstance(spec, str) else []
    if (len(parts) != 2 or not all(p.isidentifier() for p in parts[0].split(".")) or not parts[1].isidentifier()):
        raise CompileError(f"malformed model spec {spec!r}: must be 'module:function' "
                           "(e.g. 'models:mobilenet_v2' or 'mypkg.nets:build')")
    return parts[0], parts[1]


def is_zoo(spec: str) -> bool:
    return parse(spec)[0] == ZOO_PREFIX


def _default_shape(shape: Any, where: str) -> Shape | None:
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise CompileError(f"{where}.default_input_shape must be a sequence of ints, got {shape!r}") from None


def _builder(spec: str) -> tuple[Any, Shape | None]:
    """The builder a spec names and its default input shape (a zoo entry's, or the function's attribute)."""
    module_name, func_name = parse(spec)
    if module_name == ZOO_PREFIX:
        from pockprop import models

        zoo = models.ZOO
        if func_name not in zoo:
            raise CompileError(f"unknown zoo model {func_name!r} in spec {spec!r}; known models: {', '.join(sorted(zoo))}")
        return zoo[func_name].builder, zoo[func_name].input_shape
    try:
        module = importlib.import_module(module_name)
    except ImportError as ex:
        raise CompileError(f"cannot import module {module_name!r} for spec {spec!r}: {ex}") from None
    if not hasattr(module, func_name):
        raise CompileError(f"module {module_name!r} has no attribute {func_name!r} (spec {spec!r})")
    builder = getattr(module, func_name)
    if not callable(builder):
        raise CompileError(f"{spec!r} is not callable: got {type(builder).__name__}")
    return builder, _default_shape(getattr(builder, "default_input_shape", None), spec)


def resolve(spec: str, **kwargs: Any) -> tuple["nn.Module", Shape | None]:
    """Build the model `spec` names with `kwargs`; return it with its default input shape (batch first).

    When the default shape is (batch, features) and the model reports an integer `in_features` (the zoo's
    MLP, a bare nn.Linear), the features come from the model: resolve("models:mlp", in_features=32) has
    shape (8, 32), not a stale (8, 64).
    """
    builder, shape = _builder(spec)
    from torch import nn

    try:
        model = builder(**kwargs)
    except TypeError as ex:  # a kwarg the builder does not take
        raise CompileError(f"{spec}: {ex}") from None
    if not isinstance(model, nn.Module):
        raise CompileError(f"{spec!r} returned {type(model).__name__}, expected a torch.nn.Module")
    in_features = getattr(model, "in_features", None)
    if shape is not None and len(shape) == 2 and isinstance(in_features, int):
        shape = (shape[0], in_features)
    return model, shape


def load_weights(model: "nn.Module", path: str) -> None:
    """Load a safetensors state_dict into `model`; CompileError naming missing, extra or mis-shaped keys."""
    import torch

    from pockprop.artifact import safetensors

    try:
        tensors, _ = safetensors.load(path)
    except FileNotFoundError:
        raise CompileError(f"--weights {path}: no such file") from None
    except (OSError, ValueError) as ex:
        raise CompileError(f"--weights {path}: cannot read as safetensors ({ex})") from None
    own = model.state_dict()
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
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()})


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelSpec:
    """Everything that builds one model: the spec, the builder's kwargs, the torch seed, a weights file."""

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    weights: str | None = None

    def build(self) -> tuple["nn.Module", Shape | None]:
        """(model, default input shape): built under the seed, the weights loaded; CompileError if it fails."""
        import torch

        torch.manual_seed(self.seed)
        model, shape = resolve(self.spec, **self.kwargs)
        if self.weights:
            load_weights(model, self.weights)
        return model, shape

    def input_dtype(self) -> str:
        """The dtype of the model's input: its builder's `default_input_dtype` ("int64": token ids), else
        "float32"."""
        dtype = getattr(_builder(self.spec)[0], "default_input_dtype", "float32")
        if dtype not in INPUT_DTYPES:
            raise CompileError(f"{self.spec}.default_input_dtype must be one of {', '.join(INPUT_DTYPES)}, got {dtype!r}")
        return dtype

    def source(self) -> dict[str, Any]:
        """What an artifact's manifest records to rebuild the model (`source`; read back by from_source)."""
        src: dict[str, Any] = {"model": self.spec, "kwargs": self.kwargs, "seed": self.seed}
        if self.weights:
            src["weights"] = {"path": os.path.abspath(self.weights), "sha256": sha256_file(self.weights)}
        return src


def spec_of(args: argparse.Namespace) -> ModelSpec:
    """The ModelSpec of the options pockprop.args.add_model_spec defines (--num-classes joins the kwargs)."""
    kwargs = dict(args.model_kwargs or {})
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    return ModelSpec(args.model, kwargs, args.seed, args.weights)


def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def from_source(source: Any, where: str, model: str | None = None, weights: str | None = None) -> ModelSpec:
    """The spec an artifact's manifest `source` records, checked so that the file cannot choose code to run.

    `model` is the spec the user named (--model): required, and equal to the record, unless the record is
    a zoo name. `weights` (--weights) replaces the recorded path; either way the file must have the
    recorded sha256. CompileError says what does not match.
    """
    if not isinstance(source, dict) or not isinstance(source.get("model"), str):
        raise CompileError(f"{where}: the artifact does not record how to rebuild its model (manifest 'source'; "
                           "artifacts compiled from Python or before pockprop recorded it); pass the model instead, "
                           "e.g. pockprop search models:NAME --weights W.safetensors --data ...")
    recorded = source["model"]
    parse(recorded)
    if model is not None and model != recorded:
        raise CompileError(f"--model {model}: the artifact {where} was compiled from {recorded!r}")
    if model is None and not is_zoo(recorded):
        raise CompileError(f"{where}: its model was built by {recorded!r}; an artifact cannot make pockprop import "
                           f"code, so name it yourself if you trust it: --model {recorded}")
    kwargs, seed = source.get("kwargs", {}), source.get("seed", 0)
    if not isinstance(kwargs, dict) or not _is_json(kwargs):
        raise CompileError(f"{where}: manifest source.kwargs must be a JSON object of plain values, got {kwargs!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise CompileError(f"{where}: manifest source.seed must be a non-negative integer, got {seed!r}")
    return ModelSpec(recorded, kwargs, seed, _checked_weights(source.get("weights"), where, weights))


def _checked_weights(record: Any, where: str, given: str | None) -> str | None:
    if record is None:
        if given:
            raise CompileError(f"--weights {given}: the artifact {where} was compiled without --weights")
        return None
    if not (isinstance(record, dict) and isinstance(record.get("path"), str) and isinstance(record.get("sha256"), str)):
        raise CompileError(f"{where}: manifest source.weights must be {{'path': ..., 'sha256': ...}}, got {record!r}")
    path = given or record["path"]
    hint = f"pass --weights FILE (the file with sha256 {record['sha256']})"
    if not os.path.isfile(path):
        raise CompileError(f"{where}: its model was compiled from --weights {path}, which no longer exists; {hint}")
    if sha256_file(path) != record["sha256"]:
        raise CompileError(f"{where}: --weights {path} is not the file the artifact was compiled from "
                           f"(its sha256 differs); {hint}")
    return path
