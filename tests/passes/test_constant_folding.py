"""Constant folding: what folds (constant-only, used, small), what does not, and numerics."""
from __future__ import annotations

import numpy as np
import pytest

from pockprop.compiler.compile import compile
from pockprop.emit.onnx import to_onnx
from pockprop.autodiff.gradcheck import run_onnx
from pockprop.ops.builder import Builder
from pockprop.ir import Graph, TensorType
from pockprop.passes import fold_constants


def _graph() -> Graph:
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", TensorType((2, 3), "float32"))
    var = g.add_constant(np.array([1.0, 4.0, 9.0], np.float32), name="var")
    inv = b.op("div", [b.scalar_like(1.0, var), b.op("sqrt", [b.op("add", [var, b.scalar_like(1e-5, var)])])],
               hint="inv")
    row = b.op("reshape", [inv], shape=[1, 3], hint="row")
    y = b.op("mul", [x, row])  # reads a graph input: never folded
    big = b.op("expand", [b.scalar_like(2.0, x)], shape=[64, 64, 64], hint="big")  # 1 MiB from 4 bytes
    z = b.op("sum", [big], axes=[0, 1, 2], keepdim=False)
    b.op("neg", [var], hint="dead")  # constant-only but nobody reads it
    g.outputs = [b.op("add", [y, z]), b.op("abs", [var], hint="returned")]
    return g


def test_folds_constant_chains_and_respects_limits() -> None:
    g = _graph()
    res = fold_constants(g)
    assert res.changed
    out = res.graph
    out.verify()
    # add/sqrt/div/reshape collapse into the constant `row`; their intermediates vanish
    assert "row" in out.constants and out.constants["row"].shape == (1, 3)
    assert not {"inv"} & set(out.types)
    assert [n.op for n in out.nodes] == ["mul", "expand", "sum", "neg", "add", "abs"]
    assert "var" in out.constants, "still read by the nodes that stay"
    assert len(g.nodes) == 10, "the input graph is left untouched"
    assert not fold_constants(out).changed
    # with a generous bound the big expand (and the sum over it) fold too
    assert [n.op for n in fold_constants(g, max_bytes=2**21).graph.nodes] == ["mul", "neg", "add", "abs"]


def test_folding_keeps_numerics() -> None:
    g = _graph()
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    before = run_onnx(to_onnx(g), feeds)
    after = run_onnx(to_onnx(fold_constants(g, max_bytes=2**21).graph), feeds)
    for a, w in zip(after, before):
        np.testing.assert_array_equal(a, w)


def test_concat_of_a_shared_constant_stays_unfolded() -> None:
    """Joining a constant that another node reads too would store its bytes twice: not folded above
    max_bytes (a kd teacher's original slice and the frozen rest the student also reads), folded below."""
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", TensorType((64, 68), "float32"))
    rest = g.add_constant(np.ones((64, 64), np.float32), name="rest")
    part = g.add_constant(np.zeros((64, 4), np.float32), name="part")
    merged = b.op("concat", [part, rest], axis=1, hint="merged")
    g.outputs = [b.op("add", [x, merged]), b.op("mul", [rest, rest])]  # the second reader of `rest`
    assert "merged" not in fold_constants(g, max_bytes=1024).graph.constants
    assert "merged" in fold_constants(g, max_bytes=2**20).graph.constants


def test_fed_value_is_not_constant() -> None:
    g = Graph()
    b = Builder(g)
    w = g.add_constant(np.ones(3, np.float32), name="w")
    g.inputs.append(w)  # a default that the caller may override at run time
    g.outputs = [b.op("mul", [b.op("neg", [w]), w])]
    assert not fold_constants(g).changed


@pytest.fixture(scope="module")
def cnn_step():  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.randn(2, 3, 8, 8)
    art = compile(model, (x,), optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}, trainable=None, optimize=False)
    return art, x


def test_training_step_folds_batchnorm_statistics(cnn_step) -> None:  # type: ignore[no-untyped-def]
    art, x = cnn_step
    g = art.train_graph
    res = fold_constants(g)
    assert res.changed and len(res.graph.nodes) < len(g.nodes)
    # frozen running statistics: 1/sqrt(var + eps) is computed at compile time, once per BN
    assert not [n for n in res.graph.nodes if n.op == "sqrt"]
    feeds = {art.data_inputs[0][0]: x.numpy(), "labels": np.array([0, 2]), "lr": np.array(0.1, np.float32)}
    feeds |= {s.input: s.initial for s in art.state}
    for a, w in zip(run_onnx(to_onnx(res.graph), feeds), run_onnx(to_onnx(g), feeds)):
        np.testing.assert_allclose(a, w, rtol=1e-6, atol=1e-7)
