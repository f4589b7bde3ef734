"""Dead-code elimination: structure on a hand-built graph, and numerics before/after."""
from __future__ import annotations

import numpy as np

from pockprop.emit.onnx import to_onnx
from pockprop.autodiff.gradcheck import run_onnx
from pockprop.ops.builder import Builder
from pockprop.ir import Graph, TensorType
from pockprop.passes import eliminate_dead_code


def _graph() -> Graph:
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", TensorType((2, 3), "float32"))
    w = g.add_constant(np.full((3,), 2.0, np.float32), name="w")
    g.add_constant(np.ones((3,), np.float32), name="unused_const")
    live = b.op("mul", [x, w])
    dead = b.op("relu", [live])
    b.op("sigmoid", [dead])
    g.outputs = [b.op("add", [live, x])]
    return g


def test_dce_removes_unreachable_nodes_and_constants() -> None:
    g = _graph()
    res = eliminate_dead_code(g)
    assert res.changed
    assert [n.op for n in res.graph.nodes] == ["mul", "add"]
    assert "unused_const" not in res.graph.constants and "w" in res.graph.constants
    assert len(g.nodes) == 4, "the input graph is left untouched"
    res.graph.verify()
    again = eliminate_dead_code(res.graph)
    assert not again.changed


def test_dce_keeps_numerics() -> None:
    g = _graph()
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    before = run_onnx(to_onnx(g), {"x": x})
    after = run_onnx(to_onnx(eliminate_dead_code(g).graph), {"x": x})
    np.testing.assert_array_equal(before[0], after[0])
