"""Convolutions: 2-D conv (any stride, padding, dilation, groups) and its two backward ops.

`conv2d` lowers to ONNX Conv. Its input gradient is a transposed conv of the cotangent with the same
weight (`conv2d_input_grad`): at stride 1 an ONNX Conv with the flipped, in/out-swapped kernel (fast
in onnxruntime, and for a frozen layer the kernel transform folds away), otherwise ONNX ConvTranspose
with output_padding picked so the result is exactly the input's shape. Its weight gradient (`conv2d_weight_grad`) is itself a convolution, in the
formulation of the Tiny Training Engine: batch and channel axes swap roles, the cotangent g becomes
the kernel, stride and dilation trade places. Grouped and depthwise convs do the same in one Conv with
group = groups (each group's kernel spans the batch), and a 1x1 unpadded conv's weight gradient is a
single GEMM over all (sample, pixel) rows.

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
from pockprop.ops.registry import InputGradOp, Lowering, Need, Op, Tag, aten, register

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


@register
class Conv2dInputGrad(InputGradOp):
    """Backward helper of conv2d: dx = conv_transpose(g, W) with output_padding so dx has exactly input_shape."""
    name = "conv2d_input_grad"

    def macs(self, types, node):  # type: ignore[no-untyped-def]
        """What the forward conv costs: every (output position, tap) pair once."""
        return math.prod(types[node.inputs[0]].shape) * math.prod(types[node.inputs[1]].shape[1:])

    def lower(self, e: Lowering, node: Node) -> None:
        g, w = node.inputs
        a = node.attrs
        s, p, d = a["stride"], list(a["padding"]), a["dilation"]
        ho_wo, k = e.type(g).shape[2:], e.type(w).shape[2:]
        size = a["input_shape"][2:]
        # The Conv form needs the kernel flipped and transposed. A trained kernel pays that every step: worth
        # it while the kernel is no bigger than the cotangent (a deep layer's kernel dwarfs its cotangent
        # and took longer than ConvTranspose). A frozen kernel is transformed once, at load, but the copy
        # stays in memory beside the original: allowed up to 4x the cotangent, so deep layers with big
        # kernels keep ConvTranspose. The measurements behind both limits: docs/benchmarks.md.
        limit = 4 if e.is_constant(w) else 1
        cheap_kernel = e.type(w).numel <= limit * e.type(g).numel
        if list(s) == [1, 1] and all(p[i] <= d[i] * (k[i] - 1) for i in range(2)) and cheap_kernel:
            # At stride 1 the transposed conv is a plain conv of g with the flipped, in/out-swapped kernel
            # and padding d*(k-1) - p. onnxruntime's Conv runs in its blocked (NCHWc) kernels and, for a
            # frozen layer, folds the kernel transform into a constant at load; its ConvTranspose does
            # neither and is several times slower on depthwise and pointwise layers (docs/benchmarks.md).
            e.node("Conv", [g, _transposed_kernel(e, w, a["groups"])], node.outputs, strides=[1, 1],
                   pads=[d[i] * (k[i] - 1) - p[i] for i in range(2)] * 2, dilations=list(d), group=a["groups"])
            return
        # ConvTranspose gives s*(ho-1) + out_pad + d*(k-1) + 1 - 2p; out_pad is the remainder (< s)
        out_pad = [size[i] - (s[i] * (ho_wo[i] - 1) + d[i] * (k[i] - 1) + 1 - 2 * p[i]) for i in range(2)]
        e.node("ConvTranspose", [g, w], node.outputs, strides=list(s), pads=p + p, dilations=list(d),
               group=a["groups"], output_padding=out_pad if any(out_pad) else None)


def _transposed_kernel(e: Lowering, w: str, groups: int) -> str:
    """W (C_out, C_in/G, kh, kw) -> W' (C_in, C_out/G, kh, kw), per group in/out swapped, taps flipped."""
    c_out, cig, kh, kw = e.type(w).shape
    cog = c_out // groups
    if cog > 1 and cig > 1:
        if groups == 1:
            w = e.node("Transpose", [w], perm=[1, 0, 2, 3])
        else:
            w5 = e.node("Transpose", [e.node("Reshape", [w, e.ints([groups, cog, cig, kh, kw])])], perm=[0, 2, 1, 3, 4])
            w = e.node("Reshape", [w5, e.ints([groups * cig, cog, kh, kw])])
    elif cog != cig:  # one side is 1 per group: a reshape swaps the two axes
        w = e.node("Reshape", [w, e.ints([groups * cig, cog, kh, kw])])
    if (kh, kw) == (1, 1):
        return w
    big = -(2 ** 62)  # Slice with step -1 from the end to before the start: the taps reversed
    return e.node("Slice", [w, e.ints([-1, -1]), e.ints([big, big]), e.ints([2, 3]), e.ints([-1, -1])])


