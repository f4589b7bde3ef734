"""Softmax family along one axis: softmax, torch's SDPA-safe softmax, log-softmax.

Each is one ONNX op forward (Softmax / LogSoftmax, opset 13+ semantics: the axis alone is normalized)
and a VJP that reads the forward output, never the input, so backward keeps y and not x.
`safe_softmax` is kept whole (tracing/trace.py's KEEP) instead of torch's five-op decomposition:
rows whose inputs are all -inf (fully masked attention rows) give 0, not NaN.
"""
from __future__ import annotations

from pockprop.ops.builder import Builder
from pockprop.ir import Node
from pockprop.ops.registry import Lowering, Need, Op, aten, register, same_as_input


class _AlongAxis(Op):
    shape = staticmethod(same_as_input)  # type: ignore[assignment]
    onnx_op = ""

    def lower(self, e: Lowering, node: Node) -> None:
        e.node(self.onnx_op, node.inputs, node.outputs, axis=node.attrs["axis"])


@register
class Softmax(_AlongAxis):
    """y = exp(x) / sum(exp(x)) along axis;  dx = y * (g - sum(g * y, axis))."""
    name, onnx_op = "softmax", "Softmax"

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        assert gouts[0] is not None
        return [softmax_grad(b, node.outputs[0], gouts[0], node.attrs["axis"])]


def softmax_grad(b: Builder, y: str, g: str, axis: int) -> str:
    """dx = y * (g - sum(g * y, axis)) for y = softmax(x) (0 where y is: a dead row of the safe softmax)."""
    gy = b.op("mul", [g, y])
    return b.op("sub", [gy, b.op("mul", [y, b.op("sum", [gy], axes=[axis], keepdim=True)])])


@register
class SafeSoftmax(Softmax):
    """y = softmax(x) along axis, 0 on rows that are all -inf;  dx = y * (g - sum(g * y, axis))."""
    name = "safe_softmax"

    def lower(self, e: Lowering, node: Node) -> None:
        lower_safe_softmax(e, node.inputs[0], node.attrs["axis"], node.outputs[0])


def lower_safe_softmax(e: Lowering, x: str, axis: int, out: str) -> None:
    """out (an IR value) = safe softmax of x (an IR value or an ONNX intermediate) along axis."""
    # A row that is all -inf has max -inf (and Softmax gives NaN there); any finite or NaN entry does not.
    dead = e.node("IsInf", [e.node("ReduceMax", [x], axes=[axis], keepdims=1)], detect_positive=0)
    e.node("Where", [dead, e.const(0.0, e.type(out).dtype), e.node("Softmax", [x], axis=axis)], [out])


@register
class LogSoftmax(_AlongAxis):
    """y = x - log(sum(exp(x))) along axis;  dx = g - exp(y) * sum(g, axis)."""
    name, onnx_op = "log_softmax", "LogSoftmax"

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        y, g = node.outputs[0], gouts[0]
        assert g is not None
        total = b.op("sum", [g], axes=[node.attrs["axis"]], keepdim=True)
        return [b.op("sub", [g, b.op("mul", [b.op("exp", [y]), total])])]


def _along(op: str):  # type: ignore[no-untyped-def]
    def imp(b: Builder, x: str, dim: int, *rest: object) -> str:
        rank = b.type(x).rank
        if rank == 0:  # torch normalizes a scalar over itself; ONNX wants an axis to exist
            y = b.op(op, [b.op("reshape", [x], shape=[1])], axis=0)
            return b.op("reshape", [y], shape=[])
        return b.op(op, [x], axis=dim + rank if dim < 0 else dim)
    return imp


# _softmax/_log_softmax(x, dim, half_to_float): half_to_float is only ever set for float16 inputs on CUDA.
aten("aten._softmax.default")(_along("softmax"))
aten("aten._log_softmax.default")(_along("log_softmax"))
aten("aten._safe_softmax.default")(_along("safe_softmax"))  # (x, dim, dtype=None)
