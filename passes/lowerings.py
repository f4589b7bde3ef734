"""Choose a lowering for every node whose op offers several (Op.lowerings): a Graph -> Graph pass.

Which lowering is fastest depends on shapes, the onnxruntime build and the thread count, so the choice
is a `Chooser` given by the compiler: from a target profile measured on the device, or a cost model.
The pass only records the choice in the node's attrs["lowering"]; values are the same whatever it picks.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Protocol

from pockprop.ir import Graph, Node, TensorType
from pockprop.ops import get_op
from pockprop.ops.registry import LOWERING, lowering_key, lowering_of
from pockprop.passes.base import PassResult


class Chooser(Protocol):
    def __call__(self, key: str, node: Node, options: tuple[str, ...], types: Mapping[str, TensorType]) -> str:
        """One of `options` (never empty; options[0] is the op's default) for the node keyed `key`."""
        ...


def default_lowering(key: str, node: Node, options: tuple[str, ...], types: Mapping[str, TensorType]) -> str:
    """Each op's default lowering (the first of its options)."""
    return options[0]


def with_choice(graph: Graph) -> Iterator[tuple[Node, tuple[str, ...], str]]:
    """Each node with more than one valid lowering, its options (default first) and its lowering key."""
    for node in list(graph.nodes):
        options = get_op(node.op).lowering_options(graph.types, node)
        if len(options) >= 2:
            yield node, tuple(options), lowering_key(graph.types, node)


def choose_lowerings(graph: Graph, choose: Chooser = default_lowering) -> PassResult:
    """Set attrs["lowering"] on each node with more than one valid lowering, as `choose` decides."""
    g = graph.copy()
    changed = False
    for node, options, key in with_choice(g):
        pick = choose(key, node, options, g.types)
        if pick not in options:
            raise ValueError(f"lowering {pick!r} is not one of {options} for {node!r}")
        if pick != (lowering_of(node) or options[0]):
            g.replace_node(node, node.replace(attrs={**node.attrs, LOWERING: pick}))
            changed = True
    return PassResult(g, changed)


def chosen(graph: Graph) -> dict[Node, str]:
    """The lowering each node with a choice got (its op's default where none was recorded)."""
    out = {}
    for node in graph.nodes:
        options = get_op(node.op).lowering_options(graph.types, node)
        if options:
            out[node] = lowering_of(node) or options[0]
    return out
