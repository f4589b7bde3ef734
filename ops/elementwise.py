"""Elementwise ops: binary arithmetic with numpy broadcasting, and unary activations.

Gradients of broadcast operands are summed back to the operand's shape (`unbroadcast`). Activation
VJPs that torch computes from a mask use a bool `range_mask` of the forward value and `masked`, so
backward can keep one byte per element instead of the activation.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from pockprop.ops.builder import Builder
from pockprop.ir import Node, TensorType
from pockprop.ops.dtype import operands
from pockprop.ops.registry import Lowering, Need, Op, Tag, aten, register, same_as_input


def broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(s) for s in np.broadcast_shapes(a, b))


def unbroadcast(b: Builder, grad: str, shape: tuple[int, ...]) -> str:
    """Sum `grad` over the axes that broadcasting added or stretched, back to `shape`."""
    gshape = b.type(grad).shape
    if gshape == shape:
        return grad
    lead = len(gshape) - len(shape)
    axes = list(range(lead)) + [lead + i for i, s in enumerate(shape) if s == 1 and gshape[lead + i] != 1]
    if axes:
        grad = b.op("sum", [grad], axes=axes, keepdim=False)
    if b.type(grad).shape != shape:
        grad = b.op("reshape", [grad], shape=list(shape))
    return grad


class Binary(Op):
    onnx_op = ""

    def shape(self, ins: list[TensorType | None], attrs: dict[str, Any]) -> list[TensorType]:
        a, c = ins
        assert a is not None and c is not None
        return [TensorType(broadcast_shape(a.shape, c.shape), a.dtype)]

    def lower(self, e: Lowering, node: Node) -> None:
        a, c = node.inputs
        out = e.type(node.outputs[0]).shape
        if len(out) >= 2 and out[-1] == 1 and 1 in (e.type(a).numel, e.type(c).numel) and \
                e.type(a).shape != e.type(c).shape:
            # A scalar against a tensor with a trailing 1-extent (a 1x1 conv weight (C, Ci, 1, 1), pooled
            # features (N, C, 1, 1)) takes onnxruntime's per-element broadcast path, far slower than on the
            # flat tensor (docs/benchmarks.md: the SGD update of 1x1 weights). Flatten, op, restore.
            flat = [e.node("Reshape", [v, e.ints([-1] if e.type(v).numel > 1 else [])]) for v in (a, c)]
            e.node("Reshape", [e.node(self.onnx_op, flat), e.ints(out)], node.outputs)
            return
        e.node(self.onnx_op, node.inputs, node.outputs)


@register
class Add(Binary):
    """y = a + b;  da = g,  db = g  (each summed back over broadcast axes)."""
    name, onnx_op = "add", "Add"

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        g = gouts[0]
        return [None if n is None else unbroadcast(b, g, b.type(x).shape) for x, n in zip(node.inputs, needs)]


@register
class Sub(Binary):
    """y = a - b;  da = g,  db = -g."""
    name, onnx_op = "sub", "Sub"

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        g = gouts[0]
        a, c = node.inputs
        da = unbroadcast(b, g, b.type(a).shape) if needs[0] else None
        dc = unbroadcast(b, b.op("neg", [g]), b.type(c).shape) if needs[1] else None
        return [da, dc]


@register
class Mul(Binary):
    """y = a * b;  da = g * b,  db = g * a."""
    name, onnx_op = "mul", "Mul"

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        g = gouts[0]
        a, c = node.inputs
        da = unbroadcast(b, b.op("mul", [g, c]), b.type(a).shape) if needs[0] else None
        dc = unbroadcast(b, b.op("mul", [g, a]), b.type(c).shape) if needs[1] else None
        return [da, dc]


@register
class Div(Binary):
    """y = a / b;  da = g / b,  db = -g * y / b."""
    name, onnx_op = "div", "Div"

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        g = gouts[0]
        a, c = node.inputs
        y = node.outputs[0]
        da = unbroadcast(b, b.op("div", [g, c]), b.type(a).shape) if needs[0] else None
        dc = None
        if needs[1]:
            dc = unbroadcast(b, b.op("neg", [b.op("div", [b.op("mul", [g, y]), c])]), b.type(c).shape)
        return [da, dc]


class Unary(Op):
    onnx_op = ""
    shape = staticmethod(same_as_input)  # type: ignore[assignment]

    def lower(self, e: Lowering, node: Node) -> None:
        e.node(self.onnx_op, node.inputs, node.outputs)


@register
class Neg(Unary):
    """y = -x;  dx = -g."""
    name, onnx_op = "neg", "Neg"

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        return [b.op("neg", [gouts[0]])]


@register
class Abs(Unary):
    """y = |x|;  dx = g * sign(x)."""
    name, onnx_op = "abs", "Abs"

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        return [b.op("mul", [gouts[0], b.op("sign", [node.inputs[0]])])]


@register
class Sign(Unary):
    """y = sign(x); piecewise constant, so no gradient flows through it."""
    name, onnx_op = "sign", "Sign"
    differentiable = False


@register
class Sqrt(Unary):
    """y = sqrt(x);  dx = g / (2 y)."""
    name, onnx_op = "sqrt", "Sqrt"

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        y = node.outputs[0]
        return [b.op("div", [gouts[0], b.op("mul", [y, b.scalar_like(2.0, y)])])]


@register
class Exp(Unary):
    """y = exp(x);  dx = g * y."""
    name, onnx_op = "exp", "Exp"

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        return [b.op("mul", [gouts[0], node.outputs[0]])]


@register
class Log(Unary):
    """y = log(x);  dx = g / x."""
    name, onnx_op = "log", "Log"

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        return [b.op("div", [gouts[0], node.inputs[0]])]


@register
class Rsqrt(Unary):
    """y = 1 / sqrt(x);  dx = -g * y^3 / 2."""
    name = "rsqrt"

    def lower(self, e: Lowering, node: Node) -> None:
        e.node("Reciprocal", [e.node("Sqrt", node.inputs)], node.outputs)

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        y = node.outputs[0]
        return [b.op("mul", [gouts[0], b.op("mul", [b.op("pow", [y], exponent=3.0), b.scalar_like(-0.5, y)])])]


@register
class Cos(Unary):
    """y = cos(x);  dx = -g * sin(x)."""
    name, onnx_op = "cos", "Cos"

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        return [b.op("neg", [b.op("mul", [gouts[0], b.op("sin", [node.inputs[0]])])])]


@register
class Sin(Unary):
    """y = sin(x);  dx = g * cos(x)."""
    name, onnx_op = "sin", "Sin"

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        return [b.op("mul", [gouts[0], b.op("cos", [node.inputs[0]])])]


@register
class Erf(Unary):
    """y = erf(x);  dx = g * 2/sqrt(pi) * exp(-x^2)."""
    name, onnx_op = "erf", "Erf"

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        x = node.inputs[0]
        bell = b.op("exp", [b.op("mul", [b.op("mul", [x, x]), b.scalar_like(-1.0, x)])])
        return [b.op("mul", [gouts[0], b.op("mul", [bell, b.scalar_like(2 / math.sqrt(math.pi), x)])])]


@register
class PowScalar(Unary):
    """y = x ** p (p a constant);  dx = g * p * x ** (p - 1)."""
    name = "pow"

    def lower(self, e: Lowering, node: Node) -> None:
        p = e.const(node.attrs["exponent"], e.type(node.inputs[0]).dtype)
        e.node("Pow", [node.inputs[0], p], node.outputs)

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        x, p = node.inputs[0], node.attrs["exponent"]
        d = b.op("mul", [b.op("pow", [x], exponent=p - 1), b.scalar_like(p, x)])
        return [b.op("mul", [gouts[0], d])]


@register
class PowOf(Unary):
    """y = base ** x (base a constant, e.g. Adam's beta^t);  dx = g * y * ln(base)."""
    name = "pow_of"

    def lower(self, e: Lowering, node: Node) -> None:
        base = e.const(node.attrs["base"], e.type(node.inputs[0]).dtype)
        e.node("Pow", [base, node.inputs[0]], node.outputs)

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        y = node.outputs[0]
        return [b.op("mul", [gouts[0], b.op("mul", [y, b.scalar_like(math.log(node.attrs["base"]), y)])])]


@register
class Relu(Unary):
    """y = max(x, 0);  dx = g * [y > 0]."""
    name, onnx_op = "relu", "Relu"

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        return [mask_grad(b, gouts[0], node.outputs[0], lo=0.0, hi=None)]


@register
class Clamp(Unary):
    """y = min(max(x, lo), hi) (hardtanh, relu6, clamp);  dx = g * [lo < x < hi] ([lo <= x <= hi] for clamp, as torch)."""
    name = "clamp"

    def lower(self, e: Lowering, node: Node) -> None:
        dt = e.type(node.inputs[0]).dtype
        lo, hi = node.attrs.get("lo"), node.attrs.get("hi")
        e.node("Clip", [node.inputs[0], None if lo is None else e.const(lo, dt), None if hi is None else e.const(hi, dt)],
               node.outputs)

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        inclusive = node.attrs.get("inclusive", False)
        # lo < x < hi  <=>  lo < y < hi, so the exclusive mask reads the output: then the layer's input
        # (a conv's output) has one reader, the clip, and onnxruntime fuses conv + clip. Not so for the
        # inclusive mask: x < lo gives y = lo, inside [lo, hi].
        src = node.inputs[0] if inclusive else node.outputs[0]
        return [mask_grad(b, gouts[0], src, lo=node.attrs.get("lo"), hi=node.attrs.get("hi"), inclusive=inclusive)]


def mask_grad(b: Builder, g: str, x: str, lo: float | None, hi: float | None, inclusive: bool = False) -> str:
    """dx = g where lo < x < hi (<= with `inclusive`), else 0, via a bool mask of x.

    The mask depends on the forward value only, so a pass can compute it during the forward pass and
    keep 1 byte per element for backward instead of x itself.
    """
    mask = b.op("range_mask", [x], lo=lo, hi=hi, inclusive=inclusive, hint="mask")
    return b.op("masked", [g, mask])


@register
class RangeMask(Op):
    """m = lo < x < hi (<= with `inclusive`; a bound of None is open), a bool tensor; no gradient."""
    name = "range_mask"
    tags = frozenset({Tag.HOISTABLE})
    differentiable = False

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        return [TensorType(ins[0].shape, "bool")]

    def lower(self, e: Lowering, node: Node) -> None:
        x = node.inputs[0]
        dt = e.type(x).dtype
        incl = node.attrs.get("inclusive", False)
        conds = []
        if node.attrs.get("lo") is not None:
            conds.append(e.node("GreaterOrEqual" if incl else "Greater", [x, e.const(node.attrs["lo"], dt)]))
        if node.attrs.get("hi") is not None:
            conds.append(e.node("LessOrEqual" if incl else "Less", [x, e.const(node.attrs["hi"], dt)]))
        if len(conds) == 1:
            e.node("Identity", conds, node.outputs)
        else:
            e.node("And", conds, node.outputs)


@register
class Masked(Op):
    """y = g where m else 0 (m a bool mask broadcastable to g)."""
    name = "masked"
    differentiable = False

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        return [ins[0]]

    def lower(self, e: Lowering, node: Node) -> None:
        g, m = node.inputs
        # g * float(m): onnxruntime's Where with a scalar branch is slower than Cast + Mul (docs/benchmarks.md).
        # (A NaN/Inf in g where m is false now propagates instead of being zeroed: such a step is broken
        # already, and the runtime's guard rejects non-finite updates.)
        e.node("Mul", [g, e.node("Cast", [m], to=e.onnx_dtype(e.type(g).dtype))], node.outputs)


@register
class Sigmoid(Unary):
    """y = 1 / (1 + exp(-x));  dx = g * y * (1 - y)."""
    name, onnx_op = "sigmoid", "Sigmoid"

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        y = node.outputs[0]
        return [b.op("mul", [gouts[0], b.op("mul", [y, b.op("sub", [b.scalar_like(1.0, y), y])])])]


@register
class Tanh(Unary):
    """y = tanh(x);  dx = g * (1 - y^2)."""
    name, onnx_op = "tanh", "Tanh"

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        y = node.outputs[0]
        return [b.op("mul", [gouts[0], b.op("sub", [b.scalar_like(1.0, y), b.op("mul", [y, y])])])]


@register
class Silu(Unary):
    """y = x * s, s = sigmoid(x);  dx = g * s * (1 + x * (1 - s))."""
    name = "silu"

    def lower(self, e: Lowering, node: Node) -> None:
        x = node.inputs[0]
        e.node("Mul", [x, e.node("Sigmoid", [x])], node.outputs)

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        x = node.inputs[0]
        s = b.op("sigmoid", [x])
        one = b.scalar_like(1.0, x)
        inner = b.op("add", [one, b.op("mul", [x, b.op("sub", [one, s])])])
        return [b.op("mul", [gouts[0], b.op("mul", [s, inner])])]


@register
class Hardswish(Unary):
    """y = x * relu6(x + 3) / 6;  dx = g * (0 if x < -3, x/3 + 1/2 if x <= 3, else 1)."""
    name, onnx_op = "hardswish", "HardSwish"

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        return [b.op("hardswish_grad", [gouts[0], node.inputs[0]])]


@register
class HardswishGrad(Op):
    """Backward helper of hardswish: dx = g * where(x < -3, 0, where(x <= 3, x/3 + 1/2, 1))."""
    name = "hardswish_grad"
    differentiable = False

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        return [ins[0]]

    def lower(self, e: Lowering, node: Node) -> None:
        g, x = node.inputs
        dt = e.type(x).dtype
        mid = e.node("Add", [e.node("Div", [x, e.const(3.0, dt)]), e.const(0.5, dt)])
        upper = e.node("Where", [e.node("LessOrEqual", [x, e.const(3.0, dt)]), mid, e.const(1.0, dt)])
        slope = e.node("Where", [e.node("Less", [x, e.const(-3.0, dt)]), e.const(0.0, dt), upper])
        e.node("Mul", [g, slope], node.outputs)


@register
class Hardsigmoid(Unary):
    """y = relu6(x + 3) / 6;  dx = g / 6 where -3 < x < 3, else 0."""
    name, onnx_op = "hardsigmoid", "HardSigmoid"

    def lower(self, e: Lowering, node: Node) -> None:
        e.node("HardSigmoid", node.inputs, node.outputs, alpha=1.0 / 6.0, beta=0.5)

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        x = node.inputs[0]
        masked = mask_grad(b, gouts[0], x, lo=-3.0, hi=3.0)
        return [b.op("mul", [masked, b.scalar_like(1.0 / 6.0, x)])]


@register
class Gelu(Unary):
    """y = x * Phi(x) (or its tanh approximation);  dx = g * (Phi(x) + x * phi(x))."""
    name = "gelu"

    def lower(self, e: Lowering, node: Node) -> None:
        x = node.inputs[0]
        dt = e.type(x).dtype
        if node.attrs.get("approximate", "none") == "tanh":
            # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            inner = e.node("Mul", [e.const(math.sqrt(2 / math.pi), dt),
                                   e.node("Add", [x, e.node("Mul", [e.const(0.044715, dt), e.node("Mul", [x, e.node("Mul", [x, x])])])])])
            t = e.node("Add", [e.const(1.0, dt), e.node("Tanh", [inner])])
            e.node("Mul", [e.node("Mul", [e.const(0.5, dt), x]), t], node.outputs)
        else:
            cdf = e.node("Mul", [e.const(0.5, dt), e.node("Add", [e.const(1.0, dt), e.node("Erf", [e.node("Mul", [x, e.const(1 / math.sqrt(2), dt)])])])])
            e.node("Mul", [x, cdf], node.outputs)

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        return [b.op("gelu_grad", [gouts[0], node.inputs[0]], approximate=node.attrs.get("approximate", "none"))]


