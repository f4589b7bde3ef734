"""Losses computed inside the training graph, each with its own hand-derived VJP.

All reduce to a scalar mean, as torch's default reduction does (cross-entropy: over the labels it
counts). Labels are graph inputs and carry
no gradient. Losses are ordinary ops, so a distillation or multi-label loss added later is one
more class here.
"""
from __future__ import annotations

from typing import Any

from pockprop.errors import CompileError
from pockprop.ops.builder import Builder
from pockprop.ir import Node, TensorType
from pockprop.ops.registry import Lowering, Need, Op, register

SCALAR = ()


def _check_pair(pred: TensorType, target: TensorType, what: str) -> None:
    if pred.shape != target.shape:
        raise CompileError(f"{what}: targets of shape {target.shape} do not match predictions {pred.shape}")


IGNORE_INDEX = -100  # torch's default ignore_index, and Hugging Face's label for padding


@register
class CrossEntropy(Op):
    """L = sum_i w_i (-t_i . log softmax(z_i)) / sum_i w_i, w = [y != -100];  dz = (softmax(z) - t) w g / max(sum w, 1).

    t = (1-eps) onehot(y) + eps/C. Rows i are all but the last axis of z ((N, C) or (N, T, V): classes
    last), and y has z's shape without that axis. That is torch's mean over the labels not equal to
    ignore_index, label smoothing included; a batch with every label ignored has L = 0/0 = NaN and
    dz = 0, as in torch.
    """
    name = "cross_entropy"

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        z, y = ins
        if z.rank < 2 or y.shape != z.shape[:-1] or not y.dtype.startswith("int"):
            raise CompileError("cross_entropy expects logits (N, C) or (N, T, C), classes last, and int64 labels "
                               f"shaped like the logits without their last axis; got {z} and {y}")
        return [TensorType(SCALAR, z.dtype)]

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        return [b.op("cross_entropy_grad", [node.inputs[0], node.inputs[1], gouts[0]], **node.attrs), None]

    def lower(self, e: Lowering, node: Node) -> None:
        z, y = node.inputs
        eps = float(node.attrs.get("label_smoothing", 0.0))
        dt = e.type(z).dtype
        lsm = e.node("LogSoftmax", [z], axis=-1)
        safe, w = counted(e, z, y, node.attrs.get("ignore_index", IGNORE_INDEX))
        picked = e.node("GatherElements", [lsm, e.node("Unsqueeze", [safe, e.ints([-1])])], axis=-1)
        per = e.node("Neg", [picked])  # (..., 1)
        if eps:
            smooth = e.node("Neg", [e.node("ReduceMean", [lsm], axes=[-1], keepdims=1)])
            per = e.node("Add", [e.node("Mul", [per, e.const(1.0 - eps, dt)]),
                                 e.node("Mul", [smooth, e.const(eps, dt)])])
        total = e.node("ReduceSum", [e.node("Mul", [per, w])], keepdims=0)
        e.node("Div", [total, e.node("ReduceSum", [w], keepdims=0)], node.outputs)


def counted(e: Lowering, z: str, y: str, ignore_index: int = IGNORE_INDEX) -> tuple[str, str]:
    """(labels y with ignored ones replaced by class 0, so gathers stay in range; the weight w (..., 1) in
    the dtype of logits z: 1 where a label counts, 0 where it is ignore_index)."""
    ignore = e.const(int(ignore_index), e.type(y).dtype)
    keep = e.node("Not", [e.node("Equal", [y, ignore])])
    safe = e.node("Where", [keep, y, e.const(0, e.type(y).dtype)])
    w = e.node("Cast", [e.node("Unsqueeze", [keep, e.ints([-1])])], to=e.onnx_dtype(e.type(z).dtype))
    return safe, w


@register
class CrossEntropyGrad(Op):
    """Backward helper: dz = (softmax(z) - ((1-eps) onehot(y) + eps/C)) * w * g / max(sum w, 1)."""
    name = "cross_entropy_grad"
    differentiable = False

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        return [ins[0]]

    def lower(self, e: Lowering, node: Node) -> None:
        z, y, g = node.inputs
        c = e.type(z).shape[-1]
        eps = float(node.attrs.get("label_smoothing", 0.0))
        dt = e.type(z).dtype
        safe, w = counted(e, z, y, node.attrs.get("ignore_index", IGNORE_INDEX))
        target = e.node("OneHot", [safe, e.const(c, "int64"), e.const([eps / c, 1.0 - eps + eps / c], dt)], axis=-1)
        count = e.node("Max", [e.node("ReduceSum", [w], keepdims=0), e.const(1.0, dt)])
        scale = e.node("Mul", [w, e.node("Div", [g, count])])  # (..., 1): one full-size product below, not two
        e.node("Mul", [e.node("Sub", [e.node("Softmax", [z], axis=-1), target]), scale], node.outputs)


