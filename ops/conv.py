"""Convolutions: 2-D conv (any stride, padding, dilation, groups); its two backward ops live in conv_grad.py.

`conv2d` lowers to ONNX Conv. Its input gradient is a transposed conv of the cotangent with the same
weight (`conv2d_input_grad`): by default at stride 1 an ONNX Conv with the flipped, in/out-swapped kernel
(fast in onnxruntime, and for a frozen layer the kernel transform folds away), otherwise ONNX
ConvTranspose with output_padding picked so the result is exactly the input's shape. Its weight gradient
(`conv2d_weight_grad`) is by default itself a convolution, in the
formulation of the Tiny Training Engine: batch and channel axes swap roles, the cotangent g becomes
the kernel, stride and dilation trade places. Grouped and depthwise convs do the same in one Conv with
group = groups (each group's kernel spans the batch), and a 1x1 unpadded conv's weight gradient is a
single GEMM over all (sample, pixel) rows. Both backward ops have alternative lowerings (conv_grad.py).

The weight gradient honours a sliced need directly (sparse training updates only part of a layer):
on axis 1 (input channels of each group) only that slice of the kept activation x takes part, so
the gradient's MACs and the activation kept for backward shrink by the ratio; on axis 0 (output
channels) only the groups that hold the wanted channels take part (the cotangent's channels, and
for grouped/depthwise convs x's channels of those groups, are sliced first).
"""
from __future__ import annotations

import math
from typing import Any

from pockprop.ops.builder import Builder
from pockprop.ir import Node, TensorType
from pockprop.ops.registry import Lowering, Need, Op, Tag, aten, register

_CONV_ATTRS = ("stride", "padding", "dilation", "groups")


def pair(v: Any) -> list[int]:
    """An int or a 1-/2-list of ints as a 2-list (torch accepts all three for 2-D ops)."""
    if isinstance(v, int):
        return [v, v]
    v = [int(i) for i in v]
    return v * 2 if len(v) == 1 else v


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Output extent of a convolution window sweep along one axis (floor mode)."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _slice(b: Builder, v: str, axis: int, start: int, stop: int) -> str:
    if (start, stop) == (0, b.type(v).shape[axis]):
        return v
    return b.op("slice", [v], axis=axis, start=start, stop=stop, step=1)


