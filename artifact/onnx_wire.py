"""Read and rewrite initializers of an ONNX model at the protobuf wire level, without the onnx package.

The device needs two things from infer.onnx that onnxruntime's API does not give: the frozen value of
a parameter (to write a trained slice into it) and a copy of the model whose trainable inputs are
baked in as constants (`export_inference`). Both touch only a few fields, so instead of a protobuf
dependency this module walks the wire format and copies every field it does not change byte for byte.

It also lists the tensors whose data lives in external files (`external_tensors`), so the loader can
check those files against the manifest and hand their verified bytes to onnxruntime.

Field numbers (onnx.proto3): ModelProto 7 = graph, 14 = metadata_props, 25 = functions; GraphProto
1 = node, 5 = initializer, 11 = input, 15 = sparse_initializer; NodeProto 5 = attribute; AttributeProto
5 = t, 6 = g, 10 = tensors, 11 = graphs, 22 = sparse_tensor, 23 = sparse_tensors; SparseTensorProto
1 = values, 2 = indices; FunctionProto 7 = node; TensorProto 1 = dims, 2 = data_type, 4 = float_data,
5 = int32_data, 7 = int64_data, 8 = name, 9 = raw_data, 10 = double_data, 11 = uint64_data,
13 = external_data, 14 = data_location; ValueInfoProto 1 = name; StringStringEntryProto 1 = key, 2 = value.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from pockprop.artifact.contract import BY_ONNX
from pockprop.artifact.external import Placement, raw_bytes

MODEL_GRAPH, MODEL_METADATA = 7, 14
GRAPH_INITIALIZER, GRAPH_INPUT = 5, 11
T_DIMS, T_DATA_TYPE, T_FLOAT, T_INT32, T_INT64, T_NAME, T_RAW, T_DOUBLE, T_UINT64 = 1, 2, 4, 5, 7, 8, 9, 10, 11
T_EXTERNAL, T_LOCATION = 13, 14
_DATA_FIELDS = {T_FLOAT, T_INT32, T_INT64, T_RAW, T_DOUBLE, T_UINT64, T_EXTERNAL}
VARINT, I64, LEN, I32 = 0, 1, 2, 5

EXTERNAL = 1  # TensorProto.DataLocation of data kept in another file

# TensorProto.DataType codes of the dtypes the runtime handles (the contract's table)
DTYPES = {code: np.dtype(d.name) for code, d in BY_ONNX.items()}
CODES = {d.name: code for code, d in BY_ONNX.items()}


class WireError(ValueError):
    """The bytes are not a well-formed ONNX model, or an initializer cannot be rewritten."""


# -- wire primitives ----------------------------------------------------------------------------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | LEN) + _encode_varint(len(payload)) + payload


def fields(buf: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int | bytes, int, int]]:
    """Yield (field number, wire type, value, field start, field end) for each field of a message.

    value is the integer for VARINT/I32/I64 fields and the payload bytes for LEN fields; the
    (start, end) span covers the whole field (tag included) so unchanged fields can be copied.
    """
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        fstart = pos
        tag, pos = _varint(buf, pos)
        number, wtype = tag >> 3, tag & 7
        value: int | bytes
        if wtype == VARINT:
            value, pos = _varint(buf, pos)
        elif wtype == I64:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wtype == I32:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        elif wtype == LEN:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        else:
            raise WireError(f"unsupported wire type {wtype} at byte {fstart}")
        if pos > end or number == 0:
            raise WireError(f"malformed field at byte {fstart} (truncated model?)")
        yield number, wtype, value, fstart, pos


def _single(buf: bytes, number: int) -> bytes:
    found = [v for n, w, v, _, _ in fields(buf) if n == number and w == LEN]
    if len(found) != 1:
        raise WireError(f"expected one field {number}, found {len(found)}")
    return found[0]  # type: ignore[return-value]


def _string(buf: bytes, number: int) -> str:
    for n, w, v, _, _ in fields(buf):
        if n == number and w == LEN:
            return v.decode()  # type: ignore[union-attr]
    return ""


def _ints(wtype: int, value: int | bytes) -> list[int]:
    """A repeated int field: one unpacked element or a packed run of varints."""
    if wtype == VARINT:
        return [int(value)]  # type: ignore[arg-type]
    out, pos = [], 0
    while pos < len(value):  # type: ignore[arg-type]
        n, pos = _varint(value, pos)  # type: ignore[arg-type]
        out.append(n)
    return out


# -- tensors --------------------------------------------------------------------------------------
def _tensor(buf: bytes) -> dict[str, object]:
    """Decode the parts of a TensorProto the runtime needs: name, dims, dtype code and values."""
    info: dict[str, object] = {"name": "", "dims": [], "code": 0, "location": 0}
    data: dict[int, list[tuple[int, int | bytes]]] = {}
    dims: list[int] = []
    for number, wtype, value, _, _ in fields(buf):
        if number == T_NAME:
            info["name"] = value.decode()  # type: ignore[union-attr]
        elif number == T_DIMS:
            dims += _ints(wtype, value)
        elif number == T_DATA_TYPE:
            info["code"] = value
        elif number == T_LOCATION:
            info["location"] = value
        elif number in _DATA_FIELDS:
            data.setdefault(number, []).append((wtype, value))
    info["dims"] = dims
    info["data"] = data
    return info


def _values(info: dict[str, object]) -> np.ndarray:
    name, code, dims = info["name"], int(info["code"]), tuple(info["dims"])  # type: ignore[arg-type]
    data: dict[int, list[tuple[int, int | bytes]]] = info["data"]  # type: ignore[assignment]
    if info["location"] == EXTERNAL or T_EXTERNAL in data:
        raise WireError(f"initializer {name!r} keeps its data in an external file; this runtime reads embedded data only")
    if code not in DTYPES:
        raise WireError(f"initializer {name!r}: ONNX data type {code} is not supported")
    dtype = np.dtype(DTYPES[code]).newbyteorder("<")
    count = int(np.prod(dims, dtype=np.int64))
    if T_RAW in data:
        raw = b"".join(v for _, v in data[T_RAW])  # type: ignore[misc]
        if len(raw) != count * dtype.itemsize:
            raise WireError(f"initializer {name!r}: {len(raw)} bytes of data for shape {list(dims)}")
        return np.frombuffer(raw, dtype).reshape(dims).astype(dtype.newbyteorder("="))
    if T_FLOAT in data or T_DOUBLE in data:
        fmt, field = ("<f", T_FLOAT) if T_FLOAT in data else ("<d", T_DOUBLE)
        width = struct.calcsize(fmt)
        parts = [v.to_bytes(width, "little") if w != LEN else v for w, v in data[field]]  # type: ignore[union-attr]
        arr = np.frombuffer(b"".join(parts), fmt)  # type: ignore[arg-type]
    elif T_INT64 in data or T_INT32 in data:
        items = data.get(T_INT64) or data[T_INT32]
        ints = [i for w, v in items for i in _ints(w, v)]
        arr = np.array([i - (1 << 64) if i >= 1 << 63 else i for i in ints], np.int64)
    else:
        arr = np.zeros(0, dtype)
    if arr.size != count:
        raise WireError(f"initializer {name!r}: {arr.size} values for shape {list(dims)}")
    return arr.astype(dtype.newbyteorder("=")).reshape(dims)


def _encode_tensor(original: bytes, new: np.ndarray | Placement) -> bytes:
    """The TensorProto with its data fields replaced by raw_data holding `new` (little-endian), or by a
    reference to external data (`new` a Placement of its bytes)."""
    info = _tensor(original)
    name, code, dims = info["name"], int(info["code"]), list(info["dims"])  # type: ignore[arg-type]
    # the data fields go, and with them any external file reference
    kept = b"".join(original[s:e] for n, _, _, s, e in fields(original) if n not in _DATA_FIELDS | {T_LOCATION})
    if isinstance(new, Placement):
        nbytes = int(np.prod(dims, dtype=np.int64)) * (DTYPES[code].itemsize if code in DTYPES else 0)
        if code not in DTYPES or new.length != nbytes:
            raise WireError(f"initializer {name!r}: {new.length} bytes of external data for {list(dims)} of type {code}")
        entries = (("location", new.location), ("offset", str(new.offset)), ("length", str(new.length)))
        refs = b"".join(_len_field(T_EXTERNAL, _len_field(1, k.encode()) + _len_field(2, v.encode())) for k, v in entries)
        return kept + refs + _encode_varint(T_LOCATION << 3 | VARINT) + _encode_varint(EXTERNAL)
    if list(new.shape) != dims:
        raise WireError(f"initializer {name!r}: shape {dims}, new value has shape {list(new.shape)}")
    if CODES.get(new.dtype.name) != code:
        raise WireError(f"initializer {name!r}: ONNX data type {code}, new value is {new.dtype}")
    return kept + _len_field(T_RAW, raw_bytes(new))


# -- models ---------------------------------------------------------------------------------------
def initializers(model: bytes, names: set[str] | None = None) -> dict[str, np.ndarray]:
    """Values of the graph's initializers (those in `names`, or all)."""
    graph = _single(model, MODEL_GRAPH)
    out = {}
    for number, wtype, value, _, _ in fields(graph):
        if number == GRAPH_INITIALIZER and wtype == LEN:
            info = _tensor(value)  # type: ignore[arg-type]
            if names is None or info["name"] in names:
                out[str(info["name"])] = _values(info)
    return out


