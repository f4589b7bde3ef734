"""MAC counting: the formulas on known ops, and IR and emitted-ONNX counts agreeing on a compiled CNN."""
from __future__ import annotations

import pytest
import torch

from pockprop.compiler.compile import compile
from pockprop.compiler.cost import ir_macs, macs_by_module, node_macs, onnx_macs
from pockprop.emit.onnx import split_node_name
from pockprop.emit.onnx import to_onnx
from pockprop.ops.builder import Builder
from pockprop.ir import Graph, TensorType


def _f32(*shape: int) -> TensorType:
    return TensorType(tuple(shape), "float32")


def _both(g: Graph) -> tuple[int, int]:
    return ir_macs(g)["total"], sum(onnx_macs(to_onnx(g)).values())


def test_conv_linear_matmul_formulas() -> None:
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", _f32(2, 4, 9, 9))
    w = g.add_input("w", _f32(6, 2, 3, 3))
    y = b.op("conv2d", [x, w], stride=[2, 2], padding=[1, 1], dilation=[1, 1], groups=2)  # (2, 6, 5, 5)
    h = b.op("linear", [g.add_input("h", _f32(3, 5, 8)), g.add_input("fc", _f32(7, 8))])
    m = b.op("matmul", [g.add_input("a", _f32(2, 3, 4)), g.add_input("c", _f32(4, 5))])
    g2 = b.op("linear", [g.add_input("r", _f32(3, 8)), g.add_input("fc2", _f32(7, 8))])
    e = b.op("relu", [y])
    g.outputs = [e, h, m, g2]
    macs = {n.op + str(k): node_macs(g, n) for k, n in enumerate(g.nodes)}
    assert macs == {"conv2d0": 2 * 6 * 5 * 5 * (4 // 2) * 3 * 3, "linear1": 3 * 5 * 7 * 8, "matmul2": 2 * 3 * 5 * 4,
                    "linear3": 3 * 7 * 8, "relu4": 0}
    res = ir_macs(g)
    assert res["other_ops"] == 1 and res["total"] == sum(macs.values())
    assert res["by_module"] == {("model", "forward"): res["total"]}
    assert _both(g) == (res["total"], res["total"])  # Conv, MatMul (rank 3 linear), MatMul, Gemm


@pytest.mark.parametrize("size,k,stride,pad,groups,cig_slice", [
    (9, 3, 2, 1, 1, None),   # plain strided conv
    (8, 3, 2, 1, 4, None),   # grouped, even size: the weight-gradient Conv's end padding is cut
    (8, 1, 1, 0, 1, None),   # pointwise: weight gradient is one Gemm
    (8, 3, 1, 1, 1, 2),      # weight gradient of an input-channel slice (sparse update)
    (8, 3, 1, 1, 4, None),   # depthwise-like: 4 groups of 1 channel
])
def test_backward_conv_ops(size: int, k: int, stride: int, pad: int, groups: int, cig_slice: int | None) -> None:
    g = Graph()
    b = Builder(g)
    c_in, c_out = 4, 8
    cig = c_in // groups
    conv = {"stride": [stride] * 2, "padding": [pad] * 2, "dilation": [1, 1]}
    ho = (size + 2 * pad - k) // stride + 1
    x = g.add_input("x", _f32(2, c_in, size, size))
    gy = g.add_input("gy", _f32(2, c_out, ho, ho))
    w = g.add_input("w", _f32(c_out, cig, k, k))
    dx = b.op("conv2d_input_grad", [gy, w], input_shape=[2, c_in, size, size], groups=groups, **conv)
    xs = x if cig_slice is None else b.op("slice", [x], axis=1, start=0, stop=cig_slice, step=1)
    wcig = cig if cig_slice is None else cig_slice
    dw = b.op("conv2d_weight_grad", [xs, gy], groups=groups, weight_shape=[c_out, wcig, k, k], **conv)
    g.outputs = [dx, dw]
    forward = 2 * c_out * ho * ho * cig * k * k
    assert node_macs(g, g.nodes[0]) == forward  # the input gradient costs what the forward conv costs
    assert node_macs(g, g.nodes[-1]) == forward * wcig // cig  # a slice costs its share
    assert _both(g) == (forward + forward * wcig // cig,) * 2


@pytest.fixture(scope="module")
def cnn():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    x = torch.randn(4, 3, 16, 16)
    return compile(model, (x,), optimizer={"name": "sgd", "lr": 0.1}, trainable=None)


def test_ir_and_onnx_agree_on_compiled_cnn(cnn) -> None:  # type: ignore[no-untyped-def]
    ir = ir_macs(cnn.train_graph)
    onnx_counts = onnx_macs(cnn.train_model)
    assert ir["total"] == sum(onnx_counts.values()) > 0
    by_ir, by_onnx = macs_by_module(cnn.train_graph), macs_by_module(cnn.train_model)
    assert by_ir == by_onnx
    f0, f2 = 4 * 8 * 16 * 16 * 3 * 9, 4 * 16 * 8 * 8 * 8 * 9
    assert by_onnx["0"] == {"forward": f0, "backward": f0}, "first layer: weight gradient only, no input gradient"
    assert by_onnx["2"] == {"forward": f2, "backward": 2 * f2}, "input gradient + weight gradient"
    assert by_onnx["6"] == {"forward": 4 * 10 * 16, "backward": 2 * 4 * 10 * 16}
    assert set(by_onnx) == {"0", "2", "6"}


def test_node_names_split_into_module_and_phase() -> None:
    assert split_node_name("features.3.conv.0/Conv") == ("features.3.conv.0", "forward")
    assert split_node_name("features.3.conv.0/backward/ConvTranspose_2") == ("features.3.conv.0", "backward")
    assert split_node_name("optimizer/fc.weight/optimizer/Mul") == ("optimizer/fc.weight", "optimizer")
    assert split_node_name("model/MatMul") == ("model", "forward")
