"""Dead-code elimination: drop nodes and constants that no graph output depends on.

Rewrite: a node none of whose outputs reaches `graph.outputs` is removed; a constant no remaining
node reads is removed. Graph inputs are kept (they are the artifact's interface).
"""
from __future__ import annotations

from pockprop.ir import Graph
from pockprop.passes.base import PassResult


def eliminate_dead_code(graph: Graph) -> PassResult:
    out = graph.copy()
    live = set(out.outputs)
    kept = []
    for node in reversed(out.nodes):
        if any(o in live for o in node.outputs):
            kept.append(node)
            live.update(i for i in node.inputs if i is not None)
    kept.reverse()
    alive = set(kept)
    dead_values = {o for n in out.nodes if n not in alive for o in n.outputs}
    dead_consts = [c for c in out.constants if c not in live]
    out.nodes = kept
    for c in dead_consts:
        del out.constants[c]
        del out.types[c]
    for v in dead_values:
        out.types.pop(v, None)
        out.roles.pop(v, None)
    return PassResult(out, bool(dead_values or dead_consts))