def replace_initializers(model: bytes, values: dict[str, np.ndarray | Placement], drop_inputs: bool = True,
                         metadata: dict[str, str] | None = None) -> bytes:
    """The model with the named initializers' data replaced (by a value, or by a reference to its bytes in
    an external file).

    drop_inputs: also remove those names from graph.input, so they become constants rather than
    overridable inputs (a self-contained model; onnxruntime can then constant-fold them).
    metadata: key/value pairs added to the model's metadata_props.
    """
    pending = set(values)
    out_model = bytearray()
    for number, wtype, value, start, end in fields(model):
        if number != MODEL_GRAPH or wtype != LEN:
            out_model += model[start:end]
            continue
        graph = bytearray()
        for gnum, gw, gval, gs, ge in fields(value):  # type: ignore[arg-type]
            if gnum == GRAPH_INITIALIZER and gw == LEN:
                name = _string(gval, T_NAME)  # type: ignore[arg-type]
                if name in values:
                    graph += _len_field(GRAPH_INITIALIZER, _encode_tensor(gval, values[name]))  # type: ignore[arg-type]
                    pending.discard(name)
                    continue
            elif gnum == GRAPH_INPUT and gw == LEN and drop_inputs and _string(gval, 1) in values:  # type: ignore[arg-type]
                continue
            graph += value[gs:ge]  # type: ignore[index]
        out_model += _len_field(MODEL_GRAPH, bytes(graph))
    if pending:
        raise WireError(f"no initializer named {', '.join(sorted(pending))} in the model")
    for key, val in (metadata or {}).items():
        out_model += _len_field(MODEL_METADATA, _len_field(1, key.encode()) + _len_field(2, val.encode()))
    return bytes(out_model)


