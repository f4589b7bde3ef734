"""The IR's invariants: node identity, def-use kept by every mutation, roles, renames, verification."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pockprop.ir import Graph, Node, Phase, Role, TensorType, module_of
from pockprop.ops.builder import Builder

F3 = TensorType((3,), "float32")


def _graph() -> tuple[Graph, Builder, dict[str, str]]:
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", F3)
    w = g.add_input("w", F3, Role.PARAMETER)
    a = b.op("mul", [x, w], hint="a")
    c = b.op("relu", [a], hint="c")
    d = b.op("add", [a, c], hint="d")
    g.outputs = [d]
    return g, b, {"x": x, "w": w, "a": a, "c": c, "d": d}


def test_nodes_have_identity_and_are_immutable() -> None:
    n1 = Node("relu", ("x",), ("y",))
    n2 = Node("relu", ("x",), ("y",))
    assert n1 != n2 and len({n1, n2}) == 2 and n1 == n1
    with pytest.raises(dataclasses.FrozenInstanceError):
        n1.inputs = ("z",)  # type: ignore[misc]
    assert n1.replace(inputs=["x"]) is n1  # nothing changed: the same node
    n3 = n1.replace(inputs=["z"])
    assert n3 is not n1 and n3.inputs == ("z",) and n1.inputs == ("x",)
    assert Node("relu", ["x"], ["y"], phase="backward").phase is Phase.BACKWARD


def test_def_use_follows_every_mutation() -> None:
    g, b, v = _graph()
    mul, relu, add = g.nodes
    assert g.producer(v["a"]) is mul and g.producer(v["x"]) is None
    assert g.uses(v["a"]) == [relu, add] and g.uses(v["d"]) == []
    # replace_all_uses: every reader (and the graph outputs) now read the new value
    e = b.op("neg", [v["x"]], hint="e")
    g.nodes = [g.nodes[-1], *g.nodes[:-1]]  # move e's producer first: a reorder rebuilds the index
    g.replace_all_uses(v["a"], e)
    assert g.uses(v["a"]) == [] and [n.op for n in g.uses(e)] == ["relu", "add"]
    g.verify()
    # rename_value: producer, readers, outputs and type follow
    g.rename_value(v["d"], "out")
    assert g.outputs == ["out"] and g.producer("out").op == "add" and v["d"] not in g.types
    g.verify()


def test_rename_keeps_recorded_roles_and_inputs() -> None:
    g, _, v = _graph()
    g.rename_value(v["w"], "weight")
    assert "weight" in g.inputs and g.role("weight") is Role.PARAMETER and [n.op for n in g.uses("weight")] == ["mul"]
    with pytest.raises(ValueError, match="taken"):
        g.rename_value("weight", v["x"])
    g.verify()


def test_roles_recorded_or_derived() -> None:
    g, b, v = _graph()
    k = g.add_constant(np.ones(3, np.float32), hint="k")
    with b.scope("", phase=Phase.BACKWARD):
        gr = b.op("mul", [v["d"], k])
    with b.scope("", phase=Phase.OPTIMIZER):
        up = b.op("sub", [v["w"], gr])
    g.roles[up] = Role.PARAMETER
    assert [g.role(x) for x in (v["x"], v["w"], k, v["a"], gr, up)] == \
        [Role.DATA, Role.PARAMETER, Role.CONSTANT, Role.ACTIVATION, Role.GRADIENT, Role.PARAMETER]


def test_copy_is_independent() -> None:
    g, b, v = _graph()
    h = g.copy()
    h.replace_all_uses(v["a"], v["x"])
    assert [n.op for n in g.uses(v["a"])] == ["relu", "add"] and h.uses(v["a"]) == []
    g.verify()
    h.verify()


def test_verify_names_what_is_wrong() -> None:
    g, _, v = _graph()
    g.nodes = [g.nodes[1], g.nodes[0], g.nodes[2]]  # relu before the mul that defines its input
    with pytest.raises(ValueError, match="before it is defined"):
        g.verify()
    g, _, v = _graph()
    g._nodes[1] = g.nodes[1].replace(inputs=[v["x"]])  # behind the graph's back: the index is stale
    with pytest.raises(ValueError, match="def-use"):
        g.verify()
    g, _, _ = _graph()
    g.inputs.append("w2")
    g.types["w2"] = F3
    with pytest.raises(ValueError, match="no recorded role"):
        g.verify()


def test_phase_and_role_print_as_their_values() -> None:
    assert f"{Phase.BACKWARD}" == "backward" and str(Role.PARAMETER) == "parameter"
    assert {"forward": 1}[Phase.FORWARD] == 1 and Phase.LOSS.is_forward and not Phase.OPTIMIZER.is_forward


def test_module_of() -> None:
    assert module_of("features.3.conv.0.weight") == "features.3.conv.0" and module_of("weight") == ""
