"""pockprop's IR: a flat, topologically ordered list of nodes over named SSA values.

A value is a string name with a `TensorType` (static shape, dtype). A node is one op application
(`op`, input value names, output value names, attributes, the module path it came from). Constants
(frozen weights, literals) are values with an array in `Graph.constants`. The forward graph, the
backward graph and the optimizer update all live in this one IR, so every pass and the ONNX emitter
see them alike.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TensorType:
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: "float32", "int64", "bool"

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"


@dataclass
class Node:
    op: str
    inputs: list[str | None]  # None marks an absent optional input (e.g. a conv without bias)
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    module: str = ""  # module path in the user's model ("features.3.conv.1"), "" for top level
    phase: str = "forward"  # forward | loss | backward | optimizer: which part of the step built it

    def __repr__(self) -> str:
        attrs = ", ".join(f"{k}={v}" for k, v in self.attrs.items())
        return f"{','.join(self.outputs)} = {self.op}({', '.join(map(str, self.inputs))}{'; ' + attrs if attrs else ''})"


class Graph:
    """Nodes in execution order plus the type of every value.

    `inputs` are values fed at run time (data, labels, learning rate, trainable state); `outputs`
    are what the graph returns; `constants` hold frozen arrays. `param_names` maps a value to the
    fully qualified parameter/buffer name it holds in the user's model.
    """

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.types: dict[str, TensorType] = {}
        self.constants: dict[str, np.ndarray] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.param_names: dict[str, str] = {}
        self._names: set[str] = set()
        self._counter = itertools.count()

    # -- values -------------------------------------------------------------------------------
    def fresh(self, hint: str = "v") -> str:
        """A value name not used yet, derived from `hint` so the ONNX file stays readable."""
        hint = hint or "v"
        if hint not in self._names:
            self._names.add(hint)
            return hint
        while True:
            name = f"{hint}_{next(self._counter)}"
            if name not in self._names:
                self._names.add(name)
                return name

    def add_value(self, name: str, ttype: TensorType) -> str:
        if name in self.types:
            raise ValueError(f"value {name!r} defined twice")
        self._names.add(name)
        self.types[name] = ttype
        return name

    def add_input(self, name: str, ttype: TensorType) -> str:
        self.add_value(name, ttype)
        self.inputs.append(name)
        return name

    def add_constant(self, array: np.ndarray, hint: str = "const", name: str | None = None) -> str:
        array = np.asarray(array)
        name = name if name is not None else self.fresh(hint)
        self.add_value(name, TensorType(tuple(array.shape), array.dtype.name))
        self.constants[name] = array
        return name

    # -- structure ----------------------------------------------------------------------------
    def producers(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs}

    def users(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i is not None:
                    out.setdefault(i, []).append(n)
        return out

    def copy(self) -> "Graph":
        g = Graph()
        g.nodes = [Node(n.op, list(n.inputs), list(n.outputs), dict(n.attrs), n.module, n.phase) for n in self.nodes]
        g.types = dict(self.types)
        g.constants = dict(self.constants)  # arrays are shared: passes replace, never mutate them
        g.inputs = list(self.inputs)
        g.outputs = list(self.outputs)
        g.param_names = dict(self.param_names)
        g._names = set(self._names)
        g._counter = itertools.count(next(self._counter))
        return g

    def verify(self) -> None:
        """Check SSA form and order: every input defined before use, every value defined once."""
        defined = set(self.inputs) | set(self.constants)
        for n in self.nodes:
            for i in n.inputs:
                if i is not None and i not in defined:
                    raise ValueError(f"node {n!r} uses {i!r} before it is defined")
            for o in n.outputs:
                if o in defined:
                    raise ValueError(f"value {o!r} defined twice (by {n!r})")
                if o not in self.types:
                    raise ValueError(f"value {o!r} has no type")
                defined.add(o)
        for o in self.outputs:
            if o not in defined:
                raise ValueError(f"graph output {o!r} is never defined")

    def __repr__(self) -> str:
        return "\n".join(repr(n) for n in self.nodes)