def graph_inputs(model: bytes) -> list[str]:
    """Names in graph.input, in order."""
    graph = _single(model, MODEL_GRAPH)
    return [_string(v, 1) for n, w, v, _, _ in fields(graph) if n == GRAPH_INPUT and w == LEN]  # type: ignore[arg-type]


# -- graph signature --------------------------------------------------------------------------------
GRAPH_OUTPUT = 12
TYPE_TENSOR, TENSOR_ELEM, TENSOR_SHAPE, SHAPE_DIM, DIM_VALUE, DIM_PARAM = 1, 1, 2, 1, 1, 2


class ValueInfo:
    """A graph input or output as onnxruntime's NodeArg shows it: name, type ('float32', ...) and shape
    (ints, or names for symbolic dimensions)."""

    def __init__(self, name: str, type: str, shape: list[int | str]) -> None:
        self.name, self.type, self.shape = name, type, shape


def _value_info(buf: bytes) -> ValueInfo:
    name, elem, shape = _string(buf, 1), 0, []
    for n, w, tp, _, _ in fields(buf):
        if n != 2 or w != LEN:
            continue
        for n2, w2, tensor, _, _ in fields(tp):  # type: ignore[arg-type]
            if n2 != TYPE_TENSOR or w2 != LEN:
                continue
            for n3, w3, v3, _, _ in fields(tensor):  # type: ignore[arg-type]
                if n3 == TENSOR_ELEM and w3 == VARINT:
                    elem = int(v3)  # type: ignore[arg-type]
                elif n3 == TENSOR_SHAPE and w3 == LEN:
                    for n4, w4, dim, _, _ in fields(v3):  # type: ignore[arg-type]
                        if n4 == SHAPE_DIM and w4 == LEN:
                            d: int | str = "?"
                            for n5, w5, v5, _, _ in fields(dim):  # type: ignore[arg-type]
                                d = int(v5) if n5 == DIM_VALUE and w5 == VARINT else v5.decode() if n5 == DIM_PARAM else d  # type: ignore[union-attr]
                            shape.append(d)
    dtype = DTYPES[elem].name if elem in DTYPES else f"tensor({elem})"
    return ValueInfo(name, dtype, shape)


