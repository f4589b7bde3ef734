"""Scaled dot-product attention kept whole (torch's F.scaled_dot_product_attention; tracing/trace.py's KEEP).

Forward it is what torch's math decomposition computes, with its SDPA-safe softmax (a fully masked row
gives 0, not NaN); the probabilities P are a second output, which the VJP reads as the decomposed
graph's softmax VJP would. Kept whole, the step scales the scores once instead of q and k separately
(forward and backward) and has no transposes around 3-D reshapes: 23 ONNX nodes instead of 43, and a few
percent faster (docs/benchmarks.md has the measurement that decided it).
Masks, causal masks and grouped-query heads are resolved by the importer: the op sees one additive
float mask (or none) and as many key/value heads as query heads.
"""
from __future__ import annotations

import math

import numpy as np

from pockprop.ir import Node, TensorType
from pockprop.ops.builder import Builder
from pockprop.ops.dtype import cast
from pockprop.ops.elementwise import broadcast_shape, unbroadcast
from pockprop.ops.registry import Lowering, Need, Op, aten, register
from pockprop.ops.softmax import lower_safe_softmax, softmax_grad


def _swap_last(rank: int) -> list[int]:
    return list(range(rank - 2)) + [rank - 1, rank - 2]


@register
class Attention(Op):
    """o = P v, P = safe_softmax(q k^T s + mask) (also returned);  dv = P^T g,  dS = softmax VJP of g v^T,  dq = dS k s,  dk = dS^T q s,  dmask = dS."""
    name = "attention"

    def macs(self, types, node):  # type: ignore[no-untyped-def]
        """batch * T * S * (D + Dv): the two products."""
        q, v = types[node.inputs[0]].shape, types[node.inputs[2]].shape
        p = types[node.outputs[1]].shape
        return math.prod(p) * (q[-1] + v[-1])

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        q, k, v, mask = ins
        if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
            raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit")
        batch = broadcast_shape(broadcast_shape(q.shape[:-2], k.shape[:-2]), v.shape[:-2])
        scores = batch + (q.shape[-2], k.shape[-2])
        if mask is not None:
            scores = broadcast_shape(scores, mask.shape)
        return [TensorType(batch + (q.shape[-2], v.shape[-1]), q.dtype), TensorType(scores, q.dtype)]

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        q, k, v, mask = node.inputs
        p = node.outputs[1]
        g = gouts[0]  # P is the op's own intermediate: the model never reads it, so no cotangent reaches it
        assert g is not None

        def t(x: str) -> str:
            return b.op("permute", [x], perm=_swap_last(b.type(x).rank))

        dq = dk = dv = dmask = None
        if needs[2]:
            dv = unbroadcast(b, b.op("matmul", [t(p), g]), b.type(v).shape)
        if needs[0] or needs[1] or needs[3]:
            ds = softmax_grad(b, p, b.op("matmul", [g, t(v)]), b.type(p).rank - 1)
            if needs[3]:
                dmask = unbroadcast(b, ds, b.type(mask).shape)
            ds = b.op("mul", [ds, b.scalar_like(node.attrs["scale"], ds)])
            if needs[0]:
                dq = unbroadcast(b, b.op("matmul", [ds, k]), b.type(q).shape)
            if needs[1]:
                dk = unbroadcast(b, b.op("matmul", [t(ds), q]), b.type(k).shape)
        return [dq, dk, dv, dmask]

    def lower(self, e: Lowering, node: Node) -> None:
        q, k, v, mask = node.inputs
        o, p = node.outputs
        kt = e.node("Transpose", [k], perm=_swap_last(e.type(k).rank))
        scores = e.node("Mul", [e.node("MatMul", [q, kt]), e.const(node.attrs["scale"], e.type(q).dtype)])
        if mask is not None:
            scores = e.node("Add", [scores, mask])
        lower_safe_softmax(e, scores, e.type(p).rank - 1, p)
        e.node("MatMul", [p, v], [o])


def _repeat_heads(b: Builder, x: str, heads: int) -> str:
    """(..., Hkv, S, D) -> (..., heads, S, D), each key/value head serving heads/Hkv query heads in a row."""
    *lead, hkv, s, d = b.type(x).shape
    x = b.op("reshape", [x], shape=[*lead, hkv, 1, s, d])
    x = b.op("expand", [x], shape=[*lead, hkv, heads // hkv, s, d])
    return b.op("reshape", [x], shape=[*lead, heads, s, d])


@aten("aten.scaled_dot_product_attention.default")
def _sdpa(b: Builder, q: str, k: str, v: str, attn_mask: str | None = None, dropout_p: float = 0.0,
          is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> str:
    # dropout_p: the compiled graph runs the model in eval form, where dropout is the identity (as aten.dropout)
    if enable_gqa and b.type(k).shape[-3] != b.type(q).shape[-3]:
        k, v = _repeat_heads(b, k, b.type(q).shape[-3]), _repeat_heads(b, v, b.type(q).shape[-3])
    dt = b.type(q).dtype
    mask = attn_mask
    if mask is not None and b.type(mask).dtype == "bool":  # True attends: 0 there, -inf elsewhere
        mask = b.op("where", [mask, b.const(0.0, dt), b.const(-np.inf, dt)])
    elif mask is not None:
        mask = cast(b, mask, dt)
    if is_causal:  # torch's causal mask is aligned top-left: query i sees keys 0..i
        t, s = b.type(q).shape[-2], b.type(k).shape[-2]
        mask = b.const(np.triu(np.full((t, s), -np.inf), 1), dt, hint="causal_mask")
    scale = 1.0 / math.sqrt(b.type(q).shape[-1]) if scale is None else float(scale)
    out, _ = b.op("attention", [q, k, v, mask], scale=scale)
    return out

