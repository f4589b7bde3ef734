"""The model loader (tracing/loader.py): specs, kwargs, seed, weights, and rebuilding from a manifest's `source`."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pockprop.artifact import safetensors
from pockprop.errors import CompileError
from pockprop.models.perceptron import MLP
from pockprop.tracing.loader import ModelSpec, from_source, resolve
from pockprop.ir import module_of

NUM_CLASSES = 10


# --- helpers referenced through "tests.tracing.test_loader:NAME" ---

def tiny_linear(out_features: int = 3) -> nn.Module:
    return nn.Linear(5, out_features)


tiny_linear.default_input_shape = [4, 5]  # a list on purpose: resolve must return a tuple


def tiny_conv() -> nn.Module:
    return nn.Conv2d(3, 4, 3)


def returns_not_a_module() -> int:
    return 42


NOT_CALLABLE = 7
CALLS: list[str] = []


def recorded_call() -> nn.Module:
    CALLS.append("called")
    return nn.Linear(5, 3)


# --- resolve ---

def test_resolve_zoo():
    model, shape = resolve("models:mlp")
    assert isinstance(model, MLP) and shape == (8, 64)
    model, shape = resolve("models:mobilenet_v2", num_classes=NUM_CLASSES, width_mult=0.35)
    assert shape == (8, 3, 128, 128) and model.classifier[1].out_features == NUM_CLASSES


def test_resolve_mlp_shape_follows_in_features():
    model, shape = resolve("models:mlp", in_features=32, num_classes=3)
    assert shape == (8, 32) and model.layers[-1].out_features == 3


def test_resolve_module_function():
    model, shape = resolve("tests.tracing.test_loader:tiny_linear", out_features=6)
    assert isinstance(model, nn.Linear) and model.out_features == 6
    assert shape == (4, 5) and isinstance(shape, tuple)
    model, shape = resolve("tests.tracing.test_loader:tiny_conv")
    assert isinstance(model, nn.Conv2d) and shape is None
    # A submodule path reaches the same builders, with their shape attribute.
    _, shape = resolve("pockprop.models.resnet:resnet18", num_classes=NUM_CLASSES, width=8)
    assert shape == (8, 3, 128, 128)


@pytest.mark.parametrize("spec, message", [
    ("models:vgg16", "known models: bert_base4, llama_small, mcunet, mlp, mobilenet_v2, resnet18, resnet26, resnet50, vit_tiny"),
    ("models:ZOO", "unknown zoo model 'ZOO'"),
    ("mobilenet_v2", "must be 'module:function'"),
    ("a:b:c", "must be 'module:function'"),
    (":mlp", "must be 'module:function'"),
    ("models:", "must be 'module:function'"),
    ("my-pkg:build", "must be 'module:function'"),
    ("no_such_package_pockprop.nets:build", "cannot import module 'no_such_package_pockprop.nets'"),
    ("tests.tracing.test_loader:missing_builder", "has no attribute 'missing_builder'"),
    ("tests.tracing.test_loader:NOT_CALLABLE", "is not callable"),
    ("tests.tracing.test_loader:returns_not_a_module", "returned int, expected a torch.nn.Module"),
    (None, "malformed model spec"),
])
def test_resolve_errors(spec, message):
    with pytest.raises(CompileError) as excinfo:
        resolve(spec)
    assert message in str(excinfo.value)


def test_resolve_names_a_kwarg_the_builder_does_not_take():
    with pytest.raises(CompileError, match="models:mlp: .*unexpected keyword argument 'depth'"):
        resolve("models:mlp", depth=3)


# --- ModelSpec: seed, weights, source ---

def test_build_is_seeded_and_loads_weights(tmp_path: Path):
    a, _ = ModelSpec("models:mlp", {"hidden": [8]}, seed=3).build()
    b, _ = ModelSpec("models:mlp", {"hidden": [8]}, seed=3).build()
    c, _ = ModelSpec("models:mlp", {"hidden": [8]}, seed=4).build()
    assert torch.equal(a.layers[0].weight, b.layers[0].weight) and not torch.equal(a.layers[0].weight, c.layers[0].weight)
    path = tmp_path / "w.safetensors"
    safetensors.save(str(path), {k: v.numpy() for k, v in c.state_dict().items()})
    d, _ = ModelSpec("models:mlp", {"hidden": [8]}, seed=3, weights=str(path)).build()
    assert torch.equal(d.layers[0].weight, c.layers[0].weight)
    src = ModelSpec("models:mlp", {"hidden": [8]}, 3, str(path)).source()
    assert src == {"model": "models:mlp", "kwargs": {"hidden": [8]}, "seed": 3,
                   "weights": {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}


# --- from_source: an artifact's record never chooses code to import ---

def _weights(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "w.safetensors"
    safetensors.save(str(path), {k: v.numpy() for k, v in MLP().state_dict().items()})
    return path, {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_from_source_rebuilds_a_zoo_model_without_flags(tmp_path: Path):
    path, record = _weights(tmp_path)
    spec = from_source({"model": "models:mlp", "kwargs": {"num_classes": 10}, "seed": 2, "weights": record}, "a")
    assert spec == ModelSpec("models:mlp", {"num_classes": 10}, 2, str(path))


@pytest.mark.parametrize("source, named, message", [
    ({"model": "os:system", "kwargs": {"command": "true"}}, None, "cannot make pockprop import code"),
    ({"model": "tests.tracing.test_loader:recorded_call"}, None, "--model tests.tracing.test_loader:recorded_call"),
    ({"model": "os:system"}, "tests.tracing.test_loader:recorded_call", "was compiled from 'os:system'"),
    ({"model": "models:mlp"}, "models:resnet18", "was compiled from 'models:mlp'"),
    ({"model": "models:mlp", "kwargs": [1]}, None, "source.kwargs must be a JSON object"),
    ({"model": "models:mlp", "kwargs": {"x": float("nan")}}, None, "source.kwargs must be a JSON object"),
    ({"model": "models:mlp", "seed": "1"}, None, "source.seed must be a non-negative integer"),
    ({"model": "models:mlp", "seed": -1}, None, "source.seed must be a non-negative integer"),
    ({"model": "models:mlp", "weights": "w.safetensors"}, None, "source.weights must be"),
    ({"model": "models:mlp:x"}, None, "malformed model spec"),
    ({"kwargs": {}}, None, "does not record how to rebuild its model"),
])
def test_from_source_refuses(source: dict, named: str | None, message: str):
    CALLS.clear()
    with pytest.raises(CompileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_source(source, "art", model=named)
    assert CALLS == []


def test_from_source_non_zoo_model_needs_the_user_to_name_it():
    spec = from_source({"model": "tests.tracing.test_loader:recorded_call"}, "art",
                       model="tests.tracing.test_loader:recorded_call")
    assert spec.spec == "tests.tracing.test_loader:recorded_call" and CALLS == []  # nothing built yet


def test_from_source_weights_must_have_the_recorded_sha256(tmp_path: Path):
    path, record = _weights(tmp_path)
    moved = tmp_path / "moved.safetensors"
    path.rename(moved)
    with pytest.raises(CompileError, match="no longer exists; pass --weights FILE"):
        from_source({"model": "models:mlp", "weights": record}, "art")
    assert from_source({"model": "models:mlp", "weights": record}, "art", weights=str(moved)).weights == str(moved)
    other = tmp_path / "other.safetensors"
    safetensors.save(str(other), {"x": np.zeros(2, np.float32)})
    with pytest.raises(CompileError, match="not the file the artifact was compiled from"):
        from_source({"model": "models:mlp", "weights": record}, "art", weights=str(other))
    moved.write_bytes(moved.read_bytes() + b" ")  # edited in place
    with pytest.raises(CompileError, match="sha256 differs"):
        from_source({"model": "models:mlp", "weights": {**record, "path": str(moved)}}, "art")
    with pytest.raises(CompileError, match="compiled without --weights"):
        from_source({"model": "models:mlp"}, "art", weights=str(other))


def test_module_of():
    assert module_of("layer1.0.conv1.weight") == "layer1.0.conv1"
    assert module_of("weight") == ""  # a parameter of the top-level module