def signature(model: bytes) -> tuple[list[ValueInfo], list[ValueInfo], list[ValueInfo]]:
    """(inputs, outputs, overridable initializers) as onnxruntime's session would list them: graph inputs
    that have an initializer are overridable initializers, not inputs. Reads no tensor data."""
    graph = _single(model, MODEL_GRAPH)
    inits, ins, outs = set(), [], []
    for n, w, v, _, _ in fields(graph):
        if w != LEN:
            continue
        if n == GRAPH_INITIALIZER:
            inits.add(_string(v, T_NAME))  # type: ignore[arg-type]
        elif n == GRAPH_INPUT:
            ins.append(_value_info(v))  # type: ignore[arg-type]
        elif n == GRAPH_OUTPUT:
            outs.append(_value_info(v))  # type: ignore[arg-type]
    return [i for i in ins if i.name not in inits], outs, [i for i in ins if i.name in inits]


# -- external data ----------------------------------------------------------------------------------
GRAPH_NODE, GRAPH_SPARSE_INITIALIZER, MODEL_FUNCTIONS, FUNCTION_NODE, NODE_ATTRIBUTE = 1, 15, 25, 7, 5
ATTR_TENSORS, ATTR_GRAPHS, ATTR_SPARSE = {5, 10}, {6, 11}, {22, 23}  # AttributeProto t/tensors, g/graphs, sparse
SPARSE_PARTS = {1, 2}  # SparseTensorProto values, indices


