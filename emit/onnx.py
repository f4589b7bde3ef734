"""Emission: IR graph -> ONNX model (standard domain only, opset 17, IR version 8).

Each IR op lowers itself through the small `Emitter` API below (the `Lowering` protocol of
ops/registry.py); this file only walks the graph, turns constants into initializers and writes the graph
signature. Node names carry the module path and phase so a graph opened in Netron, or a profile of it,
reads in the user's own names: `node_name` builds them and `split_node_name` reads them back.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pockprop.artifact.contract import BY_NAME
from pockprop.artifact.external import MIN_BYTES, ExternalArrays
from pockprop.errors import CompileError
from pockprop.ir import Graph, Node, Phase, TensorType
from pockprop.ops.registry import get_op

OPSET = 17
IR_VERSION = 8  # onnxruntime >= 1.10 loads IR 8; newer onnx would write a higher one by default
TOP = "model"  # how node names spell the top-level module


def onnx_dtype(dtype: str) -> int:
    """The ONNX TensorProto.DataType of an IR dtype name (the artifact contract's dtype table)."""
    if dtype not in BY_NAME:
        raise CompileError(f"dtype {dtype} has no ONNX type here; supported: {', '.join(BY_NAME)}")
    return BY_NAME[dtype].onnx


def node_place(module: str, phase: Phase) -> tuple[str, Phase]:
    """Where node names put a node: its module (TOP for the top level) and its phase, loss work
    counting as forward work."""
    return module or TOP, Phase.FORWARD if phase.is_forward else phase


def node_name(module: str, phase: Phase, op_type: str) -> str:
    """'features.3.conv.0/Conv' for forward and loss work, 'features.3.conv.0/backward/ConvTranspose' for
    gradient work, 'features.3.conv.0/optimizer/Sub' for its update (before any uniqueness suffix)."""
    where, phase = node_place(module, phase)
    return f"{where}/{op_type}" if phase is Phase.FORWARD else f"{where}/{phase}/{op_type}"


def split_node_name(name: str) -> tuple[str, Phase]:
    """(module, phase) of an emitted node name; forward and loss work both read back as FORWARD."""
    where = name.rsplit("/", 1)[0]
    for phase in (Phase.BACKWARD, Phase.OPTIMIZER):
        if where.endswith(f"/{phase}"):
            return where[: -len(phase) - 1], phase
    return where, Phase.FORWARD


class Emitter:
    """What a lowering sees: add ONNX nodes, constants and fresh names, look up IR types."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, np.ndarray] = {}
        self._taken: set[str] = set(graph.types)
        self._node_names: set[str] = set()
        self._const_cache: dict[tuple[Any, ...], str] = {}
        self.current: Node | None = None

    def type(self, value: str) -> TensorType:
        return self.graph.types[value]

    def fresh(self, hint: str) -> str:
        name, i = hint, 0
        while name in self._taken:
            i += 1
            name = f"{hint}_{i}"
        self._taken.add(name)
        return name

    def node(self, op_type: str, inputs: list[str | None], outputs: list[str] | str | None = None,
             n_out: int = 1, **attrs: Any) -> Any:
        """Add one ONNX node; returns its output name (or list of names when n_out > 1)."""
        if outputs is None:
            base = self.current.outputs[0] if self.current is not None else "t"
            outputs = [self.fresh(f"{base}/{op_type}") for _ in range(n_out)]
        elif isinstance(outputs, str):
            outputs = [outputs]
        module, phase = (self.current.module, self.current.phase) if self.current is not None else ("", Phase.FORWARD)
        name = self._unique_node_name(node_name(module, phase, op_type))
        ins = ["" if i is None else i for i in inputs]
        while ins and ins[-1] == "":  # trailing absent optionals are simply left out
            ins.pop()
        self.nodes.append(helper.make_node(op_type, ins, list(outputs), name=name,
                                           **{k: v for k, v in attrs.items() if v is not None}))
        return outputs[0] if len(outputs) == 1 else list(outputs)

    def const(self, value: Any, dtype: str = "float32", hint: str = "const") -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.name, arr.shape, arr.tobytes()) if arr.size <= 16 else None
        if key is not None and key in self._const_cache:
            return self._const_cache[key]
        name = self.fresh(hint)
        self.initializers[name] = arr
        if key is not None:
            self._const_cache[key] = name
        return name

    def ints(self, values: Any) -> str:
        """An int64 1-D constant (axes, shapes, starts...)."""
        return self.const(list(values), "int64", "ints")

    def onnx_dtype(self, dtype: str) -> int:
        return onnx_dtype(dtype)

    def is_constant(self, value: str) -> bool:
        """Known at compile time (stored in the file), not fed at run time."""
        return value in self.graph.constants and value not in self.graph.inputs

    def is_used(self, value: str) -> bool:
        """Read by a node of the graph, or returned by it."""
        return bool(self.graph.uses(value)) or value in self.graph.outputs

    def _unique_node_name(self, base: str) -> str:
        name, i = base, 0
        while name in self._node_names:
            i += 1
            name = f"{base}_{i}"
        self._node_names.add(name)
        return name


def _tensor(array: np.ndarray, name: str, external: ExternalArrays | None) -> onnx.TensorProto:
    if external is not None and array.nbytes >= MIN_BYTES:
        t = onnx.TensorProto(name=name, dims=array.shape, data_type=onnx_dtype(array.dtype.name),
                             data_location=onnx.TensorProto.EXTERNAL)
        where = external.add(array)
        for key, value in (("location", where.location), ("offset", where.offset), ("length", where.length)):
            t.external_data.add(key=key, value=str(value))
        return t
    # np.ascontiguousarray would turn a rank-0 array into rank 1; np.asarray(order="C") keeps the rank and
    # copies only an array that is not C-contiguous (from_array copies the bytes into the message anyway)
    return numpy_helper.from_array(np.asarray(array, order="C"), name)


def to_onnx(graph: Graph, name: str = "pockprop", input_defaults: dict[str, np.ndarray] | None = None,
            doc: str = "", external: ExternalArrays | None = None) -> onnx.ModelProto:
    """Lower `graph` to an ONNX model. `input_defaults` become initializers of same-named inputs
    (overridable at run time), which is how infer.onnx takes fine-tuned weights optionally.

    external: where initializers of MIN_BYTES and more go instead of the message (ONNX external data;
    artifact/external.py): the model then refers to the arrays (held by `external`) without copying them."""
    e = Emitter(graph)
    for node in graph.nodes:
        e.current = node
        get_op(node.op).lower(e, node)
    e.current = None

    used = {i for n in e.nodes for i in n.input} | set(graph.outputs)
    inits = [_tensor(a, n, external) for n, a in graph.constants.items() if n in used]
    inits += [_tensor(a, n, external) for n, a in e.initializers.items()]
    for n, a in (input_defaults or {}).items():
        inits.append(_tensor(a, n, external))

    def vi(v: str) -> onnx.ValueInfoProto:
        t = graph.types[v]
        return helper.make_tensor_value_info(v, onnx_dtype(t.dtype), list(t.shape))

    outputs = [vi(o) for o in graph.outputs]
    g = helper.make_graph(e.nodes, name, [vi(i) for i in graph.inputs], outputs, initializer=inits, doc_string=doc)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pockprop")
    model.ir_version = IR_VERSION
    return model


__all__ = ["Emitter", "to_onnx", "OPSET", "IR_VERSION", "TOP", "onnx_dtype", "node_place", "node_name", "split_node_name",
           "TensorProto"]
