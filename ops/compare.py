"""Comparisons and logical ops: bool results, no gradient (attention masks, padding masks, position ids).

Importers promote mixed operands as torch does (ops/dtype.py), so an int64 tensor compared with 0.5 is
compared as a float, not truncated, and logical ops take any dtype as "nonzero is True".
"""
from __future__ import annotations

from typing import Any

from pockprop.errors import UnsupportedVariant
from pockprop.ir import Node, TensorType
from pockprop.ops.builder import Builder
from pockprop.ops.elementwise import broadcast_shape
from pockprop.ops.dtype import cast, operands
from pockprop.ops.registry import Lowering, Op, aten, register


class _BoolOp(Op):
    """Elementwise, broadcasting, bool result, no gradient."""

    differentiable = False
    onnx_op = ""

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        out = ins[0].shape
        for t in ins[1:]:
            out = broadcast_shape(out, t.shape)
        return [TensorType(out, "bool")]

    def lower(self, e: Lowering, node: Node) -> None:
        e.node(self.onnx_op, node.inputs, node.outputs)


@register
class Ne(_BoolOp):
    """m = a != b."""
    name = "ne"

    def lower(self, e: Lowering, node: Node) -> None:
        e.node("Not", [e.node("Equal", node.inputs)], node.outputs)


# name, ONNX op, math: one elementwise ONNX op each
for _name, _onnx, _math in (("eq", "Equal", "a == b"), ("lt", "Less", "a < b"), ("le", "LessOrEqual", "a <= b"),
                            ("gt", "Greater", "a > b"), ("ge", "GreaterOrEqual", "a >= b"),
                            ("logical_not", "Not", "not a (a bool)"), ("logical_and", "And", "a and b (bools)"),
                            ("logical_or", "Or", "a or b (bools)"), ("logical_xor", "Xor", "a xor b (bools)")):
    register(type(f"BoolOp_{_name}", (_BoolOp,), {"name": _name, "onnx_op": _onnx, "__doc__": f"m = {_math}."}))


# -- ATen importers -------------------------------------------------------------------------------

def _compare(op: str, ordered: bool):  # type: ignore[no-untyped-def]
    def imp(b: Builder, a: Any, c: Any) -> str:
        a, c = operands(b, a, c)
        if ordered and b.type(a).dtype == "bool":  # onnx orders numbers, not bools
            a, c = cast(b, a, "int32"), cast(b, c, "int32")
        return b.op(op, [a, c])
    return imp


for _op in ("eq", "ne", "lt", "le", "gt", "ge"):
    aten(f"aten.{_op}.Tensor", f"aten.{_op}.Scalar")(_compare(_op, _op not in ("eq", "ne")))


def _logical(op: str, bitwise: bool):  # type: ignore[no-untyped-def]
    def imp(b: Builder, *xs: str) -> str:
        if bitwise and any(b.type(x).dtype != "bool" for x in xs):
            raise UnsupportedVariant("bitwise ops on integers need ONNX opset 18; only bool operands are supported")
        return b.op(op, [cast(b, x, "bool") for x in xs])
    return imp


for _op in ("not", "and", "or", "xor"):
    aten(f"aten.logical_{_op}.default")(_logical(f"logical_{_op}", False))
    aten(f"aten.bitwise_{_op}.{'default' if _op == 'not' else 'Tensor'}")(_logical(f"logical_{_op}", True))
