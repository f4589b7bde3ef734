"""Matrix products: linear (x W^T + b) and batched matmul (mm, bmm, addmm map onto these).

`linear` honours a sliced weight-gradient need on either axis: columns (input features) slice the
kept activation x, rows (output features) slice the cotangent, so the weight-gradient MatMul shrinks
by the ratio and only the slice of x must be kept for backward.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from pockprop.errors import CompileError
from pockprop.ops.builder import Builder
from pockprop.ir import Node, TensorType
from pockprop.ops.elementwise import unbroadcast
from pockprop.ops.registry import Lowering, Need, Op, Tag, aten, lowering_of, register


@register
class Linear(Op):
    """y = x W^T + b;  dx = g W,  dW = g2^T x2 (rows of g and x flattened),  db = sum(g2, 0).
    With `weight_in_out` the weight is stored (in, out), as Hugging Face's Conv1D (GPT-2) keeps it: y = x W + b."""
    name = "linear"
    sliceable = frozenset({1})
    tags = frozenset({Tag.LAYER})
    bn_fold_rank = 2

    def macs(self, types, node):  # type: ignore[no-untyped-def]
        """rows * out * in."""
        x, w = types[node.inputs[0]].shape, types[node.inputs[1]].shape
        return math.prod(x[:-1]) * w[0] * w[1]

    def weight_slice_axis(self, attrs, weight_shape):  # type: ignore[no-untyped-def]
        """The input-feature axis: 1 for (out, in) weights, 0 for (in, out)."""
        return 0 if attrs.get("weight_in_out") else 1

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        x, w = ins[0], ins[1]
        n_in, n_out = (w.shape[0], w.shape[1]) if attrs.get("weight_in_out") else (w.shape[1], w.shape[0])
        if x.shape[-1] != n_in:
            raise ValueError(f"linear: x {x.shape} does not match weight {w.shape}")
        return [TensorType(x.shape[:-1] + (n_out,), x.dtype)]

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        x, w, bias = (*node.inputs, None)[:3]
        g = gouts[0]
        assert g is not None
        in_out = bool(node.attrs.get("weight_in_out"))
        n_in, n_out = b.type(w).shape if in_out else b.type(w).shape[::-1]
        in_axis = 0 if in_out else 1  # of the weight
        dx = None
        if needs[0]:
            dx = b.op("matmul", [g, b.op("permute", [w], perm=[1, 0]) if in_out else w])
        dw = db = None
        if needs[1] or (bias is not None and needs[2]):
            g2 = g if b.type(g).rank == 2 else b.op("reshape", [g], shape=[b.type(g).numel // n_out, n_out])
            if needs[1]:
                x2 = x if b.type(x).rank == 2 else b.op("reshape", [x], shape=[b.type(x).numel // n_in, n_in])
                need, gw = needs[1], g2
                if need.axis == in_axis:  # input features: only this slice of x takes part (and must be kept)
                    x2 = b.op("slice", [x2], axis=1, start=need.start, stop=need.stop, step=1)
                elif need.axis is not None:  # output features: only this slice of the cotangent
                    gw = b.op("slice", [g2], axis=1, start=need.start, stop=need.stop, step=1)
                if in_out:  # dW (in, out) = x2^T g2
                    dw = b.op("matmul", [b.op("permute", [x2], perm=[1, 0]), gw], hint="d_weight")
                else:  # dW (out, in) = g2^T x2
                    dw = b.op("matmul", [b.op("permute", [gw], perm=[1, 0]), x2], hint="d_weight")
            if bias is not None and needs[2]:
                db = b.op("sum", [g2], axes=[0], keepdim=False, hint="d_bias")
        return [dx, dw] + ([db] if len(node.inputs) > 2 else [])

    def lower(self, e: Lowering, node: Node) -> None:
        x, w = node.inputs[0], node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        in_out = bool(node.attrs.get("weight_in_out"))
        if e.type(x).rank == 2:
            e.node("Gemm", [x, w, bias], node.outputs, transB=0 if in_out else 1)
            return
        y = e.node("MatMul", [x, w if in_out else e.node("Transpose", [w], perm=[1, 0])], None if bias else node.outputs)
        if bias is not None:
            e.node("Add", [y, bias], node.outputs)


@register
class MatMul(Op):
    """y = a @ b (batch dims broadcast);  da = g @ b^T,  db = a^T @ g (summed over broadcast batches).

    Lowerings where b is a matrix (a weight gradient g2^T x2 over flattened rows, or an input gradient
    g W, both from linear's VJP): "auto", one MatMul, or "gemm", one Gemm, a's leading axes flattened into
    rows around it. onnxruntime folds a Transpose feeding either into the product (FusedMatMul, Gemm's
    transA/transB), so both read the operands in place but run different kernels; which is faster depends
    on the shapes and the build (measured: docs/benchmarks.md, "Transformer backward products"). Products
    of batches of matrices (attention's) keep MatMul."""
    name = "matmul"
    lowerings = ("auto", "gemm")

    def lowering_options(self, types: Mapping[str, TensorType], node: Node) -> tuple[str, ...]:
        return self.lowerings if types[node.inputs[1]].rank == 2 else ()

    def macs(self, types, node):  # type: ignore[no-untyped-def]
        """batch * M * N * K."""
        return math.prod(types[node.outputs[0]].shape) * types[node.inputs[0]].shape[-1]

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        a, c = ins
        if a.rank < 2 or c.rank < 2 or a.shape[-1] != c.shape[-2]:
            raise ValueError(f"matmul: incompatible shapes {a.shape} @ {c.shape}")
        batch = tuple(int(s) for s in np.broadcast_shapes(a.shape[:-2], c.shape[:-2]))
        return [TensorType(batch + (a.shape[-2], c.shape[-1]), a.dtype)]

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        a, c = node.inputs
        g = gouts[0]

        def t(v: str) -> str:
            r = b.type(v).rank
            return b.op("permute", [v], perm=list(range(r - 2)) + [r - 1, r - 2])

        da = unbroadcast(b, b.op("matmul", [g, t(c)]), b.type(a).shape) if needs[0] else None
        dc = unbroadcast(b, b.op("matmul", [t(a), g]), b.type(c).shape) if needs[1] else None
        return [da, dc]

    def lower(self, e: Lowering, node: Node) -> None:
        a, c = node.inputs
        if lowering_of(node) != "gemm":
            e.node("MatMul", node.inputs, node.outputs)
        elif e.type(a).rank == 2:
            e.node("Gemm", [a, c], node.outputs)
        else:
            rows = e.node("Reshape", [a, e.ints([-1, e.type(a).shape[-1]])])
            e.node("Reshape", [e.node("Gemm", [rows, c]), e.ints(e.type(node.outputs[0]).shape)], node.outputs)


@aten("aten.linear.default")
def _linear(b: Builder, x: str, w: str, bias: str | None = None) -> str:
    return b.op("linear", [x, w] + ([bias] if bias is not None else []))


@aten("aten.mm.default", "aten.bmm.default", "aten.matmul.default")
def _mm(b: Builder, a: str, c: str) -> str:
    if b.type(a).rank < 2 or b.type(c).rank < 2:
        raise CompileError("matmul with a 1-D operand is not supported yet")
    return b.op("matmul", [a, c])


@aten("aten.addmm.default")
def _addmm(b: Builder, bias: str, a: str, c: str, beta: float = 1, alpha: float = 1) -> str:
    if alpha == 1 and beta == 1 and c in b.graph.constants and b.type(bias).shape == (b.type(c).shape[1],):
        # x @ W + b with W a weight of the model (Hugging Face's Conv1D): a linear layer, so schemes can
        # train its bias or a slice of its weight like any other
        return b.op("linear", [a, c, bias], weight_in_out=True)
    y = b.op("matmul", [a, c])
    if alpha != 1:
        y = b.op("mul", [y, b.scalar_like(float(alpha), y)])
    if beta != 1:
        bias = b.op("mul", [bias, b.scalar_like(float(beta), bias)])
    return b.op("add", [y, bias])