@register
class GeluGrad(Op):
    """Backward helper of gelu: exact dx = g * (Phi(x) + x phi(x)); tanh form differentiates the approximation."""
    name = "gelu_grad"
    differentiable = False

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        return [ins[0]]

    def lower(self, e: Lowering, node: Node) -> None:
        g, x = node.inputs
        dt = e.type(x).dtype
        c = lambda v: e.const(v, dt)  # noqa: E731
        if node.attrs.get("approximate", "none") == "tanh":
            k, a = math.sqrt(2 / math.pi), 0.044715
            x2 = e.node("Mul", [x, x])
            t = e.node("Tanh", [e.node("Mul", [c(k), e.node("Add", [x, e.node("Mul", [c(a), e.node("Mul", [x, x2])])])])])
            dinner = e.node("Mul", [c(k), e.node("Add", [c(1.0), e.node("Mul", [c(3 * a), x2])])])
            sech2 = e.node("Sub", [c(1.0), e.node("Mul", [t, t])])
            d = e.node("Add", [e.node("Mul", [c(0.5), e.node("Add", [c(1.0), t])]),
                               e.node("Mul", [e.node("Mul", [c(0.5), x]), e.node("Mul", [sech2, dinner])])])
        else:
            cdf = e.node("Mul", [c(0.5), e.node("Add", [c(1.0), e.node("Erf", [e.node("Mul", [x, c(1 / math.sqrt(2))])])])])
            pdf = e.node("Mul", [c(1 / math.sqrt(2 * math.pi)), e.node("Exp", [e.node("Mul", [c(-0.5), e.node("Mul", [x, x])])])])
            d = e.node("Add", [cdf, e.node("Mul", [x, pdf])])
        e.node("Mul", [g, d], node.outputs)


