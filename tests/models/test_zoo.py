"""Tests for the model zoo (models/) and the digits data helpers (models/data.py).

Kept fast: full-size models are only built (for parameter counts), never run;
forward passes and torch.export use tiny widths and 32x32 inputs.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pockprop import models
from pockprop.models import ZOO, ModelInfo
from pockprop.models.data import digits, digits_flat

REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_CLASSES = 10

# Smallest config of each zoo model that still exercises every block type.
TINY = {
    "mobilenet_v2": (dict(width_mult=0.35), (2, 3, 32, 32)),
    "resnet18": (dict(width=8), (2, 3, 32, 32)),
    "resnet26": (dict(width=8), (2, 3, 32, 32)),
    "resnet50": (dict(width=8), (2, 3, 32, 32)),
    "mcunet": (dict(width_mult=0.5), (2, 3, 32, 32)),
    "mlp": (dict(), (2, 64)),
    "vit_tiny": (dict(layers=1), (2, 3, 32, 32)),
}


# The transformers (models/hf.py, token ids in): tiny configs, and (classes, full-size parameter count).
TINY_TOKENS = {
    "llama_small": (dict(vocab_size=64, hidden=16, layers=2, heads=2, max_positions=16), 64, 7_868_672),
    "bert_base4": (dict(num_classes=3, vocab_size=64, hidden=16, layers=2, heads=2, intermediate=32,
                        max_positions=16), 3, 52_780_802),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(name: str) -> tuple[nn.Module, torch.Tensor]:
    kwargs, shape = TINY[name]
    torch.manual_seed(0)
    model = ZOO[name].builder(num_classes=NUM_CLASSES, **kwargs).eval()
    return model, torch.randn(shape)


# --- architecture ---

@pytest.mark.parametrize("builder, expected", [
    (models.mobilenet_v2, 3_504_872),
    (models.resnet18, 11_689_512),
    (models.resnet50, 25_557_032),
])
def test_param_counts_match_torchvision(builder, expected):
    assert n_params(builder()) == expected


def test_mcunet_is_small_and_matches_docstring():
    model = models.mcunet()
    assert n_params(model) == 966_872 < 1_000_000
    kernels = {b.mobile_inverted_conv.kernel_size for b in model.blocks}
    ratios = {b.mobile_inverted_conv.expand_ratio for b in model.blocks}
    assert kernels == {3, 5, 7} and {3, 4, 6} <= ratios
    residual = [b.use_residual for b in model.blocks]
    assert residual == [True, False, True, False, True, False, True, False, True, False, True]


def test_mcunet_block_naming():
    names = dict(models.mcunet().named_modules())
    assert "blocks.0.mobile_inverted_conv.inverted_bottleneck" not in names  # expand ratio 1
    for part in ("inverted_bottleneck", "depth_conv", "point_linear"):
        assert isinstance(names[f"blocks.1.mobile_inverted_conv.{part}.conv"], nn.Conv2d)
        assert isinstance(names[f"blocks.1.mobile_inverted_conv.{part}.bn"], nn.BatchNorm2d)
    assert "blocks.1.mobile_inverted_conv.point_linear.act" not in names
    assert names["blocks.3.mobile_inverted_conv.depth_conv.conv"].kernel_size == (7, 7)
    for name in ("first_conv.conv", "feature_mix_layer.act", "classifier.0", "classifier.1"):
        assert name in names


def test_mobilenet_v2_naming():
    names = dict(models.mobilenet_v2(num_classes=NUM_CLASSES, width_mult=0.35).named_modules())
    assert isinstance(names["features.0.0"], nn.Conv2d)
    assert isinstance(names["features.0.2"], nn.ReLU6)
    # Expand ratio 1: (dw ConvBNReLU, project conv, bn).
    assert isinstance(names["features.1.conv.0.0"], nn.Conv2d)
    assert isinstance(names["features.1.conv.1"], nn.Conv2d)
    assert isinstance(names["features.1.conv.2"], nn.BatchNorm2d)
    # Expand ratio 6: (expand ConvBNReLU, dw ConvBNReLU, project conv, bn).
    assert names["features.2.conv.1.0"].groups == names["features.2.conv.1.0"].in_channels
    assert isinstance(names["features.2.conv.3"], nn.BatchNorm2d)
    assert "features.17" in names and "features.19" not in names
    assert isinstance(names["features.18.0"], nn.Conv2d)
    assert isinstance(names["classifier.0"], nn.Dropout)
    assert isinstance(names["classifier.1"], nn.Linear)
    assert names["classifier.1"].in_features == 1280  # last channel never shrinks below 1280


def test_resnet_naming():
    names = dict(models.resnet18(num_classes=NUM_CLASSES, width=8).named_modules())
    for name in ("conv1", "bn1", "relu", "maxpool", "layer4.1.conv2", "layer2.0.downsample.0",
                 "layer2.0.downsample.1", "avgpool", "fc"):
        assert name in names, name
    assert "layer1.0.downsample" not in names  # same shape: identity shortcut
    bottleneck = dict(models.resnet26(num_classes=NUM_CLASSES, width=8).named_modules())
    # torchvision v1.5: the stride sits on the 3x3 conv, not the first 1x1.
    assert bottleneck["layer2.0.conv1"].stride == (1, 1)
    assert bottleneck["layer2.0.conv2"].stride == (2, 2)
    assert bottleneck["fc"].in_features == 8 * 8 * 4


def test_mlp_layers_and_image_input():
    model = models.mlp(in_features=48, hidden=(16,), num_classes=4, dropout=0.1)
    kinds = [type(m) for m in model.layers]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert model.eval()(torch.randn(2, 3, 4, 4)).shape == (2, 4)


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_forward_and_export(name):
    model, x = tiny(name)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, NUM_CLASSES) and torch.isfinite(out).all()
    exported = torch.export.export(model, (x,), strict=False)
    torch.testing.assert_close(exported.module()(x), out)
    # The compiler expects functional ops only: no relu_ / hardtanh_ from inplace activations.
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if t.startswith("aten.") and t.split(".")[1].endswith("_")], targets


# --- ZOO ---

def test_zoo_entries():
    assert set(ZOO) == {"mobilenet_v2", "resnet18", "resnet26", "resnet50", "mcunet", "mlp", "llama_small",
                        "bert_base4", "vit_tiny"}
    assert set(TINY) | set(TINY_TOKENS) == set(ZOO)
    for name, info in ZOO.items():
        assert isinstance(info, ModelInfo) and info.name == name and info.description
        assert info.builder is getattr(models, name)
        expected = (4, 128) if name in TINY_TOKENS else (8, 64) if name == "mlp" else \
            (4, 3, 32, 32) if name == "vit_tiny" else (8, 3, 128, 128)
        assert info.input_shape == expected
        assert info.input_dtype == ("int64" if name in TINY_TOKENS else "float32")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ZOO["mlp"].input_shape = (1, 64)


def test_builders_importable_as_plain_spec():
    import importlib

    # Importing every submodule must not replace a builder attribute of the package.
    for sub in ("mobilenetv2", "resnet", "proxyless", "perceptron", "hf", "data"):
        importlib.import_module(f"pockprop.models.{sub}")
    package = importlib.import_module("pockprop.models")
    for name, info in ZOO.items():
        assert getattr(package, name) is info.builder and callable(info.builder)
    with pytest.raises(AttributeError):
        package.no_such_builder


# --- data ---

def test_digits_shapes_and_dtypes():
    x, y = digits(resolution=32, channels=3, split="train")
    xt, yt = digits(resolution=32, channels=3, split="test")
    assert x.shape == (1437, 3, 32, 32) and xt.shape == (360, 3, 32, 32)
    assert x.dtype == np.float32 and y.dtype == np.int64 and y.shape == (1437,)
    assert np.isfinite(x).all() and x.min() >= -1.0 and x.max() <= 1.0
    assert set(np.unique(y)) == set(range(10)) == set(np.unique(yt))
    assert np.array_equal(x[:, 0], x[:, 2])  # grey repeated across channels
    xg, _ = digits(resolution=16, channels=1, split="test", interpolation="nearest")
    assert xg.shape == (360, 1, 16, 16)


def test_digits_deterministic_and_seeded():
    a, ya = digits(resolution=16, seed=3)
    b, yb = digits(resolution=16, seed=3)
    assert np.array_equal(a, b) and np.array_equal(ya, yb)
    c, _ = digits(resolution=16, seed=4)
    assert not np.array_equal(a, c)


def test_train_test_partition_the_dataset():
    from sklearn.datasets import load_digits

    full = (load_digits().data.astype(np.float32) / 16.0 - 0.5) / 0.5
    parts = [digits_flat(split=s, seed=1, test_fraction=0.25)[0] for s in ("train", "test")]
    assert len(parts[1]) == 450

    def sorted_rows(a):
        return a[np.lexsort(a.T[::-1])]

    # Same multiset of rows as the whole dataset: every image is used exactly once.
    assert np.array_equal(sorted_rows(np.concatenate(parts)), sorted_rows(full))
    from pockprop.models.data import _split_indices

    train_idx, test_idx = _split_indices(1, 0.25)
    assert not set(train_idx) & set(test_idx)


def test_digits_interpolation_matches_torch_and_flat():
    x, _ = digits(resolution=32, channels=1, split="test")
    flat, _ = digits_flat(split="test")
    small = torch.from_numpy(flat.reshape(-1, 1, 8, 8))
    ref = nn.functional.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(x, ref.numpy(), atol=1e-5)
    same, _ = digits(resolution=8, channels=1, split="test")
    np.testing.assert_allclose(same[:, 0].reshape(-1, 64), flat, atol=1e-6)
    nearest, _ = digits(resolution=16, channels=1, split="test", interpolation="nearest")
    np.testing.assert_array_equal(nearest[:, 0], np.kron(flat.reshape(-1, 8, 8), np.ones((2, 2))))


@pytest.mark.parametrize("kwargs", [
    dict(split="val"), dict(test_fraction=0.0), dict(resolution=0), dict(interpolation="cubic"),
])
def test_digits_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        digits(**kwargs)


def test_data_module_does_not_import_torch():
    code = ("import sys, pockprop.models.data as d; d.digits(resolution=8); d.digits_flat(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


@pytest.mark.parametrize("name", sorted(TINY_TOKENS))
def test_transformers_take_token_ids(name):
    kwargs, classes, full_size = TINY_TOKENS[name]
    torch.manual_seed(0)
    model = ZOO[name].builder(**kwargs).eval()
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        out = model(ids)  # forward(input_ids) returns the logits tensor, not a ModelOutput
    assert isinstance(out, torch.Tensor) and torch.isfinite(out).all()
    assert tuple(out.shape) == ((2, 8, classes) if name == "llama_small" else (2, classes))
    names = {n for n, _ in model.named_parameters()}  # transformers' own names, which schemes match
    assert ("model.layers.1.mlp.gate_proj.weight" in names if name == "llama_small"
            else "bert.encoder.layer.1.intermediate.dense.weight" in names)
    assert n_params(ZOO[name].builder()) == full_size  # the sizes the zoo and docs/benchmarks.md state
