"""The tape that VJP rules, losses, optimizers and importers build IR through.

`b.op("relu", [x])` looks up the op's shape rule in the registry, appends one node and returns its
output value name, so everything built this way is ordinary IR that passes and the emitter see alike.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

from pockprop.ir import Graph, Node, Phase, TensorType
from pockprop.ops.registry import get_op


class Builder:
    """Appends nodes to a graph, inferring output types from the op's shape rule (a 'tape').

    `b.op("relu", [x])` returns the output value name (a tuple for multi-output ops). VJP rules,
    losses and optimizers all build through this, so they produce ordinary IR.
    """

    def __init__(self, graph: Graph, module: str = "", phase: Phase = Phase.FORWARD) -> None:
        self.graph = graph
        self.module = module
        self.phase = phase

    @contextlib.contextmanager
    def scope(self, module: str, phase: Phase | None = None) -> Iterator["Builder"]:
        """Nodes built inside carry `module` as their module path (and `phase`, if given)."""
        saved = self.module, self.phase
        self.module, self.phase = module, phase or self.phase
        try:
            yield self
        finally:
            self.module, self.phase = saved

    def type(self, value: str) -> TensorType:
        return self.graph.types[value]

    def op(self, op: str, inputs: list[str | None], hint: str | None = None, **attrs: Any) -> Any:
        opdef = get_op(op)
        in_types = [None if i is None else self.graph.types[i] for i in inputs]
        out_types = opdef.shape(in_types, attrs)
        outs = [self.graph.add_value(self.graph.fresh(hint or op), t) for t in out_types]
        self.graph.append(Node(op, tuple(inputs), tuple(outs), attrs, self.module, self.phase))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def const(self, value: Any, dtype: str = "float32", hint: str = "c") -> str:
        return self.graph.add_constant(np.asarray(value, dtype=dtype), hint)

    def scalar_like(self, value: float, like: str) -> str:
        """A rank-0 constant with the dtype of `like`, for python scalars in ATen calls."""
        return self.const(value, self.type(like).dtype)