def pos_weight_shape(pos_weight: Any, labels: int) -> tuple[float, ...]:
    """`pos_weight` as the loss attribute: one weight, or one per label (the logits' last axis), each a
    finite number >= 0 (torch's BCEWithLogitsLoss broadcasts it the same way)."""
    w = tuple(float(v) for v in (pos_weight if isinstance(pos_weight, (list, tuple)) else [pos_weight]))
    if len(w) not in (1, labels):
        raise CompileError(f"pos_weight has {len(w)} values; the output has {labels} labels (give 1 or {labels})")
    if not all(v >= 0 and v != float("inf") for v in w):  # also false for NaN
        raise CompileError(f"pos_weight values must be finite numbers >= 0, got {list(w)}")
    return w


@register
class BCEWithLogits(Op):
    """L = mean((1 - t) z + l (log(1 + exp(-|z|)) + max(-z, 0))), l = 1 + (p - 1) t;  dz = (l sigmoid(z) - p t) g / numel.

    p: the attribute pos_weight (one weight, or one per label on the last axis; default 1, which gives
    the plain form, dz = (sigmoid(z) - t) g / numel). torch's BCEWithLogitsLoss(pos_weight=p) exactly.
    """
    name = "bce_with_logits"

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        _check_pair(ins[0], ins[1], "bce_with_logits")
        if "pos_weight" in attrs:
            pos_weight_shape(attrs["pos_weight"], ins[0].shape[-1] if ins[0].rank else 1)
        return [TensorType(SCALAR, ins[0].dtype)]

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        z, t = node.inputs
        scale = b.op("mul", [gouts[0], b.scalar_like(1.0 / b.type(z).numel, z)])
        p = node.attrs.get("pos_weight")
        if p is None:
            return [b.op("mul", [b.op("sub", [b.op("sigmoid", [z]), t]), scale]), None]
        pw = b.const(p if len(p) > 1 else p[0], b.type(z).dtype)
        one = b.scalar_like(1.0, z)
        lw = b.op("add", [one, b.op("mul", [b.op("sub", [pw, one]), t])])
        d = b.op("sub", [b.op("mul", [lw, b.op("sigmoid", [z])]), b.op("mul", [pw, t])])
        return [b.op("mul", [d, scale]), None]

    def lower(self, e: Lowering, node: Node) -> None:
        z, t = node.inputs
        dt = e.type(z).dtype
        softplus = e.node("Softplus", [e.node("Neg", [e.node("Abs", [z])])])  # log(1 + exp(-|z|))
        p = node.attrs.get("pos_weight")
        if p is None:
            per = e.node("Add", [e.node("Sub", [e.node("Relu", [z]), e.node("Mul", [z, t])]), softplus])
        else:  # (1 - t) z + l (softplus + relu(-z)): z - z t + relu(-z) = relu(z) - z t, as above when l = 1
            one = e.const(1.0, dt)
            pw = e.const(list(p) if len(p) > 1 else p[0], dt)
            lw = e.node("Add", [one, e.node("Mul", [e.node("Sub", [pw, one]), t])])
            log_sig = e.node("Add", [softplus, e.node("Relu", [e.node("Neg", [z])])])  # -log sigmoid(z)
            per = e.node("Add", [e.node("Mul", [e.node("Sub", [one, t]), z]), e.node("Mul", [lw, log_sig])])
        e.node("ReduceMean", [per], node.outputs, axes=list(range(e.type(z).rank)), keepdims=0)


@register
class MSE(Op):
    """L = mean((p - t)^2);  dp = 2 (p - t) g / numel."""
    name = "mse"

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        _check_pair(ins[0], ins[1], "mse")
        return [TensorType(SCALAR, ins[0].dtype)]

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        p, t = node.inputs
        scale = b.op("mul", [gouts[0], b.scalar_like(2.0 / b.type(p).numel, p)])
        return [b.op("mul", [b.op("sub", [p, t]), scale]), None]

    def lower(self, e: Lowering, node: Node) -> None:
        p, t = node.inputs
        d = e.node("Sub", [p, t])
        e.node("ReduceMean", [e.node("Mul", [d, d])], node.outputs, axes=list(range(e.type(p).rank)), keepdims=0)


LOSSES = {"cross_entropy": "cross_entropy", "bce_with_logits": "bce_with_logits", "bce": "bce_with_logits",
          "mse": "mse"}
