"""Normalization with frozen statistics: batch norm in eval form (running mean/var are constants).

The affine weight and bias may be trainable; the statistics never are (they are buffers). With the
statistics frozen, batch norm is a per-channel affine map, so its VJP is elementwise.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pockprop.ops.builder import Builder
from pockprop.ir import Node
from pockprop.ops.registry import Lowering, Need, Op, Tag, aten, register


def _channel_view(b: Builder, v: str, rank: int) -> str:
    """(C,) -> (1, C, 1, ...) so it broadcasts against an (N, C, ...) activation."""
    return b.op("reshape", [v], shape=[1, b.type(v).shape[0]] + [1] * (rank - 2))


@register
class BatchNorm(Op):
    """y = (x - mean) * s + b with s = w / sqrt(var + eps);  dx = g * s,  dw = sum(g * xhat),  db = sum(g)."""
    name = "batch_norm"
    tags = frozenset({Tag.LAYER})

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        return [ins[0]]

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        x, w, bias, mean, var = node.inputs
        g = gouts[0]
        assert g is not None
        rank = b.type(x).rank
        axes = [0] + list(range(2, rank))
        inv = b.op("div", [b.scalar_like(1.0, var), b.op("sqrt", [b.op("add", [var, b.scalar_like(node.attrs["eps"], var)])])],
                   hint="bn_invstd")
        dx = dw = db = None
        if needs[0]:
            scale = inv if w is None else b.op("mul", [w, inv])
            dx = b.op("mul", [g, _channel_view(b, scale, rank)])
        if w is not None and needs[1]:
            xhat = b.op("mul", [b.op("sub", [x, _channel_view(b, mean, rank)]), _channel_view(b, inv, rank)], hint="bn_xhat")
            dw = b.op("sum", [b.op("mul", [g, xhat])], axes=axes, keepdim=False, hint="d_weight")
        if bias is not None and needs[2]:
            db = b.op("sum", [g], axes=axes, keepdim=False, hint="d_bias")
        return [dx, dw, db, None, None]

    def lower(self, e: Lowering, node: Node) -> None:
        x, w, bias, mean, var = node.inputs
        c = e.type(x).shape[1]
        dt = e.type(x).dtype
        w = w if w is not None else e.const(np.ones(c), dt, "bn_ones")
        bias = bias if bias is not None else e.const(np.zeros(c), dt, "bn_zeros")
        e.node("BatchNormalization", [x, w, bias, mean, var], node.outputs, epsilon=float(node.attrs["eps"]))


@aten("aten._native_batch_norm_legit_no_training.default")
def _batch_norm(b: Builder, x: str, w: str | None, bias: str | None, mean: str, var: str,
                momentum: float, eps: float) -> list[str | None]:
    # torch returns (y, save_mean, save_invstd); in eval form only y is ever used
    return [b.op("batch_norm", [x, w, bias, mean, var], eps=float(eps)), None, None]
