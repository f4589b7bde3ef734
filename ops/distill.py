"""Distillation terms: how far the student's tempered predictions are from the teacher's.

The kd loss the compiler builds (compiler/distill.py) is alpha * task + (1 - alpha) * term, with task a
loss of ops/loss.py and term one of the two ops here. Each takes the student's logits z and the
teacher's z_t (same shape; no gradient reaches z_t, a data input or a frozen copy of the model) and
has a hand-derived VJP.
"""
from __future__ import annotations

from pockprop.errors import CompileError
from pockprop.ir import Node, TensorType
from pockprop.ops.builder import Builder
from pockprop.ops.loss import IGNORE_INDEX, SCALAR, counted
from pockprop.ops.registry import Lowering, Need, Op, register


def _tempered(e: Lowering, z: str, temperature: float) -> str:
    return z if temperature == 1.0 else e.node("Div", [z, e.const(temperature, e.type(z).dtype)])


@register
class KLDivSoftmax(Op):
    """L = T^2 sum_i w_i KL(softmax(z_t,i/T) || softmax(z_i/T)) / sum_i w_i;  dz = T (softmax(z/T) - softmax(z_t/T)) w g / max(sum w, 1).

    Rows i are all but the last (classes) axis; w_i = [y_i != ignore_index] excludes the rows the
    cross-entropy ignores (y as in cross_entropy). With (N, C) logits and no row ignored this is torch's
    F.kl_div(log_softmax(z/T), softmax(z_t/T), reduction="batchmean") * T^2; per token ((N, T, V)) it
    is the mean over the counted tokens, not batchmean's division by N. Every row ignored: L = 0/0 = NaN
    and dz = 0, as cross_entropy.
    """
    name = "kl_div_softmax"

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        z, zt, y = ins
        if zt.shape != z.shape or zt.dtype != z.dtype:
            raise CompileError(f"kl_div_softmax: teacher logits {zt} do not match the student's {z}")
        if z.rank < 2 or y.shape != z.shape[:-1] or not y.dtype.startswith("int"):
            raise CompileError(f"kl_div_softmax expects logits (N, C) or (N, T, C) and int labels shaped like them "
                               f"without the last axis; got {z} and {y}")
        return [TensorType(SCALAR, z.dtype)]

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        z, zt, y = node.inputs
        return [b.op("kl_div_softmax_grad", [z, zt, y, gouts[0]], **node.attrs), None, None]

    def lower(self, e: Lowering, node: Node) -> None:
        z, zt, y = node.inputs
        t = float(node.attrs["temperature"])
        dt = e.type(z).dtype
        _, w = counted(e, z, y, node.attrs.get("ignore_index", IGNORE_INDEX))
        ls = e.node("LogSoftmax", [_tempered(e, z, t)], axis=-1)
        lt = e.node("LogSoftmax", [_tempered(e, zt, t)], axis=-1)
        per = e.node("ReduceSum", [e.node("Mul", [e.node("Exp", [lt]), e.node("Sub", [lt, ls])]), e.ints([-1])],
                     keepdims=1)  # (..., 1)
        total = e.node("ReduceSum", [e.node("Mul", [per, w])], keepdims=0)
        mean = e.node("Div", [total, e.node("ReduceSum", [w], keepdims=0)])
        e.node("Mul", [mean, e.const(t * t, dt)], node.outputs)


@register
class KLDivSoftmaxGrad(Op):
    """Backward helper: dz = T (softmax(z/T) - softmax(z_t/T)) * w * g / max(sum w, 1)."""
    name = "kl_div_softmax_grad"
    differentiable = False

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        return [ins[0]]

    def lower(self, e: Lowering, node: Node) -> None:
        z, zt, y, g = node.inputs
        t = float(node.attrs["temperature"])
        dt = e.type(z).dtype
        _, w = counted(e, z, y, node.attrs.get("ignore_index", IGNORE_INDEX))
        count = e.node("Max", [e.node("ReduceSum", [w], keepdims=0), e.const(1.0, dt)])
        scale = e.node("Mul", [w, e.node("Div", [e.node("Mul", [g, e.const(t, dt)]), count])])
        diff = e.node("Sub", [e.node("Softmax", [_tempered(e, z, t)], axis=-1),
                              e.node("Softmax", [_tempered(e, zt, t)], axis=-1)])
        e.node("Mul", [diff, scale], node.outputs)


@register
class KLDivSigmoid(Op):
    """L = T^2 mean_e KL(Bern(sigmoid(z_t/T)) || Bern(sigmoid(z/T))) over every element e;  dz = T (sigmoid(z/T) - sigmoid(z_t/T)) g / numel.

    Per element, with q = sigmoid(z_t/T): KL = bce(z/T, q) - bce(z_t/T, q), bce(x, q) = max(x, 0) - x q +
    log(1 + exp(-|x|)) (BCE with logits against soft target q). The multi-label (sigmoid) form of
    distillation: each label its own two-class distribution.
    """
    name = "kl_div_sigmoid"

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        z, zt = ins
        if zt.shape != z.shape or zt.dtype != z.dtype:
            raise CompileError(f"kl_div_sigmoid: teacher logits {zt} do not match the student's {z}")
        return [TensorType(SCALAR, z.dtype)]

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        z, zt = node.inputs
        t = float(node.attrs["temperature"])
        inv = b.scalar_like(1.0 / t, z)
        diff = b.op("sub", [b.op("sigmoid", [b.op("mul", [z, inv])]), b.op("sigmoid", [b.op("mul", [zt, inv])])])
        scale = b.op("mul", [gouts[0], b.scalar_like(t / b.type(z).numel, z)])
        return [b.op("mul", [diff, scale]), None]

    def lower(self, e: Lowering, node: Node) -> None:
        z, zt = node.inputs
        t = float(node.attrs["temperature"])
        a, s = _tempered(e, zt, t), _tempered(e, z, t)
        q = e.node("Sigmoid", [a])
        per = e.node("Sub", [_bce(e, s, q), _bce(e, a, q)])
        mean = e.node("ReduceMean", [per], axes=list(range(e.type(z).rank)), keepdims=0)
        e.node("Mul", [mean, e.const(t * t, e.type(z).dtype)], node.outputs)


def _bce(e: Lowering, x: str, q: str) -> str:
    """max(x, 0) - x q + log(1 + exp(-|x|)), elementwise: BCE with logits x against soft targets q."""
    softplus = e.node("Softplus", [e.node("Neg", [e.node("Abs", [x])])])
    return e.node("Add", [e.node("Sub", [e.node("Relu", [x]), e.node("Mul", [x, q])]), softplus])
