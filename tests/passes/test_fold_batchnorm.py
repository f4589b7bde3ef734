"""BatchNorm folding: which pairs fold (only fully frozen ones), and numerics before/after."""
from __future__ import annotations

import numpy as np
import torch

from pockprop.emit.onnx import to_onnx
from pockprop.autodiff.gradcheck import run_onnx
from pockprop.ops.builder import Builder
from pockprop.ir import Graph, TensorType
from pockprop.tracing.trace import trace
from pockprop.passes import eliminate_dead_code, fold_frozen_batchnorm

RNG = np.random.default_rng(0)
CONV = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}


def _c(g: Graph, shape: tuple[int, ...], name: str, positive: bool = False) -> str:
    a = RNG.standard_normal(shape).astype(np.float32)
    return g.add_constant(np.abs(a) + 0.5 if positive else a, name=name)


def _bn_params(g: Graph, c: int, prefix: str, trainable_gamma: bool = False) -> list[str | None]:
    gamma = (g.add_input(f"{prefix}.weight", TensorType((c,), "float32")) if trainable_gamma
             else _c(g, (c,), f"{prefix}.weight"))
    return [gamma, _c(g, (c,), f"{prefix}.bias"), _c(g, (c,), f"{prefix}.mean"), _c(g, (c,), f"{prefix}.var", True)]


def _graph() -> Graph:
    """conv+bn (frozen, folds), conv(no bias)+bn(no affine) (folds), conv+bn(trainable gamma) (stays),
    trainable conv+bn (stays), conv whose output has a second reader (stays)."""
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", TensorType((2, 3, 6, 6), "float32"))
    y = b.op("conv2d", [x, _c(g, (4, 3, 3, 3), "c1.w"), _c(g, (4,), "c1.b")], **CONV)
    y = b.op("relu", [b.op("batch_norm", [y] + _bn_params(g, 4, "bn1"), eps=1e-5)])
    y = b.op("conv2d", [y, _c(g, (4, 4, 3, 3), "c2.w")], **CONV)
    bn2 = _bn_params(g, 4, "bn2")
    y = b.op("batch_norm", [y, None, None, bn2[2], bn2[3]], eps=1e-3)
    y = b.op("conv2d", [y, _c(g, (4, 4, 1, 1), "c3.w")], **{**CONV, "padding": [0, 0]})
    y = b.op("batch_norm", [y] + _bn_params(g, 4, "bn3", trainable_gamma=True), eps=1e-5)
    w4 = g.add_input("c4.w", TensorType((4, 4, 3, 3), "float32"))
    y = b.op("batch_norm", [b.op("conv2d", [y, w4], **CONV)] + _bn_params(g, 4, "bn4"), eps=1e-5)
    pre = b.op("conv2d", [y, _c(g, (4, 4, 3, 3), "c5.w")], **CONV)
    y = b.op("add", [b.op("batch_norm", [pre] + _bn_params(g, 4, "bn5"), eps=1e-5), pre])
    g.outputs = [y]
    return g


def _feeds(g: Graph) -> dict[str, np.ndarray]:
    return {i: RNG.standard_normal(g.types[i].shape).astype(np.float32) for i in g.inputs}


def test_folds_only_frozen_single_use_pairs() -> None:
    g = _graph()
    res = fold_frozen_batchnorm(g)
    assert res.changed
    ops = [n.op for n in res.graph.nodes]
    assert ops.count("batch_norm") == 3 and ops.count("conv2d") == 5
    folded = [n for n in res.graph.nodes if n.op == "conv2d"][:2]
    assert all(len(n.inputs) == 3 and n.inputs[2] in res.graph.constants for n in folded)
    # old weights and BN tensors of folded pairs are gone, the rest is kept
    assert "c1.w" not in res.graph.constants and "bn1.var" not in res.graph.constants
    assert "bn3.var" in res.graph.constants and "c5.w" in res.graph.constants
    assert sum(n.op == "batch_norm" for n in g.nodes) == 5, "the input graph is left untouched"
    res.graph.verify()
    assert not fold_frozen_batchnorm(res.graph).changed


def test_fold_keeps_numerics() -> None:
    g = _graph()
    feeds = _feeds(g)
    before = run_onnx(to_onnx(g), feeds)[0]
    after = run_onnx(to_onnx(fold_frozen_batchnorm(g).graph), feeds)[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


def test_linear_batchnorm1d_folds() -> None:
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", TensorType((5, 6), "float32"))
    y = b.op("linear", [x, _c(g, (3, 6), "fc.w"), _c(g, (3,), "fc.b")])
    g.outputs = [b.op("batch_norm", [y] + _bn_params(g, 3, "bn"), eps=1e-5)]
    res = fold_frozen_batchnorm(g)
    assert res.changed and [n.op for n in res.graph.nodes] == ["linear"]
    feeds = _feeds(g)
    np.testing.assert_allclose(run_onnx(to_onnx(res.graph), feeds)[0], run_onnx(to_onnx(g), feeds)[0],
                               rtol=1e-5, atol=1e-6)


def test_traced_conv_bn_matches_torch_eval() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, groups=1), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
                                torch.nn.BatchNorm2d(8))
    for m in model:
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 3, 16, 16)
    traced = trace(model, (x,))
    res = fold_frozen_batchnorm(traced.graph)
    assert [n.op for n in res.graph.nodes] == ["conv2d", "relu", "conv2d"]
    res = eliminate_dead_code(res.graph)
    got = run_onnx(to_onnx(res.graph), {traced.user_inputs[0]: x.numpy()})[0]
    with torch.no_grad():
        want = model.eval()(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
