"""Reductions: sum and mean over axes (with or without kept dims), any/all of bools, and the running sum (cumsum)."""
from __future__ import annotations

from typing import Any

from pockprop.ops.builder import Builder
from pockprop.ir import Node, TensorType
from pockprop.ops.dtype import cast, dtype_name
from pockprop.ops.registry import Lowering, Op, aten, register


def reduced_type(t: TensorType, axes: list[int], keepdim: bool) -> TensorType:
    """The type of a reduction of t over `axes`."""
    shape = [1 if i in axes else s for i, s in enumerate(t.shape)] if keepdim else \
        [s for i, s in enumerate(t.shape) if i not in axes]
    return TensorType(tuple(shape), t.dtype)


def _spread(b: Builder, g: str, x: str, axes: list[int]) -> str:
    """Broadcast a reduced gradient back over the reduced axes of x."""
    xs = b.type(x).shape
    kept = [1 if i in axes else s for i, s in enumerate(xs)]
    if b.type(g).shape != tuple(kept):
        g = b.op("reshape", [g], shape=kept)
    return b.op("expand", [g], shape=list(xs)) if tuple(kept) != xs else g


@register
class Sum(Op):
    """y = sum(x, axes);  dx = broadcast(g) over axes."""
    name = "sum"

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        return [reduced_type(ins[0], attrs["axes"], attrs["keepdim"])]

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        return [_spread(b, gouts[0], node.inputs[0], node.attrs["axes"])]

    def lower(self, e: Lowering, node: Node) -> None:
        e.node("ReduceSum", [node.inputs[0], e.ints(node.attrs["axes"])], node.outputs,
               keepdims=int(node.attrs["keepdim"]))


@register
class Mean(Op):
    """y = mean(x, axes);  dx = broadcast(g) / n over axes."""
    name = "mean"

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        return [reduced_type(ins[0], attrs["axes"], attrs["keepdim"])]

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        x = node.inputs[0]
        count = 1
        for a in node.attrs["axes"]:
            count *= b.type(x).shape[a]
        g = b.op("mul", [gouts[0], b.scalar_like(1.0 / count, x)])
        return [_spread(b, g, x, node.attrs["axes"])]

    def lower(self, e: Lowering, node: Node) -> None:
        # opset 17: ReduceMean still takes axes as an attribute (an input only from opset 18)
        e.node("ReduceMean", [node.inputs[0]], node.outputs, axes=list(node.attrs["axes"]),
               keepdims=int(node.attrs["keepdim"]))


@register
class Any(Op):
    """m = any(a, axes) (a bool; False over an empty axis);  all(a) is not any(not a)."""
    name = "any"
    differentiable = False

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        return [reduced_type(ins[0], attrs["axes"], attrs["keepdim"])]

    def lower(self, e: Lowering, node: Node) -> None:
        # opset 17 has no bool reductions; a count of the True entries is > 0 exactly when any is (0 when empty)
        count = e.node("ReduceSum", [e.node("Cast", node.inputs, to=e.onnx_dtype("int32")), e.ints(node.attrs["axes"])],
                       keepdims=int(node.attrs["keepdim"]))
        e.node("Greater", [count, e.const(0, "int32")], node.outputs)


@register
class ArgMax(Op):
    """i = index of the first largest x along axis (int64, no gradient); argmin is argmax of -x."""
    name = "argmax"
    differentiable = False

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        return [TensorType(reduced_type(ins[0], [attrs["axis"]], attrs["keepdim"]).shape, "int64")]

    def lower(self, e: Lowering, node: Node) -> None:
        e.node("ArgMax", node.inputs, node.outputs, axis=node.attrs["axis"], keepdims=int(node.attrs["keepdim"]))


@register
class CumSum(Op):
    """y = running sum of x along axis;  dx = running sum of g along axis, from the end."""
    name = "cumsum"

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        return [ins[0]]

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        return [b.op("cumsum", [gouts[0]], axis=node.attrs["axis"], reverse=not node.attrs.get("reverse", False))]

    def lower(self, e: Lowering, node: Node) -> None:
        e.node("CumSum", [node.inputs[0], e.const(node.attrs["axis"], "int64")], node.outputs,
               reverse=int(node.attrs.get("reverse", False)))


def dims_to_axes(b: Builder, x: str, dims: Any) -> list[int]:
    """torch's `dim` argument (an int, a list, or None/[] for all) as sorted non-negative axes."""
    rank = b.type(x).rank
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(rank))
    dims = [dims] if isinstance(dims, int) else dims
    return sorted(d + rank if d < 0 else d for d in dims)


@aten("aten.sum.dim_IntList")
def _sum(b: Builder, x: str, dims: Any = None, keepdim: bool = False, dtype: Any = None) -> str:
    return b.op("sum", [x], axes=dims_to_axes(b, x, dims), keepdim=bool(keepdim))


@aten("aten.sum.default")
def _sum_all(b: Builder, x: str, dtype: Any = None) -> str:
    return b.op("sum", [x], axes=dims_to_axes(b, x, None), keepdim=False)


@aten("aten.mean.dim")
def _mean(b: Builder, x: str, dims: Any = None, keepdim: bool = False, dtype: Any = None) -> str:
    return b.op("mean", [x], axes=dims_to_axes(b, x, dims), keepdim=bool(keepdim))


@aten("aten.mean.default")
def _mean_all(b: Builder, x: str, dtype: Any = None) -> str:
    return b.op("mean", [x], axes=dims_to_axes(b, x, None), keepdim=False)


@aten("aten.cumsum.default")
def _cumsum(b: Builder, x: str, dim: int, dtype: Any = None) -> str:
    src = b.type(x).dtype
    # torch sums bool and integer inputs as int64 unless told otherwise
    want = dtype_name(dtype) if dtype is not None else ("int64" if not src.startswith("float") else src)
    x = cast(b, x, want)
    if b.type(x).rank == 0:
        return x
    return b.op("cumsum", [x], axis=dim + b.type(x).rank if dim < 0 else dim)


@aten("aten.argmax.default")
def _argmax(b: Builder, x: str, dim: int | None = None, keepdim: bool = False) -> str:
    if dim is None:  # over the flattened tensor
        x, dim, keepdim = b.op("reshape", [x], shape=[b.type(x).numel]), 0, False
    if b.type(x).rank == 0:
        return b.const(0, "int64")
    return b.op("argmax", [x], axis=dims_to_axes(b, x, dim)[0], keepdim=bool(keepdim))


@aten("aten.argmin.default")
def _argmin(b: Builder, x: str, dim: int | None = None, keepdim: bool = False) -> str:
    return _argmax(b, b.op("neg", [x]), dim, keepdim)


@aten("aten.any.dim", "aten.any.dims", "aten.any.default")
def _any(b: Builder, x: str, dims: Any = None, keepdim: bool = False) -> str:
    return b.op("any", [cast(b, x, "bool")], axes=dims_to_axes(b, x, dims), keepdim=bool(keepdim))


@aten("aten.all.dim", "aten.all.dims", "aten.all.default")
def _all(b: Builder, x: str, dims: Any = None, keepdim: bool = False) -> str:
    negated = b.op("logical_not", [cast(b, x, "bool")])
    return b.op("logical_not", [b.op("any", [negated], axes=dims_to_axes(b, x, dims), keepdim=bool(keepdim))])

