"""The lowering-choice pass on a tiny hand-built graph with a fake op that offers two lowerings."""
from __future__ import annotations

import pytest

from pockprop.ir import Graph, Node, TensorType
from pockprop.ops.registry import LOWERING, Op, lowering_key
from pockprop.passes import lowerings
from pockprop.passes.lowerings import choose_lowerings, chosen


class _TwoWays(Op):  # not registered: the registry stays as the package declares it
    name = "test_two_ways"
    lowerings = ("plain", "fancy")


@pytest.fixture(autouse=True)
def _fake_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lowerings, "get_op", lambda name: _TwoWays())


def _graph() -> Graph:
    g = Graph()
    g.add_input("x", TensorType((2, 3), "float32"))
    g.add_value("y", TensorType((2, 3), "float32"))
    g.append(Node("test_two_ways", ("x",), ("y",), {"k": 1}))
    g.outputs = ["y"]
    return g


def test_default_is_first_and_unchanged() -> None:
    g = _graph()
    r = choose_lowerings(g)
    assert not r.changed
    assert list(chosen(r.graph).values()) == ["plain"]


def test_choice_recorded_and_input_untouched() -> None:
    g = _graph()
    seen = []

    def pick(key, node, options, types):  # type: ignore[no-untyped-def]
        seen.append((key, options))
        return "fancy"

    r = choose_lowerings(g, pick)
    assert r.changed and r.graph.nodes[0].attrs[LOWERING] == "fancy"
    assert LOWERING not in g.nodes[0].attrs  # the input graph is unchanged
    assert seen == [("test_two_ways(float32[2, 3];k=1)", ("plain", "fancy"))]
    # the key ignores the choice itself, so a chosen graph keys the same
    assert lowering_key(r.graph.types, r.graph.nodes[0]) == seen[0][0]


def test_unknown_choice_refused() -> None:
    with pytest.raises(ValueError, match="not one of"):
        choose_lowerings(_graph(), lambda *a: "nope")
