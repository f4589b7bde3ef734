"""Reductions: sum and mean over axes (with or without kept dims)."""
from __future__ import annotations

from typing import Any

from pockprop.ops.builder import Builder
from pockprop.ir import Node, TensorType
from pockprop.ops.registry import Lowering, Op, aten, register


def _reduced(t: TensorType, axes: list[int], keepdim: bool) -> TensorType:
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
        return [_reduced(ins[0], attrs["axes"], attrs["keepdim"])]

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
        return [_reduced(ins[0], attrs["axes"], attrs["keepdim"])]

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


def _axes(b: Builder, x: str, dims: Any) -> list[int]:
    rank = b.type(x).rank
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(rank))
    dims = [dims] if isinstance(dims, int) else dims
    return sorted(d + rank if d < 0 else d for d in dims)


@aten("aten.sum.dim_IntList")
def _sum(b: Builder, x: str, dims: Any = None, keepdim: bool = False, dtype: Any = None) -> str:
    return b.op("sum", [x], axes=_axes(b, x, dims), keepdim=bool(keepdim))


@aten("aten.sum.default")
def _sum_all(b: Builder, x: str, dtype: Any = None) -> str:
    return b.op("sum", [x], axes=_axes(b, x, None), keepdim=False)


@aten("aten.mean.dim")
def _mean(b: Builder, x: str, dims: Any = None, keepdim: bool = False, dtype: Any = None) -> str:
    return b.op("mean", [x], axes=_axes(b, x, dims), keepdim=bool(keepdim))


@aten("aten.mean.default")
def _mean_all(b: Builder, x: str, dtype: Any = None) -> str:
    return b.op("mean", [x], axes=_axes(b, x, None), keepdim=False)
