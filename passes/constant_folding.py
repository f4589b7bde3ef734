"""Constant folding: evaluate at compile time every node whose inputs are all constants.

Rewrite: a node whose inputs are all in `graph.constants` (and none is a graph input) is removed and
those of its outputs that a remaining node reads become constants; constants nobody reads any more
are dropped. Folding is transitive (a node fed by folded values folds too).

Not folded: nodes whose outputs nobody reads (dead code is DCE's job), nodes producing a graph output
(the artifact's outputs stay computed values), nodes whose outputs take more than
max(max_bytes, bytes of their inputs) -- an `expand` of a scalar to an activation-sized tensor would
only move work from the step into the file and into memory -- and a `concat` larger than max_bytes
with an input that another node reads too: folding would store that input's bytes twice to save one
copy per step (a kd teacher's original slice joined with the frozen rest the student also reads).

Evaluation is generic: the folded nodes are lowered with `emit.onnx.to_onnx` and run once on
onnxruntime, so every op with an ONNX lowering folds and no op has numpy code here. Should that one
batch fail, nodes are evaluated one by one and those that fail (and what they feed) stay unfolded.
"""
from __future__ import annotations

import numpy as np

from pockprop.emit.onnx import to_onnx
from pockprop.ir import Graph, Node
from pockprop.passes.base import PassResult, drop_unused_constants, nbytes
from pockprop.runtime.session import session

DEFAULT_MAX_BYTES = 64 * 1024


def _run(graph: Graph, nodes: list[Node], values: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
    """Evaluate `nodes` (inputs taken from `values`) on onnxruntime; returns `wanted` outputs."""
    sub = Graph()
    for n in nodes:
        sub.append(n)
        for i in n.inputs:
            if i is not None and i not in sub.types and i in values:
                sub.constants[i] = values[i]
        for v in (*n.inputs, *n.outputs):
            if v is not None:
                sub.types[v] = graph.types[v]
    sub.outputs = list(wanted)
    # one thread, the kernels exactly as lowered: as the step itself would compute them
    got = session(to_onnx(sub, "fold").SerializeToString(), threads=1, optimize=False).run(wanted, {})
    return {w: np.asarray(a, dtype=graph.types[w].dtype).reshape(graph.types[w].shape) for w, a in zip(wanted, got)}


def _evaluate(graph: Graph, nodes: list[Node], wanted: list[str]) -> tuple[list[Node], dict[str, np.ndarray]]:
    """(the nodes that could be evaluated, values of their outputs; `wanted` at least when all could)."""
    try:
        return nodes, _run(graph, nodes, graph.constants, wanted)
    except Exception:  # noqa: BLE001 -- any failure (lowering, onnxruntime): retry one node at a time
        values, ok = dict(graph.constants), []
        for n in nodes:
            if not all(i is None or i in values for i in n.inputs):
                continue  # fed by a node that failed
            try:
                computed = _run(graph, [n], values, list(n.outputs))
            except Exception:  # noqa: BLE001 -- this node stays in the graph, computed at run time
                computed = None
            if computed is not None:
                values.update(computed)
                ok.append(n)
        return ok, {o: values[o] for n in ok for o in n.outputs}


def fold_constants(graph: Graph, max_bytes: int = DEFAULT_MAX_BYTES) -> PassResult:
    out = graph.copy()
    returned = set(out.outputs)
    known = {c for c in out.constants if c not in out.inputs}  # a fed value is never compile-time
    fold: list[Node] = []
    for n in out.nodes:
        if not n.outputs or not all(i is None or i in known for i in n.inputs):
            continue
        if not any(out.uses(o) for o in n.outputs) or any(o in returned for o in n.outputs):
            continue
        in_bytes = sum(nbytes(out.types[i]) for i in set(n.inputs) if i is not None)
        out_bytes = sum(nbytes(out.types[o]) for o in n.outputs)
        if out_bytes > max(max_bytes, in_bytes):
            continue
        if n.op == "concat" and out_bytes > max_bytes and any(len(out.uses(i)) > 1 for i in n.inputs if i):
            continue
        fold.append(n)
        known.update(n.outputs)
    if not fold:
        return PassResult(out, False)

    folding = set(fold)
    read_later = {i for n in out.nodes if n not in folding for i in n.inputs if i is not None}
    done, values = _evaluate(out, fold, [o for n in fold for o in n.outputs if o in read_later])
    if not done:
        return PassResult(out, False)
    gone = set(done)
    out.nodes = [n for n in out.nodes if n not in gone]
    read_later = {i for n in out.nodes for i in n.inputs if i is not None}
    for n in done:
        for o in n.outputs:
            if o in read_later:
                out.constants[o] = values[o]
            else:  # only folded nodes read it: the value disappears
                del out.types[o]
    drop_unused_constants(out, {i for n in done for i in n.inputs if i is not None})
    return PassResult(out, True)
