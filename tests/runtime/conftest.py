"""Shared fixtures: tiny artifacts compiled once per test session, copied per test."""
from __future__ import annotations

import inspect
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

BLOCKER = """
import sys
class _Block:
    # A meta-path finder that makes the compile-side packages unimportable, as on a device.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "onnx", "yaml"}:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, _Block())
"""


def _build(name: str, out: Path) -> Path:
    import torch

    from pockprop.compiler.compile import compile

    torch.manual_seed(0)
    if name == "mlp":  # SGD + momentum, last layer trainable
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        art = compile(model, (torch.randn(4, 6),), labels=torch.tensor([0, 1, 2, 0]), loss="cross_entropy",
                      optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}, trainable=["2.*"], name="mlp")
    elif name == "mlp_adamw":  # every parameter, AdamW (adds the optimizer.step state scalar)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        art = compile(model, (torch.randn(4, 6),), optimizer={"name": "adamw", "lr": 1e-2}, name="mlp_adamw")
    elif name == "cnn":  # images with manifest preprocessing
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
                                    torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
        art = compile(model, (torch.randn(4, 3, 8, 8),), optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
                      trainable=["2.*", "5.*"], name="cnn",
                      preprocess={"resize": [8, 8], "scale": 1 / 255, "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]})
    elif name == "sliced":  # a weight trained on a slice of its input channels (compiler schemes)
        if "scheme" not in inspect.signature(compile).parameters:
            pytest.skip("this compiler has no update schemes (sliced tensors)")
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, 3))
        art = compile(model, (torch.randn(4, 6),), optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}, name="sliced",
                      scheme={"rules": [{"match": "2", "update": "weight", "ratio": 0.5, "bias": True},
                                        {"match": "4", "update": "full"}]})
    elif name == "tagger":  # token ids + attention mask (int64, keyword inputs), per-token labels with -100
        from tests.compiler.token_models import padded_batch, tagger

        ids, mask, y = padded_batch(0)
        art = compile(tagger(), {"ids": ids, "mask": mask}, labels=y, optimizer={"name": "sgd", "lr": 0.2},
                      name="tagger")
    elif name == "token_lm":  # next-token logits over a vocabulary of 32, 8 tokens per sequence (runtime.text)
        from tests.compiler.token_models import tagger

        ids, mask = torch.ones(4, 8, dtype=torch.int64), torch.ones(4, 8, dtype=torch.int64)
        art = compile(tagger(vocab=32, dim=16, classes=32), {"ids": ids, "mask": mask},
                      optimizer={"name": "adamw", "lr": 3e-2}, name="token_lm")
    elif name == "tags":  # multi-label: 3 labels, BCE with a per-label pos_weight
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        art = compile(model, (torch.randn(4, 6),), labels=torch.zeros(4, 3), loss="bce_with_logits",
                      pos_weight=[1.0, 2.0, 0.5], optimizer={"name": "sgd", "lr": 0.2, "momentum": 0.9}, name="tags")
    elif name == "tags_kd":  # the same, distilling from teacher logits fed with each batch (kd from the previous round)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        art = compile(model, (torch.randn(4, 6),), labels=torch.zeros(4, 3), loss="kd",
                      kd={"task": "bce_with_logits", "teacher": "logits", "alpha": 0.5, "temperature": 2.0},
                      optimizer={"name": "sgd", "lr": 0.2, "momentum": 0.9}, name="tags_kd")
    else:
        raise KeyError(name)
    return Path(art.save(str(out / name)))


@pytest.fixture(scope="session")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """compiled(name) -> a pristine artifact directory, compiled on first use in this worker."""
    cache: dict[str, Path] = {}
    base = tmp_path_factory.mktemp("artifacts")

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = _build(name, base)
        return cache[name]

    return get


@pytest.fixture
def artifact(compiled: Callable[[str], Path], tmp_path: Path) -> Callable[[str], Path]:
    """artifact(name) -> a private copy of a compiled artifact, free to damage."""
    def get(name: str = "mlp") -> Path:
        dst = tmp_path / f"art_{name}"
        if not dst.exists():
            shutil.copytree(compiled(name), dst)
        return dst

    return get


def batch(seed: int, n: int = 4, features: int = 6, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, features)).astype(np.float32), rng.integers(0, classes, n).astype(np.int64)


def dataset_npz(path: Path, n: int = 40, seed: int = 0) -> Path:
    """A small learnable 3-class problem (class = argmax of the first three features)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    y = x[:, :3].argmax(axis=1).astype(np.int64)
    np.savez(path, x=x, y=y)
    return path


def tags_data(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small learnable multi-label problem: label j is on where feature j > 0."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    return x, (x[:, :3] > 0).astype(np.float32)


PY = sys.executable
