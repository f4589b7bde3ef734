"""Indexing with integer tensors (embedding, take, gather, advanced indexing) and selection (where).

Indices are data (token ids, positions, labels), never differentiated. The gradient of a gather is a
scatter-add of the cotangent into zeros: rows picked twice get both contributions, as in torch, and an
embedding's padding row gets none. Zeros are built as an Expand of a scalar, so a large vocabulary's
gradient buffer is not stored in the file.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pockprop.errors import UnsupportedVariant
from pockprop.ir import Node, TensorType
from pockprop.ops.builder import Builder
from pockprop.ops.dtype import cast, dtype_name, promote
from pockprop.ops.elementwise import broadcast_shape, unbroadcast
from pockprop.ops.shape import filled
from pockprop.ops.registry import InputGradOp, Lowering, Need, Op, aten, register


def _zeros(e: Lowering, shape: tuple[int, ...], dtype: str) -> str:
    return e.node("Expand", [e.const(0, dtype), e.ints(shape)])


class _Gather(Op):
    """y = a gather of x at integer indices idx (inputs x, idx); its VJP is `grad_op`, a scatter-add."""

    onnx_op = grad_op = ""

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        x, idx = node.inputs
        return [b.op(self.grad_op, [gouts[0], idx], input_shape=list(b.type(x).shape), **node.attrs), None]

    def lower(self, e: Lowering, node: Node) -> None:
        e.node(self.onnx_op, node.inputs, node.outputs, **node.attrs)


@register
class Take(_Gather):
    """y = x.take(idx, axis): x's axis replaced by idx's axes (ONNX Gather);  dx = g scatter-added at idx."""
    name, onnx_op, grad_op = "take", "Gather", "take_grad"

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        x, idx, axis = ins[0], ins[1], attrs["axis"]
        return [TensorType(x.shape[:axis] + idx.shape + x.shape[axis + 1:], x.dtype)]

    def lower(self, e: Lowering, node: Node) -> None:
        e.node("Gather", node.inputs, node.outputs, axis=node.attrs["axis"])  # padding_idx matters to the VJP only


@register
class Embedding(Take):
    """y = W[idx] (rows of W);  dW = g scatter-added at idx, nothing for idx == padding_idx."""
    name = "embedding"


@register
class TakeGrad(InputGradOp):
    """Backward helper of take: zeros of input_shape, g added at idx along axis (skipping padding_idx)."""
    name = "take_grad"

    def lower(self, e: Lowering, node: Node) -> None:
        g, idx = node.inputs
        a = node.attrs
        shape, axis, dt = tuple(a["input_shape"]), a["axis"], e.type(g).dtype
        if a.get("padding_idx") is not None:
            pad = e.node("Equal", [idx, e.const(a["padding_idx"], e.type(idx).dtype)])
            lead = e.type(idx).rank
            pad = e.node("Unsqueeze", [pad, e.ints(range(lead, lead + len(shape) - 1 - axis))]) \
                if len(shape) - 1 - axis else pad
            g = e.node("Where", [pad, e.const(0, dt), g])
        if axis == 0:  # rows: one index per row of g, ScatterND adds whole rows
            e.node("ScatterND", [_zeros(e, shape, dt), e.node("Unsqueeze", [idx, e.ints([-1])]), g], node.outputs,
                   reduction="add")
            return
        # an inner axis: flatten idx into that axis and add element by element
        n = e.type(idx).numel
        flat = shape[:axis] + (n,) + shape[axis + 1:]
        view = [1] * len(shape)
        view[axis] = n
        spread = e.node("Expand", [e.node("Reshape", [idx, e.ints(view)]), e.ints(flat)])
        e.node("ScatterElements", [_zeros(e, shape, dt), spread, e.node("Reshape", [g, e.ints(flat)])], node.outputs,
               axis=axis, reduction="add")


@register
class GatherND(_Gather):
    """y[b...] = x[idx[b..., 0], ..., idx[b..., m-1]] (ONNX GatherND);  dx = g scatter-added at idx."""
    name, onnx_op, grad_op = "gather_nd", "GatherND", "gather_nd_grad"

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        x, idx = ins
        return [TensorType(idx.shape[:-1] + x.shape[idx.shape[-1]:], x.dtype)]


class _ScatterAdd(InputGradOp):
    """g added into zeros of input_shape at idx by one ONNX scatter with reduction add."""

    onnx_op = ""

    def lower(self, e: Lowering, node: Node) -> None:
        g, idx = node.inputs
        zeros = _zeros(e, tuple(node.attrs["input_shape"]), e.type(g).dtype)
        e.node(self.onnx_op, [zeros, idx, g], node.outputs, reduction="add", axis=node.attrs.get("axis"))


@register
class GatherNDGrad(_ScatterAdd):
    """Backward helper of gather_nd: zeros of input_shape with g added at idx (ScatterND, reduction add)."""
    name, onnx_op = "gather_nd_grad", "ScatterND"


@register
class TakeAlongAxis(_Gather):
    """y[..i..] = x[..idx[..i..]..] along axis (torch.gather, ONNX GatherElements);  dx = g scatter-added at idx."""
    name, onnx_op, grad_op = "take_along_axis", "GatherElements", "take_along_axis_grad"

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        return [TensorType(ins[1].shape, ins[0].dtype)]


@register
class TakeAlongAxisGrad(_ScatterAdd):
    """Backward helper of take_along_axis: zeros of input_shape with g added at idx (ScatterElements, add)."""
    name, onnx_op = "take_along_axis_grad", "ScatterElements"


@register
class Where(Op):
    """y = a where m else b (broadcasting);  da = g where m else 0,  db = g where not m else 0."""
    name = "where"

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        m, a, c = ins
        return [TensorType(broadcast_shape(broadcast_shape(m.shape, a.shape), c.shape), a.dtype)]

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        m, a, c = node.inputs
        g = gouts[0]
        da = unbroadcast(b, b.op("masked", [g, m]), b.type(a).shape) if needs[1] else None
        dc = unbroadcast(b, b.op("masked", [g, b.op("logical_not", [m])]), b.type(c).shape) if needs[2] else None
        return [None, da, dc]

    def lower(self, e: Lowering, node: Node) -> None:
        e.node("Where", node.inputs, node.outputs)


# -- ATen importers -------------------------------------------------------------------------------

def _axis(b: Builder, x: str, dim: int) -> int:
    return dim + b.type(x).rank if dim < 0 else dim


@aten("aten.embedding.default")
def _embedding(b: Builder, w: str, idx: str, padding_idx: int = -1, scale_grad_by_freq: bool = False,
               sparse: bool = False) -> str:
    if scale_grad_by_freq:
        raise UnsupportedVariant("scale_grad_by_freq=True is not supported")
    # `sparse` only changes the layout of torch's gradient, not its value
    pad = None if padding_idx is None or padding_idx < 0 else int(padding_idx)
    return b.op("embedding", [w, idx], axis=0, padding_idx=pad)


@aten("aten.gather.default")
def _gather(b: Builder, x: str, dim: int, idx: str, sparse_grad: bool = False) -> str:
    if b.type(x).rank == 0:
        return x  # torch allows a 0-d gather, whose only index is 0
    return b.op("take_along_axis", [x, idx], axis=_axis(b, x, dim))


@aten("aten.index.Tensor")
def _index(b: Builder, x: str, indices: Any) -> str:
    """x[..., i, j, ...] with integer index tensors (None for the axes taken whole), as torch orders the result."""
    at = [k for k, i in enumerate(indices) if i is not None]
    if any(b.type(indices[k]).dtype == "bool" for k in at):
        raise UnsupportedVariant("boolean mask indexing (its result's shape depends on the data)")
    if len(at) == 1:  # one index tensor: a plain gather along that axis
        return b.op("take", [x, indices[at[0]]], axis=at[0])
    rank, m = b.type(x).rank, len(at)
    shape = tuple(int(s) for s in np.broadcast_shapes(*(b.type(indices[k]).shape for k in at)))
    rest = [k for k in range(rank) if k not in at]
    if at != list(range(m)):
        x = b.op("permute", [x], perm=at + rest)
    stacked = [b.op("reshape", [_expand_to(b, cast(b, indices[k], "int64"), shape)], shape=[*shape, 1]) for k in at]
    y = b.op("gather_nd", [x, b.op("concat", stacked, axis=len(shape))])
    # torch puts the broadcast index axes where the indexed axes were when those are adjacent, else first
    first = at[0]
    if at == list(range(first, first + m)) and first > 0:
        nb = len(shape)
        perm = list(range(nb, nb + first)) + list(range(nb)) + list(range(nb + first, nb + len(rest)))
        y = b.op("permute", [y], perm=perm)
    return y


def _expand_to(b: Builder, v: str, shape: tuple[int, ...]) -> str:
    return v if b.type(v).shape == shape else b.op("expand", [v], shape=list(shape))


@aten("aten.where.self")
def _where(b: Builder, m: str, a: str, c: str) -> str:
    dt = promote(b.type(a).dtype, b.type(c).dtype)
    return b.op("where", [cast(b, m, "bool"), cast(b, a, dt), cast(b, c, dt)])


@aten("aten.full_like.default")
def _full_like(b: Builder, x: str, value: float, dtype: Any = None, **kwargs: Any) -> str:
    return filled(b, b.type(x).shape, value, dtype_name(dtype) if dtype is not None else b.type(x).dtype)


@aten("aten.arange.start_step", "aten.arange.start", "aten.arange.default")
def _arange(b: Builder, *bounds: float, dtype: Any = None, **kwargs: Any) -> str:
    """A constant: its arguments are python numbers in an exported graph."""
    values = np.arange(*bounds)
    name = dtype_name(dtype) if dtype is not None else ("int64" if values.dtype.kind in "iu" else "float32")
    return b.const(values, name, hint="arange")
