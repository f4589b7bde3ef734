"""Data-movement ops: reshape, permute, expand, concat, slice, and ATen ops that vanish (aliases).

These move gradients without arithmetic. `permute` honours a sliced-gradient need directly (the
slice moves to the permuted axis), which is how a slice of a transposed weight stays cheap.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pockprop.ops.builder import Builder
from pockprop.ops.dtype import cast, dtype_name
from pockprop.ir import Node, TensorType
from pockprop.ops.elementwise import broadcast_shape, unbroadcast
from pockprop.ops.registry import InputGradOp, Lowering, Need, Op, Tag, aten, register


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


@register
class Reshape(Op):
    """y = reshape(x, shape);  dx = reshape(g, x.shape)."""
    name = "reshape"

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        shape = tuple(int(s) for s in attrs["shape"])
        if int(np.prod(shape)) != ins[0].numel:
            raise ValueError(f"reshape {ins[0].shape} -> {shape} changes the element count")
        return [TensorType(shape, ins[0].dtype)]

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        return [b.op("reshape", [gouts[0]], shape=list(b.type(node.inputs[0]).shape))]

    def lower(self, e: Lowering, node: Node) -> None:
        e.node("Reshape", [node.inputs[0], e.ints(node.attrs["shape"])], node.outputs)


@register
class Permute(Op):
    """y = transpose(x, perm);  dx = transpose(g, argsort(perm)); a slice of dx is a slice of g first."""
    name = "permute"
    sliceable = frozenset({0})

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        return [TensorType(tuple(ins[0].shape[p] for p in attrs["perm"]), ins[0].dtype)]

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        perm = list(node.attrs["perm"])
        g, need = gouts[0], needs[0]
        assert g is not None and need is not None
        if need.axis is not None:
            g = b.op("slice", [g], axis=perm.index(need.axis), start=need.start, stop=need.stop, step=1)
        return [b.op("permute", [g], perm=[int(i) for i in np.argsort(perm)])]

    def lower(self, e: Lowering, node: Node) -> None:
        e.node("Transpose", node.inputs, node.outputs, perm=list(node.attrs["perm"]))


@register
class Expand(Op):
    """y = broadcast_to(x, shape);  dx = g summed over the broadcast axes."""
    name = "expand"

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        return [TensorType(broadcast_shape(ins[0].shape, tuple(attrs["shape"])), ins[0].dtype)]

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        return [unbroadcast(b, gouts[0], b.type(node.inputs[0]).shape)]

    def lower(self, e: Lowering, node: Node) -> None:
        e.node("Expand", [node.inputs[0], e.ints(node.attrs["shape"])], node.outputs)


@register
class Concat(Op):
    """y = concat(xs, axis);  dx_i = g[..., offset_i : offset_i + n_i, ...]."""
    name = "concat"

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        axis = attrs["axis"]
        shape = list(ins[0].shape)
        shape[axis] = sum(t.shape[axis] for t in ins)
        return [TensorType(tuple(shape), ins[0].dtype)]

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        axis, start, grads = node.attrs["axis"], 0, []
        for x, need in zip(node.inputs, needs):
            n = b.type(x).shape[axis]
            grads.append(None if need is None else b.op("slice", [gouts[0]], axis=axis, start=start, stop=start + n, step=1))
            start += n
        return grads

    def lower(self, e: Lowering, node: Node) -> None:
        e.node("Concat", node.inputs, node.outputs, axis=node.attrs["axis"])


@register
class Slice(Op):
    """y = x[start:stop:step] along axis;  dx = zeros with g scattered back at those positions."""
    name = "slice"
    tags = frozenset({Tag.HOISTABLE})

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        shape = list(ins[0].shape)
        shape[attrs["axis"]] = len(range(attrs["start"], attrs["stop"], attrs["step"]))
        return [TensorType(tuple(shape), ins[0].dtype)]

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        return [b.op("slice_grad", [gouts[0]], input_shape=list(b.type(node.inputs[0]).shape),
                     **{k: node.attrs[k] for k in ("axis", "start", "stop", "step")})]

    def lower(self, e: Lowering, node: Node) -> None:
        a = node.attrs
        e.node("Slice", [node.inputs[0], e.ints([a["start"]]), e.ints([a["stop"]]), e.ints([a["axis"]]),
                         e.ints([a["step"]])], node.outputs)


@register
class SliceGrad(InputGradOp):
    """Backward helper of slice: zeros of input_shape with g placed at [start:stop:step] along axis."""
    name = "slice_grad"

    def lower(self, e: Lowering, node: Node) -> None:
        a, g = node.attrs, node.inputs[0]
        shape, axis = list(a["input_shape"]), a["axis"]
        if a["step"] == 1:
            pads = [0] * (2 * len(shape))
            pads[axis], pads[len(shape) + axis] = a["start"], shape[axis] - a["stop"]
            e.node("Pad", [g, e.ints(pads)], node.outputs)
            return
        # Strided slice: scatter g into zeros at the taken positions (indices known at compile time).
        gshape = e.type(g).shape
        idx = np.arange(a["start"], a["stop"], a["step"], dtype=np.int64)
        view = [1] * len(gshape)
        view[axis] = len(idx)
        indices = e.const(np.broadcast_to(idx.reshape(view), gshape), "int64", "slice_idx")
        zeros = e.const(np.zeros(shape, dtype=e.type(g).dtype), e.type(g).dtype, "zeros")
        e.node("ScatterElements", [zeros, indices, g], node.outputs, axis=axis)


# -- ATen importers -------------------------------------------------------------------------------

def _resolve_shape(b: Builder, x: str, shape: Any) -> list[int]:
    shape = [int(s) for s in shape]
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = b.type(x).numel // max(known, 1)
    return shape


@aten("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")
def _view(b: Builder, x: str, shape: Any) -> str:
    shape = _resolve_shape(b, x, shape)
    return x if tuple(shape) == b.type(x).shape else b.op("reshape", [x], shape=shape)


@aten("aten.unsqueeze.default")
def _unsqueeze(b: Builder, x: str, dim: int) -> str:
    shape = list(b.type(x).shape)
    shape.insert(_norm_axis(dim, len(shape) + 1), 1)
    return b.op("reshape", [x], shape=shape)


@aten("aten.squeeze.dims", "aten.squeeze.dim", "aten.squeeze.default")
def _squeeze(b: Builder, x: str, dims: Any = None) -> str:
    shape = b.type(x).shape
    dims = range(len(shape)) if dims is None else ([dims] if isinstance(dims, int) else dims)
    drop = {_norm_axis(d, len(shape)) for d in dims if shape[_norm_axis(d, len(shape))] == 1}
    new = [s for i, s in enumerate(shape) if i not in drop]
    return x if len(new) == len(shape) else b.op("reshape", [x], shape=new)


@aten("aten.permute.default")
def _permute(b: Builder, x: str, perm: Any) -> str:
    rank = b.type(x).rank
    return b.op("permute", [x], perm=[_norm_axis(int(p), rank) for p in perm])


@aten("aten.t.default")
def _t(b: Builder, x: str) -> str:
    return x if b.type(x).rank < 2 else b.op("permute", [x], perm=[1, 0])


@aten("aten.transpose.int")
def _transpose(b: Builder, x: str, d0: int, d1: int) -> str:
    rank = b.type(x).rank
    perm = list(range(rank))
    d0, d1 = _norm_axis(d0, rank), _norm_axis(d1, rank)
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return b.op("permute", [x], perm=perm)


@aten("aten.expand.default")
def _expand(b: Builder, x: str, shape: Any, implicit: bool = False) -> str:
    xs = b.type(x).shape
    lead = len(shape) - len(xs)
    full = [xs[i - lead] if s == -1 else int(s) for i, s in enumerate(shape)]
    return x if tuple(full) == xs else b.op("expand", [x], shape=full)


@aten("aten.cat.default")
def _cat(b: Builder, xs: Any, dim: int = 0) -> str:
    xs = [x for x in xs if b.type(x).numel > 0]  # torch allows empty pieces; ONNX Concat is stricter
    return xs[0] if len(xs) == 1 else b.op("concat", list(xs), axis=_norm_axis(dim, b.type(xs[0]).rank))


@aten("aten.slice.Tensor")
def _slice(b: Builder, x: str, dim: int = 0, start: int | None = None, end: int | None = None, step: int = 1) -> str:
    shape = b.type(x).shape
    axis = _norm_axis(dim, len(shape))
    start, stop, step = slice(start, end, step).indices(shape[axis])
    if (start, stop, step) == (0, shape[axis], 1):
        return x
    return b.op("slice", [x], axis=axis, start=start, stop=stop, step=step)


@aten("aten.split_with_sizes.default")
def _split_with_sizes(b: Builder, x: str, sizes: Any, dim: int = 0) -> list[str]:
    """Consecutive slices along dim (split and chunk decompose into this)."""
    axis, start, pieces = _norm_axis(dim, b.type(x).rank), 0, []
    for n in sizes:
        pieces.append(_slice(b, x, axis, start, start + int(n)))
        start += int(n)
    return pieces


@aten("aten.select.int")
def _select(b: Builder, x: str, dim: int, index: int) -> str:
    shape = list(b.type(x).shape)
    axis = _norm_axis(dim, len(shape))
    index = index + shape[axis] if index < 0 else index
    y = b.op("slice", [x], axis=axis, start=index, stop=index + 1, step=1)
    return b.op("reshape", [y], shape=shape[:axis] + shape[axis + 1:])


@aten("aten.clone.default", "aten.alias.default", "aten.detach.default", "aten.lift_fresh_copy.default",
      "aten.contiguous.default")
def _identity(b: Builder, x: str, *args: Any, **kwargs: Any) -> str:
    """Copies and aliases do not exist in a value graph."""
    return x


@aten("aten._to_copy.default")
def _to_copy(b: Builder, x: str, dtype: Any = None, **kwargs: Any) -> str:
    """A dtype conversion (device, layout and memory format do not exist in a value graph)."""
    return x if dtype is None else cast(b, x, dtype_name(dtype))


@aten("aten.dropout.default")
def _dropout(b: Builder, x: str, p: float = 0.5, train: bool | None = False) -> str:
    """Dropout in eval form is the identity (the compiled graph runs the model in eval form)."""
    return x


def filled(b: Builder, shape: Any, value: Any, dtype: str) -> str:
    """A tensor of `shape` holding `value`: a scalar constant expanded (constant folding decides whether
    to store the full array)."""
    fill = b.const(value, dtype, hint="fill")
    shape = [int(s) for s in shape]
    return fill if not shape else b.op("expand", [fill], shape=shape)


@aten("aten.full.default")
def _full(b: Builder, size: Any, value: Any, dtype: Any = None, **kwargs: Any) -> str:
    # torch infers the dtype from the fill value: True -> bool, 3 -> int64, 0.5 -> float32
    inferred = "bool" if isinstance(value, bool) else "int64" if isinstance(value, int) else "float32"
    return filled(b, size, value, dtype_name(dtype) if dtype is not None else inferred)


@aten("aten.scalar_tensor.default")
def _scalar_tensor(b: Builder, value: float, dtype: Any = None, **kwargs: Any) -> str:
    return b.const(value, "float32" if dtype is None else dtype_name(dtype), hint="scalar")


@aten("aten._assert_tensor_metadata.default")
def _assert_metadata(b: Builder, x: str, *args: Any, **kwargs: Any) -> None:
    """torch.export's dtype/shape assertion: our static types were already checked at import."""
    return None