@register
class Conv2dWeightGrad(Op):
    """Backward helper of conv2d: dW[o,i,a,b] = sum_{n,u,v} g[n,o,u,v] * xpad[n,i,u*s+a*d,v*s+b*d] (per group)."""
    name = "conv2d_weight_grad"
    differentiable = False

    def macs(self, types, node):  # type: ignore[no-untyped-def]
        """(Possibly sliced) weight-gradient shape times the forward conv's output positions."""
        g = types[node.inputs[1]].shape  # (N, Cout_slice, Ho, Wo)
        return g[0] * g[2] * g[3] * math.prod(node.attrs["weight_shape"])

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        x, g = ins
        c_out, cig, kh, kw = attrs["weight_shape"]
        groups = attrs["groups"]
        s, p, d = attrs["stride"], attrs["padding"], attrs["dilation"]
        want = (x.shape[0], c_out) + tuple(conv_out_size(x.shape[2 + i], (kh, kw)[i], s[i], p[i], d[i]) for i in range(2))
        if x.shape[1] != cig * groups or c_out % groups or g.shape != want:
            raise ValueError(f"conv2d_weight_grad: x {x.shape}, g {g.shape} do not fit weight "
                             f"{tuple(attrs['weight_shape'])} with groups={groups}")
        return [TensorType(tuple(attrs["weight_shape"]), x.dtype)]

    def lower(self, e: Lowering, node: Node) -> None:
        x, g = node.inputs
        a = node.attrs
        c_out, cig, kh, kw = a["weight_shape"]
        groups = a["groups"]
        s, p, d = list(a["stride"]), list(a["padding"]), list(a["dilation"])
        n, c_in, h, w = e.type(x).shape
        ho, wo = e.type(g).shape[2:]

        if (kh, kw) == (1, 1) and p == [0, 0] and groups == 1:
            # pointwise: dW = G X^T over all (sample, pixel) columns, one GEMM
            if s != [1, 1]:
                x = e.node("Slice", [x, e.ints([0, 0]), e.ints([(ho - 1) * s[0] + 1, (wo - 1) * s[1] + 1]),
                                     e.ints([2, 3]), e.ints(s)])
            cols = []
            for v, c in ((g, c_out), (x, c_in)):
                if n > 1:
                    v = e.node("Transpose", [e.node("Reshape", [v, e.ints([n, c, ho * wo])])], perm=[1, 0, 2])
                cols.append(e.node("Reshape", [v, e.ints([c, n * ho * wo])]))
            dw = e.node("Gemm", cols, transB=1)
            e.node("Reshape", [dw, e.ints([c_out, c_in, 1, 1])], node.outputs)
            return

        # x -> (cig, groups*n, h, w): the batch becomes the channel axis, inside each group
        if groups == 1:
            xt = e.node("Transpose", [x], perm=[1, 0, 2, 3])
        else:
            x5 = e.node("Reshape", [x, e.ints([n, groups, cig, h, w])])
            xt = e.node("Reshape", [e.node("Transpose", [x5], perm=[2, 1, 0, 3, 4]), e.ints([cig, groups * n, h, w])])
        gt = e.node("Transpose", [g], perm=[1, 0, 2, 3])  # (c_out, n, ho, wo): the kernel, n in-channels per group
        # In padded coordinates the forward reads [0, L) with L = s*(out-1) + d*(k-1) + 1. Feed the Conv
        # exactly that: crop x's end when it is longer, pad its end when shorter. The sweep of g then
        # yields exactly k taps (no extra taps computed and thrown away).
        pads_end, crop, k_out = [], [], []
        for i, (size, k, out) in enumerate(((h, kh, ho), (w, kw, wo))):
            content = max(s[i] * (out - 1) + d[i] * (k - 1) + 1 - p[i], 1)  # rows of x the taps read
            crop.append(min(content, size))
            pads_end.append(max(content - size, 0))
            k_out.append((p[i] + content - s[i] * (out - 1) - 1) // d[i] + 1)
        if crop != [h, w]:
            xt = e.node("Slice", [xt, e.ints([0, 0]), e.ints(crop), e.ints([2, 3])])
        dw = e.node("Conv", [xt, gt], strides=d, dilations=s, pads=p + pads_end, group=groups)  # (cig, c_out, k', k')
        if k_out != [kh, kw]:
            dw = e.node("Slice", [dw, e.ints([0, 0]), e.ints([kh, kw]), e.ints([2, 3])])
        if cig == 1:
            e.node("Reshape", [dw, e.ints([c_out, 1, kh, kw])], node.outputs)
        else:
            e.node("Transpose", [dw], node.outputs, perm=[1, 0, 2, 3])


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