@register
class Conv2d(Op):
    """y = conv(x, W) + b;  dx = conv_transpose(g, W),  dW = conv(x^T, g^T) (stride <-> dilation),  db = sum(g, [0,2,3])."""
    name = "conv2d"
    sliceable = frozenset({1})
    tags = frozenset({Tag.LAYER})
    bn_fold_rank = 4

    def weight_slice_axis(self, attrs, weight_shape):  # type: ignore[no-untyped-def]
        """Input channels (axis 1); a depthwise conv has one per group, so its channels (axis 0)."""
        return 0 if weight_shape[1] == 1 and attrs.get("groups", 1) > 1 else 1

    def macs(self, types, node):  # type: ignore[no-untyped-def]
        """N*Cout*Ho*Wo * Cin/groups*kh*kw."""
        return math.prod(types[node.outputs[0]].shape) * math.prod(types[node.inputs[1]].shape[1:])

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        x, w = ins[0], ins[1]
        groups = attrs["groups"]
        if x.rank != 4 or w.rank != 4 or x.shape[1] != w.shape[1] * groups or w.shape[0] % groups:
            raise ValueError(f"conv2d: x {x.shape} does not match weight {w.shape} with groups={groups}")
        if len(ins) > 2 and ins[2] is not None and ins[2].shape != (w.shape[0],):
            raise ValueError(f"conv2d: bias {ins[2].shape} does not match weight {w.shape}")
        s, p, d = attrs["stride"], attrs["padding"], attrs["dilation"]
        ho, wo = (conv_out_size(x.shape[2 + i], w.shape[2 + i], s[i], p[i], d[i]) for i in range(2))
        if ho < 1 or wo < 1:
            raise ValueError(f"conv2d: input {x.shape} is smaller than the (dilated) kernel {w.shape}")
        return [TensorType((x.shape[0], w.shape[0], ho, wo), x.dtype)]

    def vjp(self, b: Builder, node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        x, w = node.inputs[0], node.inputs[1]
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        g = gouts[0]
        assert g is not None and x is not None and w is not None
        conv = {k: node.attrs[k] for k in _CONV_ATTRS}
        dx = dw = db = None
        if needs[0] is not None:
            dx = b.op("conv2d_input_grad", [g, w], input_shape=list(b.type(x).shape), hint="d_input", **conv)
        if needs[1] is not None:
            dw = _weight_grad(b, x, g, b.type(w).shape, conv, needs[1])
        if has_bias and needs[2] is not None:
            db = b.op("sum", [g], axes=[0, 2, 3], keepdim=False, hint="d_bias")
        return [dx, dw] + ([db] if len(node.inputs) > 2 else [])

    def lower(self, e: Lowering, node: Node) -> None:
        a = node.attrs
        p = list(a["padding"])
        e.node("Conv", list(node.inputs), node.outputs, strides=list(a["stride"]), pads=p + p,
               dilations=list(a["dilation"]), group=a["groups"])


def _weight_grad(b: Builder, x: str, g: str, wshape: tuple[int, ...], conv: dict[str, Any], need: Need) -> str:
    """dW or the slice of it that `need` asks for, computing (and keeping) as little as possible."""
    c_out, cig, kh, kw = wshape
    groups = conv["groups"]
    cog = c_out // groups
    n, _, h, w = b.type(x).shape
    attrs = {k: v for k, v in conv.items() if k != "groups"}

    def wgrad(xs: str, gs: str, ngroups: int, shape: tuple[int, ...]) -> str:
        return b.op("conv2d_weight_grad", [xs, gs], groups=ngroups, weight_shape=list(shape), hint="d_weight", **attrs)

    axis = need.axis
    if axis is not None and axis < 0:
        axis += 4
    if axis is None or (need.start, need.stop) == (0, wshape[axis]):
        return wgrad(x, g, groups, wshape)
    lo, hi = need.start, need.stop
    if axis == 1:  # input channels of every group: only those channels of x take part
        if groups == 1:
            xs = _slice(b, x, 1, lo, hi)
        else:
            x5 = b.op("reshape", [x], shape=[n, groups, cig, h, w])
            x5 = b.op("slice", [x5], axis=2, start=lo, stop=hi, step=1)
            xs = b.op("reshape", [x5], shape=[n, groups * (hi - lo), h, w])
        return wgrad(xs, g, groups, (c_out, hi - lo, kh, kw))
    if axis == 0:  # output channels: only the groups holding them take part
        g0, g1 = lo // cog, (hi - 1) // cog + 1
        xs = _slice(b, x, 1, g0 * cig, g1 * cig)
        if g1 - g0 == 1:  # within one group any subset of output channels is a plain conv
            return wgrad(xs, _slice(b, g, 1, lo, hi), 1, (hi - lo, cig, kh, kw))
        gs = _slice(b, g, 1, g0 * cog, g1 * cog)
        dw = wgrad(xs, gs, g1 - g0, ((g1 - g0) * cog, cig, kh, kw))
        return _slice(b, dw, 0, lo - g0 * cog, hi - g0 * cog)
    # kernel rows or columns: nothing to save, slice the whole gradient
    return _slice(b, wgrad(x, g, groups, wshape), axis, lo, hi)


# -- ATen importers -------------------------------------------------------------------------------

@aten("aten.convolution.default")
def _convolution(b: Builder, x: str, w: str, bias: str | None, stride: Any, padding: Any, dilation: Any,
                 transposed: bool, output_padding: Any, groups: int) -> str:
    from pockprop.errors import UnsupportedVariant

    if transposed:
        raise UnsupportedVariant("transposed convolution")
    if b.type(w).rank != 4 or b.type(x).rank != 4:
        raise UnsupportedVariant(f"{b.type(w).rank - 2}-D convolution (only 2-D with a batch axis is supported)")
    return b.op("conv2d", [x, w] + ([bias] if bias is not None else []), stride=pair(stride),
                padding=pair(padding), dilation=pair(dilation), groups=int(groups))
