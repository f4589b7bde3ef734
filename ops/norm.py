"""Normalization: batch norm in eval form (frozen statistics) and layer norm (statistics of each sample).
(Batch norm in train mode is built from primitive ops by compiler/batchnorm.py.)

Batch norm's affine weight and bias may be trainable; its statistics never are (they are buffers). With
the statistics frozen, batch norm is a per-channel affine map, so its VJP is elementwise. Layer norm
normalizes over the trailing axes from `axis` on; it lowers to ONNX LayerNormalization (standard from
opset 17), whose mean and inverse standard deviation outputs its VJP reads instead of recomputing them.
RMS norm needs no op of its own: torch decomposes it into pow, mean, add, rsqrt and mul.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pockprop.ops.builder import Builder
from pockprop.ir import Node, TensorType
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
    # torch returns (y, save_mean, save_invstd); in eval form only y is ever used. The momentum (0.0 for a
    # cumulative average) is kept for compiler/batchnorm.py, which trains batch norm as train mode does.
    return [b.op("batch_norm", [x, w, bias, mean, var], eps=float(eps), momentum=float(momentum)), None, None]


@register
class LayerNorm(Op):
    """y = xhat * w + b, xhat = (x - mu) * rstd over axes >= axis (mu, rstd also returned, not differentiated);  dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)), gw = g * w."""
    name = "layer_norm"
    tags = frozenset({Tag.LAYER})

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        x, axis = ins[0], attrs["axis"]
        stat = TensorType(x.shape[:axis] + (1,) * (x.rank - axis), x.dtype)
        return [x, stat, stat]

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        x, w, bias = node.inputs
        y, mu, rstd = node.outputs
        g = gouts[0]  # as in torch, the statistics outputs are not differentiated: their cotangents are dropped
        if g is None:  # only the statistics reach the loss: no gradient, as in torch
            g = b.op("expand", [b.scalar_like(0.0, y)], shape=list(b.type(y).shape))
        axis, rank = node.attrs["axis"], b.type(x).rank
        norm_axes, lead_axes = list(range(axis, rank)), list(range(axis))
        xhat = b.op("mul", [b.op("sub", [x, mu]), rstd], hint="ln_xhat")

        def over_lead(v: str, hint: str) -> str:
            return b.op("sum", [v], axes=lead_axes, keepdim=False, hint=hint) if lead_axes else v

        dx = dw = db = None
        if needs[0]:
            gw = g if w is None else b.op("mul", [g, w])
            avg = b.op("mean", [gw], axes=norm_axes, keepdim=True)
            proj = b.op("mean", [b.op("mul", [gw, xhat])], axes=norm_axes, keepdim=True)
            dx = b.op("mul", [b.op("sub", [b.op("sub", [gw, avg]), b.op("mul", [xhat, proj])]), rstd])
        if w is not None and needs[1]:
            dw = over_lead(b.op("mul", [g, xhat]), "d_weight")
        if bias is not None and needs[2]:
            db = over_lead(g, "d_bias")
        return [dx, dw, db]

    def lower(self, e: Lowering, node: Node) -> None:
        x, w, bias = node.inputs
        dt = e.type(x).dtype
        norm_shape = e.type(x).shape[node.attrs["axis"]:]
        w = w if w is not None else e.node("Expand", [e.const(1.0, dt), e.ints(norm_shape)])
        # the statistics outputs are optional in ONNX: ask for them only where the graph reads them
        outs = [node.outputs[0]] + [o if e.is_used(o) else "" for o in node.outputs[1:]]
        while outs[-1] == "":
            outs.pop()
        e.node("LayerNormalization", [x, w, bias], outs, axis=node.attrs["axis"], epsilon=float(node.attrs["eps"]))


@aten("aten.native_layer_norm.default")
def _layer_norm(b: Builder, x: str, normalized_shape: Any, w: str | None, bias: str | None,
                eps: float) -> tuple[str, str, str]:
    """(y, mean, rstd) as torch returns them, mean and rstd shaped (leading axes..., 1, ..., 1)."""
    return b.op("layer_norm", [x, w, bias], axis=b.type(x).rank - len(normalized_shape), eps=float(eps))
