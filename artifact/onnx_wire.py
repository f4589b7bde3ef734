"""Read and rewrite initializers of an ONNX model at the protobuf wire level, without the onnx package.

The device needs two things from infer.onnx that onnxruntime's API does not give: the frozen value of
a parameter (to write a trained slice into it) and a copy of the model whose trainable inputs are
baked in as constants (`export_inference`). Both touch only a few fields, so instead of a protobuf
dependency this module walks the wire format and copies every field it does not change byte for byte.

Field numbers (onnx.proto3): ModelProto 7 = graph, 14 = metadata_props; GraphProto 5 = initializer,
11 = input; TensorProto 1 = dims, 2 = data_type, 4 = float_data, 5 = int32_data, 7 = int64_data,
8 = name, 9 = raw_data, 10 = double_data, 11 = uint64_data, 13 = external_data, 14 = data_location;
ValueInfoProto 1 = name; StringStringEntryProto 1 = key, 2 = value.
"""
from __future__ import annotations

import struct
from typing import Iterator

import numpy as np

from pockprop.artifact.contract import BY_ONNX

MODEL_GRAPH, MODEL_METADATA = 7, 14
GRAPH_INITIALIZER, GRAPH_INPUT = 5, 11
T_DIMS, T_DATA_TYPE, T_FLOAT, T_INT32, T_INT64, T_NAME, T_RAW, T_DOUBLE, T_UINT64 = 1, 2, 4, 5, 7, 8, 9, 10, 11
T_EXTERNAL, T_LOCATION = 13, 14
_DATA_FIELDS = {T_FLOAT, T_INT32, T_INT64, T_RAW, T_DOUBLE, T_UINT64, T_EXTERNAL}
VARINT, I64, LEN, I32 = 0, 1, 2, 5

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
    if info["location"] == 1 or T_EXTERNAL in data:
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


def _encode_tensor(original: bytes, new: np.ndarray) -> bytes:
    """The TensorProto with its data fields replaced by raw_data holding `new` (little-endian)."""
    info = _tensor(original)
    name, code, dims = info["name"], int(info["code"]), list(info["dims"])  # type: ignore[arg-type]
    if info["location"] == 1:
        raise WireError(f"initializer {name!r} keeps its data in an external file; cannot rewrite it")
    if list(new.shape) != dims:
        raise WireError(f"initializer {name!r}: shape {dims}, new value has shape {list(new.shape)}")
    if CODES.get(new.dtype.name) != code:
        raise WireError(f"initializer {name!r}: ONNX data type {code}, new value is {new.dtype}")
    kept = b"".join(original[s:e] for n, _, _, s, e in fields(original) if n not in _DATA_FIELDS)
    raw = np.ascontiguousarray(new, new.dtype.newbyteorder("<")).tobytes()
    return kept + _len_field(T_RAW, raw)


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


def replace_initializers(model: bytes, values: dict[str, np.ndarray], drop_inputs: bool = True,
                         metadata: dict[str, str] | None = None) -> bytes:
    """The model with the named initializers' data replaced.

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
