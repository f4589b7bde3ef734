"""The pass pipeline: runs passes in order, logs what changed, verifies after each pass and names the culprit."""
from __future__ import annotations

import numpy as np
import pytest

from pockprop.ir import Graph, TensorType
from pockprop.ops.builder import Builder
from pockprop.passes.base import PassResult
from pockprop.passes.pipeline import DCE, FOLD_CONSTANTS, Pass, PassError, Pipeline, verify_graph

F2 = TensorType((2,), "float32")


def _graph() -> Graph:
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", F2)
    k = b.op("neg", [g.add_constant(np.ones(2, np.float32), hint="one")], hint="k")  # foldable
    b.op("abs", [x], hint="dead")  # dead
    g.outputs = [b.op("add", [x, k], hint="y")]
    return g


def test_runs_in_order_and_logs_changes() -> None:
    g = _graph()
    res = Pipeline("p", (DCE, FOLD_CONSTANTS, DCE))(g, verify=True)
    assert [(r.name, r.changed, r.nodes_before, r.nodes_after) for r in res.log] == [
        ("eliminate_dead_code", True, 3, 2), ("fold_constants", True, 2, 1), ("eliminate_dead_code", False, 1, 1)]
    assert res.changed and [n.op for n in res.graph.nodes] == ["add"] and len(g.nodes) == 3  # input untouched


def test_a_pass_that_breaks_the_graph_is_named() -> None:
    def bad(graph: Graph) -> PassResult:
        out = graph.copy()
        out.nodes = list(reversed(out.nodes))  # readers before producers
        return PassResult(out, True)

    with pytest.raises(PassError, match="pipeline p: pass reverse broke the graph: .*before it is defined"):
        Pipeline("p", (Pass("reverse", bad),))(_graph(), verify=True)
    Pipeline("p", (Pass("reverse", bad),))(_graph(), verify=False)  # unchecked: no error


def test_verify_checks_types_against_shape_rules() -> None:
    g = _graph()
    g.types["y"] = TensorType((3,), "float32")
    with pytest.raises(ValueError, match="shape rule says"):
        verify_graph(g)


def test_dump_writes_the_graph_after_each_pass(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("POCKPROP_DUMP_PASSES", str(tmp_path))
    Pipeline("p", (DCE, FOLD_CONSTANTS))(_graph())
    files = sorted(f.name for f in tmp_path.iterdir())
    assert files == ["p-0-eliminate_dead_code.txt", "p-1-fold_constants.txt"]
    assert "= add(" in (tmp_path / files[-1]).read_text()
