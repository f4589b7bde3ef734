"""The cost model (compiler/lowering_cost.py) picks per its documented rule, and a step compiled with its
choices trains exactly like the default step."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch

from pockprop.compiler.compile import compile_traced, trace_model
from pockprop.compiler.lowering_cost import MIN_DEPTHWISE_PIXELS, cost_model_lowering
from pockprop.ir import Graph, Node, TensorType
from pockprop.ops.conv import conv_out_size
from pockprop.passes.lowerings import choose_lowerings, chosen, default_lowering
from pockprop.runtime.trainer import Trainer


def _backward_graph(c_in: int, c_out: int, size: int, k: int, stride: int, groups: int) -> Graph:
    """Both backward nodes of one conv (batch 2, padding k // 2), as inputs of a hand-built graph."""
    conv = dict(stride=[stride] * 2, padding=[k // 2] * 2, dilation=[1, 1], groups=groups)
    out = conv_out_size(size, k, stride, k // 2, 1)
    g = Graph()
    x = g.add_input("x", TensorType((2, c_in, size, size), "float32"))
    w = g.add_input("w", TensorType((c_out, c_in // groups, k, k), "float32"))
    dy = g.add_input("g", TensorType((2, c_out, out, out), "float32"))
    g.add_value("dx", g.types[x])
    g.add_value("dw", g.types[w])
    g.append(Node("conv2d_input_grad", (dy, w), ("dx",), {**conv, "input_shape": list(g.types[x].shape)}))
    g.append(Node("conv2d_weight_grad", (x, dy), ("dw",), {**conv, "weight_shape": list(g.types[w].shape)}))
    g.outputs = ["dx", "dw"]
    return g


@pytest.mark.parametrize("layer,want_dw", [
    ((16, 32, 16, 3, 1, 1), "taps"),                  # dense 3x3
    ((16, 32, 16, 3, 2, 1), "taps"),                  # dense 3x3 strided
    ((3, 8, 32, 7, 2, 1), "im2col"),                  # 49 taps: too many for per-tap GEMMs
    ((3, 8, 32, 3, 2, 1), "im2col"),                  # a 3-channel stem: per-tap GEMMs too thin
    ((8, 8, 16, 3, 2, 2), "auto"),                    # grouped, not depthwise: not measured, the default
    ((8, 8, 16, 3, 1, 8), "depthwise_taps"),          # depthwise, stride 1, 16x16 output
    ((8, 16, 16, 3, 1, 8), "depthwise_taps"),         # depthwise with channel multiplier 2
    ((8, 8, 8, 3, 1, 8), "auto"),                     # depthwise on a small map
    ((8, 8, 32, 3, 2, 8), "auto"),                    # depthwise strided
    ((8, 16, 16, 1, 1, 1), "batched_gemm"),           # pointwise on a 16x16 map
    ((8, 16, 8, 1, 1, 1), "auto"),                    # pointwise on a small map
    ((8, 16, 32, 1, 2, 1), "batched_gemm"),           # strided pointwise, 16x16 output
])
def test_rule_per_layer(layer, want_dw):  # type: ignore[no-untyped-def]
    g = choose_lowerings(_backward_graph(*layer), cost_model_lowering).graph
    picks = {node.op: how for node, how in chosen(g).items()}
    assert picks.get("conv2d_weight_grad") == want_dw
    assert picks["conv2d_input_grad"] == "auto"  # no input-gradient variant beat the default anywhere


def test_depthwise_threshold_is_the_documented_one():
    side = int(MIN_DEPTHWISE_PIXELS ** 0.5)
    for size, want in ((side, "depthwise_taps"), (side - 1, "auto")):
        g = _backward_graph(4, 4, size, 3, 1, 4)
        node = g.nodes[1]
        options = ("auto", "im2col", "depthwise_taps")
        assert cost_model_lowering("key", node, options, g.types) == want


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)  # im2col
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)  # depthwise_taps
        self.down = torch.nn.Conv2d(16, 8, 3, stride=2, padding=1)  # taps
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw(torch.relu(self.stem(x))))
        return self.head(torch.relu(self.down(x)).mean(dim=(2, 3)))


def test_cost_model_step_trains_like_the_default(tmp_path):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    y = np.array([1, 3])
    tm = trace_model(_Tiny(), (x,))
    opt = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    default = compile_traced(tm, optimizer=opt, choose_lowering=default_lowering)
    model = compile_traced(tm, optimizer=opt, choose_lowering=cost_model_lowering)
    counts = [collections.Counter(n.op_type for n in onnx.load_from_string(a.files()["train_step.onnx"]).graph.node)
              for a in (default, model)]
    assert counts[1]["Gemm"] - counts[0]["Gemm"] == 1 + 9  # im2col's GEMM and the 9 taps' GEMMs
    assert counts[1]["ReduceSum"] - counts[0]["ReduceSum"] == 9  # depthwise_taps
    trainers = [Trainer.load(a.save(str(tmp_path / k)), threads=1) for k, a in (("d", default), ("c", model))]
    for _ in range(2):
        losses = [t.step(x.numpy(), y) for t in trainers]
        np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    for n in default.trainable:
        np.testing.assert_allclose(trainers[1].state[n], trainers[0].state[n], rtol=1e-4, atol=1e-6, err_msg=n)
