"""pockprop's IR: a flat, topologically ordered list of nodes over named SSA values.

A value is a string name with a `TensorType` (static shape, dtype). A node is one op application
(`op`, input value names, output value names, attributes, the module path it came from, the phase of
the step that built it). Constants (frozen weights, literals) are values with an array in
`Graph.constants`. The forward graph, the backward graph and the optimizer update all live in this one
IR, so every pass and the ONNX emitter see them alike.

What stays true:
- A `Node` is immutable and has identity: two nodes are equal only if they are the same object, so nodes
  are dict keys and set members. A change is a new node (`node.replace(...)`) swapped in by the graph.
- The graph keeps def-use: `producer(v)` and `uses(v)` are always those of the current node list,
  because every change of the node list goes through the graph (`append`, `nodes = ...`, `replace_node`,
  `replace_all_uses`, `rename_value`).
- Graph inputs carry a `Role` recorded when they are created (data, label, hyperparameter, parameter,
  optimizer state); so do the updated state tensors the step returns. Every other value's role follows
  from what produced it (a constant, or the phase of its producer).
"""
from __future__ import annotations

import dataclasses
import enum
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np


class _Named(str, enum.Enum):
    """A str-valued enum that prints and formats as its value (node names and JSON use it)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    def __hash__(self) -> int:  # as the plain string's, so "forward" and Phase.FORWARD are one dict key
        return hash(self.value)


class Phase(_Named):
    """Which part of the training step built a node."""

    FORWARD = "forward"
    LOSS = "loss"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"

    @property
    def is_forward(self) -> bool:
        """Runs in the forward sweep (the model and its loss), before any gradient exists."""
        return self in (Phase.FORWARD, Phase.LOSS)


class Role(_Named):
    """What a value is in the training step."""

    DATA = "data"  # a model input fed at run time
    LABEL = "label"
    HYPERPARAMETER = "hyperparameter"  # the learning rate
    PARAMETER = "parameter"  # a trained tensor (or slice), fed at run time, and its updated value
    OPTIMIZER_STATE = "optimizer_state"  # momentum, Adam moments, step counter, and their updated values
    CONSTANT = "constant"  # frozen weights and literals, stored in the file
    ACTIVATION = "activation"  # computed in the forward sweep
    GRADIENT = "gradient"  # computed by the backward pass
    UPDATE = "update"  # temporaries of the optimizer update

    @property
    def is_state(self) -> bool:
        return self in (Role.PARAMETER, Role.OPTIMIZER_STATE)


_ROLE_OF_PHASE = {Phase.FORWARD: Role.ACTIVATION, Phase.LOSS: Role.ACTIVATION, Phase.BACKWARD: Role.GRADIENT,
                  Phase.OPTIMIZER: Role.UPDATE}


def module_of(name: str) -> str:
    """The module path a parameter or buffer belongs to: 'features.3.conv.0.weight' -> 'features.3.conv.0',
    'weight' (a parameter of the top-level module) -> ''."""
    return name.rsplit(".", 1)[0] if "." in name else ""


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


@dataclass(frozen=True, eq=False)
class Node:
    """One op application. Immutable, compared and hashed by identity; `attrs` must not be mutated."""

    op: str
    inputs: tuple[str | None, ...]  # None marks an absent optional input (e.g. a conv without bias)
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    module: str = ""  # module path in the user's model ("features.3.conv.1"), "" for top level
    phase: Phase = Phase.FORWARD

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "phase", Phase(self.phase))

    def replace(self, **changes: Any) -> "Node":
        """This node with `changes` applied; the same object when nothing changes."""
        if all(getattr(self, k) == (tuple(v) if k in ("inputs", "outputs") else v) for k, v in changes.items()):
            return self
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        attrs = ", ".join(f"{k}={v}" for k, v in self.attrs.items())
        return f"{','.join(self.outputs)} = {self.op}({', '.join(map(str, self.inputs))}{'; ' + attrs if attrs else ''})"


class Graph:
    """Nodes in execution order, the type of every value, and def-use.

    `inputs` are values fed at run time (data, labels, learning rate, trainable state); `outputs`
    are what the graph returns; `constants` hold frozen arrays. `param_names` maps a value to the
    fully qualified parameter/buffer name it holds in the user's model.
    """

    def __init__(self) -> None:
        self._nodes: list[Node] = []
        self._view: tuple[Node, ...] | None = ()
        self._producer: dict[str, Node] = {}
        self._uses: dict[str, list[Node]] = {}
        self._pos: dict[Node, int] | None = {}
        self.types: dict[str, TensorType] = {}
        self.constants: dict[str, np.ndarray] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.param_names: dict[str, str] = {}
        self.roles: dict[str, Role] = {}  # recorded roles: graph inputs and the updated state outputs
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

    def add_input(self, name: str, ttype: TensorType, role: Role = Role.DATA) -> str:
        self.add_value(name, ttype)
        self.inputs.append(name)
        self.roles[name] = role
        return name

    def add_constant(self, array: np.ndarray, hint: str = "const", name: str | None = None) -> str:
        array = np.asarray(array)
        name = name if name is not None else self.fresh(hint)
        self.add_value(name, TensorType(tuple(array.shape), array.dtype.name))
        self.constants[name] = array
        return name

    def lift(self, name: str, role: Role) -> np.ndarray:
        """Make constant `name` a graph input fed at run time (same name and type); returns its array."""
        array = self.constants.pop(name)
        self.inputs.append(name)
        self.roles[name] = role
        return array

    def role(self, value: str) -> Role:
        """The recorded role of `value`, else what its origin says (a constant, or its producer's phase)."""
        if value in self.roles:
            return self.roles[value]
        if value in self.constants:
            return Role.CONSTANT
        producer = self._producer.get(value)
        if producer is None:
            raise KeyError(f"value {value!r} has no role: not an input, constant or node output")
        return _ROLE_OF_PHASE[producer.phase]

    # -- nodes and def-use --------------------------------------------------------------------
    @property
    def nodes(self) -> tuple[Node, ...]:
        if self._view is None:
            self._view = tuple(self._nodes)
        return self._view

    @nodes.setter
    def nodes(self, nodes: Iterable[Node]) -> None:
        """Replace the node list (a reorder, or a pass's new list); def-use is rebuilt from it."""
        self._nodes = list(nodes)
        self._producer, self._uses = {}, {}
        for n in self._nodes:
            self._index(n)
        self._changed()

    def append(self, node: Node) -> Node:
        self._nodes.append(node)
        self._index(node)
        if self._pos is not None:
            self._pos[node] = len(self._nodes) - 1
        self._view = None
        return node

    def insert(self, index: int, nodes: Sequence[Node]) -> None:
        self._nodes[index:index] = list(nodes)
        for n in nodes:
            self._index(n)
        self._changed()

    def replace_node(self, old: Node, new: Node) -> None:
        """Put `new` where `old` is (same position); def-use follows."""
        if new is old:
            return
        k = self.position(old)
        self._unindex(old)
        self._nodes[k] = new
        self._index(new)
        self._view = None
        if self._pos is not None:
            del self._pos[old]
            self._pos[new] = k

    def producer(self, value: str) -> Node | None:
        """The node that defines `value` (None for inputs and constants)."""
        return self._producer.get(value)

    def uses(self, value: str) -> list[Node]:
        """The nodes that read `value`, in graph order (a node reading it twice is listed once)."""
        users = self._uses.get(value, [])
        return sorted(dict.fromkeys(users), key=self.position) if len(users) > 1 else list(users)

    def position(self, node: Node) -> int:
        if self._pos is None:
            self._pos = {n: k for k, n in enumerate(self._nodes)}
        try:
            return self._pos[node]
        except KeyError:
            raise ValueError(f"node {node!r} is not in the graph") from None

    def replace_all_uses(self, old: str, new: str) -> None:
        """Every reader of `old` (nodes, and the graph's outputs) reads `new` instead."""
        for user in self.uses(old):
            self.replace_node(user, user.replace(inputs=[new if i == old else i for i in user.inputs]))
        self.outputs = [new if o == old else o for o in self.outputs]

    def rename_value(self, old: str, new: str) -> None:
        """Give value `old` the name `new` everywhere: its producer, readers, type, role, inputs, outputs."""
        if new in self.types:
            raise ValueError(f"cannot rename {old!r} to {new!r}: that name is taken")
        self.add_value(new, self.types.pop(old))
        producer = self._producer.get(old)
        if producer is not None:
            self.replace_node(producer, producer.replace(outputs=[new if o == old else o for o in producer.outputs]))
        self.replace_all_uses(old, new)
        self.inputs = [new if i == old else i for i in self.inputs]
        if old in self.roles:
            self.roles[new] = self.roles.pop(old)
        if old in self.constants:
            self.constants[new] = self.constants.pop(old)

    def _index(self, node: Node) -> None:
        for o in node.outputs:
            self._producer[o] = node
        for i in node.inputs:
            if i is not None:
                self._uses.setdefault(i, []).append(node)

    def _unindex(self, node: Node) -> None:
        for o in node.outputs:
            if self._producer.get(o) is node:
                del self._producer[o]
        for i in node.inputs:
            if i is not None:
                users = self._uses[i]
                users.remove(node)
                if not users:
                    del self._uses[i]

    def _changed(self) -> None:
        self._view = None
        self._pos = None

    # -- whole graph --------------------------------------------------------------------------
    def copy(self) -> "Graph":
        """A graph that can be changed without changing this one (nodes are immutable, so shared;
        constant arrays are shared too: passes replace them, never write into them)."""
        g = Graph()
        g._nodes = list(self._nodes)
        g._producer = dict(self._producer)
        g._uses = {v: list(u) for v, u in self._uses.items()}
        g._pos = None
        g._view = self._view
        g.types = dict(self.types)
        g.constants = dict(self.constants)
        g.inputs = list(self.inputs)
        g.outputs = list(self.outputs)
        g.param_names = dict(self.param_names)
        g.roles = dict(self.roles)
        g._names = set(self._names)
        g._counter = itertools.count(next(self._counter))
        return g

    def verify(self) -> None:
        """Check SSA form and order (every input defined before use, every value defined once and typed),
        recorded roles on every graph input, and that def-use matches the node list."""
        defined = set(self.inputs) | set(self.constants)
        for i in self.inputs:
            if i not in self.roles:
                raise ValueError(f"graph input {i!r} has no recorded role")
        for n in self._nodes:
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
        producer = {o: n for n in self._nodes for o in n.outputs}
        uses: dict[str, list[Node]] = {}
        for n in self._nodes:
            for i in n.inputs:
                if i is not None:
                    uses.setdefault(i, []).append(n)
        if producer != self._producer or {v: sorted(map(id, u)) for v, u in uses.items()} != \
                {v: sorted(map(id, u)) for v, u in self._uses.items()}:
            raise ValueError("def-use index out of date with the node list (a node changed behind the graph's back)")

    def __repr__(self) -> str:
        return "\n".join(repr(n) for n in self._nodes)