@dataclass(frozen=True)
class ExternalTensor:
    """An initializer of the main graph whose data is `length` bytes at `offset` in file `location`."""

    name: str
    location: str
    offset: int
    length: int | None  # None: to the end of the file
    code: int
    dims: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """The size of its value (WireError for a data type this runtime does not handle)."""
        if self.code not in DTYPES:
            raise WireError(f"initializer {self.name!r}: ONNX data type {self.code} is not supported")
        return int(np.prod(self.dims, dtype=np.int64)) * DTYPES[self.code].itemsize

    def check(self, size: int) -> None:
        """WireError unless its file, of `size` bytes, holds exactly its value's bytes where it says."""
        nbytes = self.nbytes
        length = size - self.offset if self.length is None else self.length
        if length != nbytes or not 0 <= self.offset <= size - nbytes:
            raise WireError(f"initializer {self.name!r}: {length} bytes at offset {self.offset} of {self.location!r} "
                            f"({size} bytes) do not hold its {nbytes} bytes of {DTYPES[self.code]}{list(self.dims)}")

    def array(self, blob: bytes) -> np.ndarray:
        """Its value, read from the bytes of its file (a view of them, where their alignment allows)."""
        self.check(len(blob))
        dtype = DTYPES[self.code].newbyteorder("<")
        arr = np.frombuffer(blob, dtype, self.nbytes // dtype.itemsize, self.offset).reshape(self.dims)
        arr = arr.astype(dtype.newbyteorder("="), copy=False)
        return arr if arr.flags.aligned else arr.copy()


def _text(value: bytes | memoryview) -> str:
    try:
        return bytes(value).decode()
    except UnicodeDecodeError:
        raise WireError("a name is not valid UTF-8") from None


def _external_entries(tensor: memoryview) -> dict[str, str] | None:
    """A TensorProto's external_data as {key: value} if it keeps its data outside the model, else None."""
    entries: dict[str, str] = {}
    external = False
    for n, w, v, _, _ in fields(tensor):
        if n == T_LOCATION and w == VARINT:
            external = v == EXTERNAL
        elif n == T_EXTERNAL and w == LEN:
            pairs = {k: val for k, _, val, _, _ in fields(v)}  # type: ignore[arg-type]
            entries[_text(pairs.get(1, b""))] = _text(pairs.get(2, b""))  # type: ignore[arg-type]
            external = True
    return entries if external else None


def _refuse_external(tensor: memoryview, where: str) -> None:
    if _external_entries(tensor) is not None:
        raise WireError(f"{where} keeps its data in an external file; only the main graph's initializers may")


def _scan_node(node: memoryview, out: list[ExternalTensor]) -> None:
    for n, w, attr, _, _ in fields(node):
        if n != NODE_ATTRIBUTE or w != LEN:
            continue
        for an, aw, av, _, _ in fields(attr):  # type: ignore[arg-type]
            if aw != LEN:
                continue
            if an in ATTR_TENSORS:
                _refuse_external(av, "a tensor in a node attribute")  # type: ignore[arg-type]
            elif an in ATTR_GRAPHS:
                _scan_graph(av, out, main=False)  # type: ignore[arg-type]
            elif an in ATTR_SPARSE:
                for sn, sw, sv, _, _ in fields(av):  # type: ignore[arg-type]
                    if sn in SPARSE_PARTS and sw == LEN:
                        _refuse_external(sv, "a sparse tensor in a node attribute")  # type: ignore[arg-type]


def _scan_graph(graph: memoryview, out: list[ExternalTensor], main: bool) -> None:
    for n, w, v, _, _ in fields(graph):
        if w != LEN:
            continue
        if n == GRAPH_INITIALIZER:
            entries = _external_entries(v)  # type: ignore[arg-type]
            if entries is None:
                continue
            info = _tensor(bytes(v))  # small: its data is elsewhere
            if not main:
                raise WireError(f"initializer {info['name']!r} of a subgraph keeps its data in an external file; "
                                "only the main graph's initializers may")
            try:
                offset, length = int(entries.get("offset", 0)), entries.get("length")
                ref = ExternalTensor(str(info["name"]), entries.get("location", ""), offset,
                                     None if length is None else int(length), int(info["code"]),  # type: ignore[call-overload]
                                     tuple(info["dims"]))  # type: ignore[arg-type]
            except ValueError:
                raise WireError(f"initializer {info['name']!r}: malformed external data {entries}") from None
            out.append(ref)
        elif n == GRAPH_NODE:
            _scan_node(v, out)  # type: ignore[arg-type]
        elif n == GRAPH_SPARSE_INITIALIZER:
            for sn, sw, sv, _, _ in fields(v):  # type: ignore[arg-type]
                if sn in SPARSE_PARTS and sw == LEN:
                    _refuse_external(sv, "a sparse initializer")  # type: ignore[arg-type]


def external_tensors(model: bytes) -> list[ExternalTensor]:
    """Every initializer whose data the model keeps in an external file; WireError if a tensor anywhere
    else (node attributes, subgraphs, sparse tensors, functions) does. Reads no tensor data."""
    out: list[ExternalTensor] = []
    for n, w, v, _, _ in fields(memoryview(model)):
        if n == MODEL_GRAPH and w == LEN:
            _scan_graph(v, out, main=True)  # type: ignore[arg-type]
        elif n == MODEL_FUNCTIONS and w == LEN:
            for fn, fw, fv, _, _ in fields(v):  # type: ignore[arg-type]
                if fn == FUNCTION_NODE and fw == LEN:
                    _scan_node(fv, out)  # type: ignore[arg-type]
    return out
