"""Compute what backward keeps during the forward pass, so full activations die at their last forward use.

Rewrite: a backward-phase node of an op tagged HOISTABLE (`slice`, `range_mask`) whose inputs are all
forward values (forward or loss phase outputs, graph inputs, constants) and whose output is no larger
than its input moves to right after the producer of its last input and becomes forward phase. Backward then reads the small tensor —
the channel slice a sliced weight gradient needs, the one-byte mask of an activation gradient — instead
of the activation, which the memory planner sees as a shorter lifetime. Values and order of everything
else are unchanged.
"""
from __future__ import annotations

from pockprop.ir import Graph, Node, Phase
from pockprop.ops import Tag, ops_tagged
from pockprop.passes.base import PassResult, nbytes


def save_small_for_backward(graph: Graph) -> PassResult:
    g = graph.copy()
    hoistable = ops_tagged(Tag.HOISTABLE)
    available = set(g.inputs) | set(g.constants)
    for n in g.nodes:
        if n.phase.is_forward:
            available.update(n.outputs)

    hoisted: list[Node] = []
    for n in g.nodes:
        if (n.phase is Phase.BACKWARD and n.op in hoistable and all(i in available for i in n.inputs if i)
                and nbytes(g.types[n.outputs[0]]) <= nbytes(g.types[n.inputs[0]])):
            hoisted.append(n)
            available.update(n.outputs)  # a chain (mask of a slice) moves along
    if not hoisted:
        return PassResult(g, False)

    pending = list(hoisted)
    moving = set(hoisted)
    defined = set(g.inputs) | set(g.constants)
    order: list[Node] = []

    def place_ready() -> None:
        for h in list(pending):
            if all(i in defined for i in h.inputs if i):
                order.append(h.replace(phase=Phase.FORWARD))
                defined.update(h.outputs)
                pending.remove(h)

    place_ready()
    for n in g.nodes:
        if n in moving:
            continue
        order.append(n)
        defined.update(n.outputs)
        if n.phase.is_forward:
            place_ready()
    assert not pending, "hoisted nodes whose inputs never became available"
    g.nodes = order
    return PassResult(g, True)