# -- ATen importers -------------------------------------------------------------------------------

def _binary(op: str):  # type: ignore[no-untyped-def]
    def imp(b: Builder, a: Any, c: Any, alpha: float = 1) -> str:
        a, c = operands(b, a, c, at_least_float=op == "div")  # torch promotes; ONNX wants one dtype
        if alpha != 1:
            c = b.op("mul", [c, b.scalar_like(alpha, c)])
        return b.op(op, [a, c])
    return imp


aten("aten.add.Tensor", "aten.add.Scalar")(_binary("add"))
aten("aten.sub.Tensor", "aten.sub.Scalar")(_binary("sub"))
aten("aten.mul.Tensor", "aten.mul.Scalar")(_binary("mul"))
aten("aten.div.Tensor", "aten.div.Scalar")(_binary("div"))


@aten("aten.rsub.Scalar", "aten.rsub.Tensor")
def _rsub(b: Builder, a: str, c: Any, alpha: float = 1) -> str:
    return _binary("sub")(b, c, a, alpha)


def _unary(op: str):  # type: ignore[no-untyped-def]
    return lambda b, x: b.op(op, [x])


for _name in ("neg", "abs", "sign", "sqrt", "rsqrt", "exp", "log", "cos", "sin", "erf", "relu", "sigmoid", "tanh", "silu",
              "hardswish", "hardsigmoid"):
    aten(f"aten.{_name}.default")(_unary(_name))


@aten("aten.pow.Tensor_Scalar")
def _pow(b: Builder, x: str, p: float) -> str:
    return b.op("pow", [x], exponent=float(p))


@aten("aten.hardtanh.default")
def _hardtanh(b: Builder, x: str, lo: float = -1.0, hi: float = 1.0) -> str:
    return b.op("clamp", [x], lo=float(lo), hi=float(hi))


@aten("aten.clamp.default")
def _clamp(b: Builder, x: str, lo: float | None = None, hi: float | None = None) -> str:
    return b.op("clamp", [x], lo=None if lo is None else float(lo), hi=None if hi is None else float(hi), inclusive=True)


@aten("aten.gelu.default")
def _gelu(b: Builder, x: str, approximate: str = "none") -> str:
    return b.op("gelu", [x], approximate=approximate)
