"""dtypes: their names, torch's type promotion, and the cast op.

Importers call `promote`/`cast` wherever torch promotes implicitly (mixed-dtype arithmetic and
comparisons, python scalars against integer tensors), because ONNX ops want operands of one type.
A cast to a float type carries the gradient back (cast to the source type); a cast to an integer or
bool type carries none, since autodiff follows float values only.
"""
from __future__ import annotations

from typing import Any

from pockprop.ir import Node, TensorType
from pockprop.ops.builder import Builder
from pockprop.ops.registry import Lowering, Op, register


def dtype_name(dtype: Any) -> str:
    """torch.float32 (or 'float32') -> 'float32'."""
    return str(dtype).removeprefix("torch.")


def kind(dtype: str) -> int:
    """0 for bool, 1 for integers, 2 for floats: a higher kind wins promotion."""
    return 0 if dtype == "bool" else 2 if dtype.startswith("float") else 1


def promote(*dtypes: str) -> str:
    """torch's promotion for tensors of one category rank: bool < integers < floats, then the wider."""
    top = max(kind(d) for d in dtypes)
    same = [d for d in dtypes if kind(d) == top]
    return max(same, key=lambda d: 0 if d == "bool" else int("".join(c for c in d if c.isdigit())))


def cast(b: Builder, x: str, dtype: str) -> str:
    """x as `dtype` (x itself when it already is)."""
    return x if b.type(x).dtype == dtype else b.op("cast", [x], dtype=dtype)


@register
class Cast(Op):
    """y = x as dtype (floats truncate toward 0 into integers; nonzero is True);  dx = cast(g, x.dtype) between floats."""
    name = "cast"

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        return [TensorType(ins[0].shape, attrs["dtype"])]

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        return [cast(b, gouts[0], b.type(node.inputs[0]).dtype)]

    def lower(self, e: Lowering, node: Node) -> None:
        e.node("Cast", node.inputs, node.outputs, to=e.onnx_dtype(node.attrs["dtype"]))


def scalar_dtype(tensor_dtype: str, value: Any) -> str:
    """The dtype a tensor and a python scalar compute in: an integer or bool tensor with a float scalar is
    promoted to float32 (k * 0.5 is not k * 0), a bool tensor with an int scalar to int64."""
    if kind(tensor_dtype) < 2 and isinstance(value, float):
        return "float32"
    if tensor_dtype == "bool" and isinstance(value, int) and not isinstance(value, bool):
        return "int64"
    return tensor_dtype


def operands(b: Builder, a: Any, c: Any, at_least_float: bool = False) -> tuple[str, str]:
    """Two operands (IR values or python scalars) as IR values of the dtype torch computes them in;
    `at_least_float` for true division, which turns integers into floats."""
    dt = promote(*(b.type(v).dtype for v in (a, c) if isinstance(v, str)))
    for v in (a, c):
        if not isinstance(v, str):
            dt = scalar_dtype(dt, v)
    if at_least_float and kind(dt) < 2:
        dt = "float32"
    return cast(b, a, dt) if isinstance(a, str) else b.const(a, dt), cast(b, c, dt) if isinstance(c, str) else b.const(c, dt)
