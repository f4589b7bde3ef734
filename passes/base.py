"""What every pass returns, and small helpers the passes share.

A pass is a function `Graph -> PassResult(graph, changed)`. It never mutates its input: it works on
`graph.copy()` (constant arrays are shared between copies, so a pass replaces them, never writes them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pockprop.ir import Graph, TensorType


@dataclass
class PassResult:
    graph: Graph
    changed: bool


def nbytes(t: TensorType) -> int:
    """Bytes of one tensor of type `t` (static shape, so exact)."""
    return t.numel * np.dtype(t.dtype).itemsize


def is_constant(graph: Graph, value: str | None) -> bool:
    """A value known at compile time: a constant that is not also fed at run time."""
    return value is not None and value in graph.constants and value not in graph.inputs


def drop_unused_constants(graph: Graph, candidates: set[str]) -> None:
    """Remove those of `candidates` that no node reads and that are not graph outputs (in place)."""
    used = {i for n in graph.nodes for i in n.inputs if i is not None} | set(graph.outputs)
    for c in candidates - used:
        if c in graph.constants:
            del graph.constants[c]
            del graph.types[c]
            graph.param_names.pop(c, None)
