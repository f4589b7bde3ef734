"""What the emitted ONNX computes under a sparse scheme, counted in MACs from the ONNX itself.

- a weight updated at ratio 1/4 costs <= 1/4 (+ rounding) of its full weight-gradient MACs;
- a bias-only layer computes no weight gradient;
- nothing below the earliest trainable layer computes an input gradient (and that layer neither).
Backward node names are `<module>/backward/<Op>`; what a node computes shows in its output's name: the
IR values are `d_input*` (input gradient: a Conv or, for strided convs, a ConvTranspose) and `d_weight*`
(weight gradient: a Conv or, for 1x1 convs, a Gemm).
"""
from __future__ import annotations

import math

import pytest

from pockprop.compiler.compile import compile
from pockprop.compiler.cost import onnx_macs
from tests.compiler.zoo_cases import CASES, IDS, ZooCase, batch, build

# (case, conv at ratio 1/4, a bias-only BatchNorm, head)
SLICED = {
    "mobilenet_v2": ("features.14.conv.0.0", "features.15.conv.1.1", "classifier.1"),  # a 1x1 conv (GEMM path)
    "resnet18": ("layer3.1.conv1", "layer3.1.bn2", "fc"),  # a 3x3 conv
    "mcunet": ("blocks.8.mobile_inverted_conv.depth_conv.conv", "blocks.9.mobile_inverted_conv.point_linear.bn",
               "classifier.1"),  # a depthwise conv (sliced over channels)
}


def _backward(model, module: str, value: str) -> list:  # type: ignore[no-untyped-def]
    """The module's backward Conv/ConvTranspose/Gemm nodes computing a `value` (d_input or d_weight)."""
    return [n for n in model.graph.node if n.name.startswith(module + "/backward/")
            and n.op_type in ("Conv", "ConvTranspose", "Gemm") and n.output[0].startswith(value)]


def _weight_grad_macs(model, module: str) -> int:  # type: ignore[no-untyped-def]
    macs = onnx_macs(model)
    return sum(macs[n.name] for n in _backward(model, module, "d_weight"))


def _input_grad_nodes(model, module: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [n.name for n in _backward(model, module, "d_input")]


@pytest.mark.parametrize("name", list(SLICED))
def test_quarter_slice_costs_a_quarter_and_bias_only_computes_no_weight_gradient(name: str) -> None:
    case = next(c for c in CASES if c.name == name)
    conv, bias_layer, head = SLICED[name]
    x, y = batch(case, 0)
    scheme = {"rules": [{"match": conv, "update": "weight", "ratio": 0.25}, {"match": bias_layer, "update": "bias"},
                        {"match": head, "update": "full"}]}
    sparse = compile(build(case), (x,), labels=y, scheme=scheme)
    full = compile(build(case), (x,), labels=y, scheme="full", optimize=True)
    got, ref = _weight_grad_macs(sparse.train_model, conv), _weight_grad_macs(full.train_model, conv)
    assert ref > 0 and got > 0
    entry = next(s for s in sparse.state if s.name == f"{conv}.weight")
    sl = entry.spec.slice
    channels = entry.spec.full_shape[sl.axis]
    assert got <= ref * math.ceil(0.25 * channels) / channels, (got, ref)
    # the bias-only layer: no weight gradient anywhere under it (and no trainable weight)
    assert _weight_grad_macs(sparse.train_model, bias_layer) == 0
    assert f"{bias_layer}.weight" not in {s.name for s in sparse.state}
    # the sliced conv is the earliest trainable layer: it computes no input gradient (full backprop does)
    assert not _input_grad_nodes(sparse.train_model, conv)
    assert _input_grad_nodes(full.train_model, conv)


def _earliest_trainable(art, model) -> str:  # type: ignore[no-untyped-def]
    trained = {s.name.rsplit(".", 1)[0] for s in art.state if s.role == "param"}
    return next(n for n, _ in model.named_modules() if n in trained)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["bias-only", "sparse", "tbft-middle", "last-k:2", "classifier"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name != "mlp"], ids=[i for i in IDS if i != "mlp"])
def test_no_input_gradient_below_the_earliest_trainable_layer(case: ZooCase, preset: str) -> None:
    model = build(case)
    x, y = batch(case, 0)
    art = compile(model, (x,), labels=y, scheme=preset)
    earliest = _earliest_trainable(art, model)
    order = [n for n, _ in model.named_modules() if n]
    below = set(order[:order.index(earliest)])
    backward = [n.name.split("/backward/")[0] for n in art.train_model.graph.node if "/backward/" in n.name]
    assert not [m for m in backward if m in below and not earliest.startswith(m + ".")], preset
    assert not _input_grad_nodes(art.train_model, earliest)
    if preset == "bias-only":  # no weight gradient at all, except the head's
        heads = {"classifier.1", "fc"}
        convs = [n for n, m in model.named_modules() if type(m).__name__ == "Conv2d"]
        assert all(_weight_grad_macs(art.train_model, c) == 0 for c in convs if c not in heads)
