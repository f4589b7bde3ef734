"""conv2d's two backward ops and their alternative standard-ONNX lowerings (Op.lowerings).

Each lowering computes the same values; which is fastest depends on shapes and the onnxruntime build,
so a Chooser (passes/lowerings.py: a target profile, or compiler/lowering_cost.py) picks one per node.
The default of each op ("auto") is the lowering the compiler always used; the others are:

conv2d_input_grad, dx = conv_transpose(g, W) cropped to input_shape:
- "conv" (stride 1): one Conv of g with the flipped, in/out-swapped kernel, padding d*(k-1) - p (a
  negative pad crops g first).
- "conv_transpose": one ONNX ConvTranspose with output_padding.
- "zero_interleave" (stride > 1): g with s-1 zeros after each pixel (Reshape, Pad, Reshape), then the
  "conv" form at stride 1.
- "subpixel" (equal strides s, dilation 1, kernel >= s): output pixel i + p = q*s + r only meets taps
  r, r+s, ...: one stride-1 Conv per phase (r0, r1) with that sub-kernel, the s*s results interleaved
  by DepthToSpace, then cropped to input_shape. No multiply touches an inserted zero.

conv2d_weight_grad, dW[o,i,a,b] = sum_{n,u,v} g[n,o,u,v] * xpad[n,i,u*s+a*d,v*s+b*d]:
- "im2col": the k*k shifted, strided views of padded x (Slices) stacked into patches, then one
  GEMM (per group a batched MatMul) with g.
- "taps" (groups 1, up to 25 taps): one GEMM per tap of g with that shifted view of x.
- "depthwise_taps" (one input channel per group): per tap Slice, Mul with g, ReduceSum: no GEMM at all.
- "batched_gemm" (unpadded 1x1, groups 1, batch > 1): sum over samples of G_n X_n^T, one batched MatMul
  and a ReduceSum, where the default moves both operands to (channels, samples * pixels) first.
"""
from __future__ import annotations

import math
from typing import Mapping

from pockprop.ir import Node, TensorType
from pockprop.ops.conv import conv_out_size
from pockprop.ops.registry import InputGradOp, Lowering, Op, lowering_of, register


@register
class Conv2dInputGrad(InputGradOp):
    """Backward helper of conv2d: dx = conv_transpose(g, W) with output_padding so dx has exactly input_shape."""
    name = "conv2d_input_grad"
    lowerings = ("auto", "conv", "conv_transpose", "subpixel", "zero_interleave")

    def lowering_options(self, types: Mapping[str, TensorType], node: Node) -> tuple[str, ...]:
        s, d = list(node.attrs["stride"]), list(node.attrs["dilation"])
        k = types[node.inputs[1]].shape[2:]
        if s == [1, 1]:
            return ("auto", "conv", "conv_transpose")
        subpixel = s[0] == s[1] and d == [1, 1] and k[0] >= s[0] and k[1] >= s[1]
        return ("auto", "conv_transpose") + (("subpixel",) if subpixel else ()) + ("zero_interleave",)

    def macs(self, types, node):  # type: ignore[no-untyped-def]
        """What the forward conv costs: every (output position, tap) pair once."""
        return math.prod(types[node.inputs[0]].shape) * math.prod(types[node.inputs[1]].shape[1:])

    def lower(self, e: Lowering, node: Node) -> None:
        g, w = node.inputs
        a = node.attrs
        s, p, d = a["stride"], list(a["padding"]), a["dilation"]
        ho_wo, k = e.type(g).shape[2:], e.type(w).shape[2:]
        size = a["input_shape"][2:]
        how = lowering_of(node) or "auto"
        if how == "auto":
            # The Conv form needs the kernel flipped and transposed. A trained kernel pays that every step:
            # worth it while the kernel is no bigger than the cotangent (a deep layer's kernel dwarfs its
            # cotangent and took longer than ConvTranspose). A frozen kernel is transformed once, at load,
            # but the copy stays in memory beside the original: allowed up to 4x the cotangent, so deep
            # layers with big kernels keep ConvTranspose. The measurements behind both limits:
            # docs/benchmarks.md. At stride 1 onnxruntime's Conv runs in its blocked (NCHWc) kernels and,
            # for a frozen layer, folds the kernel transform into a constant at load; its ConvTranspose
            # does neither and is several times slower on depthwise and pointwise layers.
            limit = 4 if e.is_constant(w) else 1
            cheap_kernel = e.type(w).numel <= limit * e.type(g).numel
            fits = all(p[i] <= d[i] * (k[i] - 1) for i in range(2))
            how = "conv" if list(s) == [1, 1] and fits and cheap_kernel else "conv_transpose"
        if how == "conv":
            _flipped_conv(e, g, ho_wo, w, node)
        elif how == "zero_interleave":
            n, c = e.type(g).shape[:2]
            z = e.node("Reshape", [g, e.ints([n, c, ho_wo[0], 1, ho_wo[1], 1])])
            z = e.node("Pad", [z, e.ints([0] * 9 + [s[0] - 1, 0, s[1] - 1])])
            z = e.node("Reshape", [z, e.ints([n, c, ho_wo[0] * s[0], ho_wo[1] * s[1]])])
            _flipped_conv(e, z, (ho_wo[0] * s[0], ho_wo[1] * s[1]), w, node)
        elif how == "subpixel":
            _subpixel(e, g, w, node)
        else:
            # ConvTranspose gives s*(ho-1) + out_pad + d*(k-1) + 1 - 2p; out_pad is the remainder (< s)
            out_pad = [size[i] - (s[i] * (ho_wo[i] - 1) + d[i] * (k[i] - 1) + 1 - 2 * p[i]) for i in range(2)]
            e.node("ConvTranspose", [g, w], node.outputs, strides=list(s), pads=p + p, dilations=list(d),
                   group=a["groups"], output_padding=out_pad if any(out_pad) else None)


def _flipped_conv(e: Lowering, g: str, g_size: tuple[int, ...], w: str, node: Node) -> None:
    """The stride-1 transposed conv of g (spatial size g_size) with W, cropped to input_shape: a Conv with the
    flipped, swapped kernel, padded d*(k-1) - p in front and whatever makes the length right at the end
    (a negative pad crops g instead)."""
    a = node.attrs
    p, d, size = a["padding"], a["dilation"], a["input_shape"][2:]
    k = e.type(w).shape[2:]
    begin = [d[i] * (k[i] - 1) - p[i] for i in range(2)]
    end = [size[i] + d[i] * (k[i] - 1) - g_size[i] - begin[i] for i in range(2)]
    if min(begin + end) < 0:
        g = e.node("Slice", [g, e.ints([max(-b, 0) for b in begin]),
                             e.ints([g_size[i] - max(-end[i], 0) for i in range(2)]), e.ints([2, 3])])
        begin, end = [max(b, 0) for b in begin], [max(v, 0) for v in end]
    e.node("Conv", [g, _transposed_kernel(e, w, a["groups"])], node.outputs, strides=[1, 1], pads=begin + end,
           dilations=list(d), group=a["groups"])


def _subpixel(e: Lowering, g: str, w: str, node: Node) -> None:
    """dx in padded coordinates is z[q*s + r] = sum_t g[q - t] W[r + s*t] per phase r: s*s stride-1 Convs of g
    with the flipped phase sub-kernels, interleaved by DepthToSpace, cropped from p to p + input size."""
    a = node.attrs
    s, p, groups, size = a["stride"][0], a["padding"], a["groups"], a["input_shape"][2:]
    c_out, cig, kh, kw = e.type(w).shape
    ho_wo = e.type(g).shape[2:]
    # every phase yields q in [0, q_len): enough for the last output row, and for every tap of phase 0
    q_len = [max(ho_wo[i] + -(-(kh, kw)[i] // s) - 1, -(-(size[i] + p[i]) // s)) for i in range(2)]
    phases = []
    for r0 in range(s):
        for r1 in range(s):
            taps = (-(-(kh - r0) // s), -(-(kw - r1) // s))
            sub = e.node("Slice", [w, e.ints([r0, r1]), e.ints([kh, kw]), e.ints([2, 3]), e.ints([s, s])])
            kernel = _transposed_kernel(e, sub, groups, (c_out, cig) + taps)
            pads = [taps[0] - 1, taps[1] - 1, q_len[0] - ho_wo[0], q_len[1] - ho_wo[1]]
            phases.append(e.node("Conv", [g, kernel], strides=[1, 1], pads=pads, group=groups))
    z = e.node("DepthToSpace", [e.node("Concat", phases, axis=1)], blocksize=s, mode="DCR")
    e.node("Slice", [z, e.ints(p), e.ints([p[0] + size[0], p[1] + size[1]]), e.ints([2, 3])], node.outputs)


def _transposed_kernel(e: Lowering, w: str, groups: int, shape: tuple[int, ...] | None = None) -> str:
    """W (C_out, C_in/G, kh, kw) -> W' (C_in, C_out/G, kh, kw), per group in/out swapped, taps flipped.
    `shape` is W's shape when W is not an IR value (a slice made by the lowering)."""
    c_out, cig, kh, kw = shape or e.type(w).shape
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
    lowerings = ("auto", "im2col", "taps", "depthwise_taps", "batched_gemm")

    def lowering_options(self, types: Mapping[str, TensorType], node: Node) -> tuple[str, ...]:
        c_out, cig, kh, kw = node.attrs["weight_shape"]
        groups = node.attrs["groups"]
        pointwise = (kh, kw) == (1, 1) and list(node.attrs["padding"]) == [0, 0]
        if pointwise and groups == 1:  # the default is already one GEMM, which "im2col" and "taps" would repeat
            return ("auto", "batched_gemm") if types[node.inputs[0]].shape[0] > 1 else ()
        return ("auto", "im2col") + (("taps",) if groups == 1 and kh * kw <= 25 else ()) \
            + (("depthwise_taps",) if cig == 1 else ())

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
        how = lowering_of(node) or "auto"
        if how == "im2col":
            _im2col(e, node)
        elif how == "taps":
            _taps(e, node)
        elif how == "depthwise_taps":
            _depthwise_taps(e, node)
        elif how == "batched_gemm":
            _batched_gemm(e, node)
        else:
            _swapped_conv(e, node)


def _swapped_conv(e: Lowering, node: Node) -> None:
    """The default: a pointwise unpadded conv is one GEMM; any other a Conv with batch and channels swapped."""
    x, g = node.inputs
    a = node.attrs
    c_out, cig, kh, kw = a["weight_shape"]
    groups = a["groups"]
    s, p, d = list(a["stride"]), list(a["padding"]), list(a["dilation"])
    n, c_in, h, w = e.type(x).shape
    ho, wo = e.type(g).shape[2:]

    if (kh, kw) == (1, 1) and p == [0, 0] and groups == 1:
        # pointwise: dW = G X^T over all (sample, pixel) columns, one GEMM
        x = _pixels_read(e, x, s, ho, wo)
        cols = [_columns(e, g, n, c_out, ho * wo), _columns(e, x, n, c_in, ho * wo)]
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


def _pixels_read(e: Lowering, x: str, s: list[int], ho: int, wo: int) -> str:
    """The pixels of x an unpadded pointwise conv of stride s reads: (n, c, ho, wo)."""
    if s == [1, 1]:
        return x
    return e.node("Slice", [x, e.ints([0, 0]), e.ints([(ho - 1) * s[0] + 1, (wo - 1) * s[1] + 1]), e.ints([2, 3]),
                            e.ints(s)])


def _batched_gemm(e: Lowering, node: Node) -> None:
    """Pointwise unpadded, groups 1: dW = sum_n G_n X_n^T, one MatMul batched over the samples (x's pixels
    and channels swapped per sample) and a ReduceSum, instead of moving both operands to (c, n * pixels)."""
    x, g = node.inputs
    c_out, c_in = node.attrs["weight_shape"][:2]
    n = e.type(x).shape[0]
    ho, wo = e.type(g).shape[2:]
    x = _pixels_read(e, x, list(node.attrs["stride"]), ho, wo)
    xt = e.node("Transpose", [e.node("Reshape", [x, e.ints([n, c_in, ho * wo])])], perm=[0, 2, 1])
    per_sample = e.node("MatMul", [e.node("Reshape", [g, e.ints([n, c_out, ho * wo])]), xt])  # (n, c_out, c_in)
    dw = e.node("ReduceSum", [per_sample, e.ints([0])], keepdims=0)
    e.node("Reshape", [dw, e.ints([c_out, c_in, 1, 1])], node.outputs)


def _columns(e: Lowering, v: str, n: int, c: int, pixels: int) -> str:
    """(n, c, ...pixels) -> (c, n * pixels): one column per (sample, pixel), the GEMM operand."""
    if n > 1:
        v = e.node("Transpose", [e.node("Reshape", [v, e.ints([n, c, pixels])])], perm=[1, 0, 2])
    return e.node("Reshape", [v, e.ints([c, n * pixels])])


def _tap_views(e: Lowering, v: str, node: Node, ho_wo: tuple[int, ...]) -> list[str]:
    """For each tap (a, b), row-major: the view of v (spatial axes 2, 3 padded by p) that tap reads, at
    stride s: v_ab[..., u, w] = vpad[..., u*s + a*d, w*s + b*d], shaped (..., ho, wo)."""
    a = node.attrs
    _, _, kh, kw = a["weight_shape"]
    s, p, d = list(a["stride"]), list(a["padding"]), list(a["dilation"])
    if p != [0, 0]:
        v = e.node("Pad", [v, e.ints([0, 0, p[0], p[1], 0, 0, p[0], p[1]])])
    views = []
    for ta in range(kh):
        for tb in range(kw):
            start = [ta * d[0], tb * d[1]]
            stop = [start[i] + s[i] * (ho_wo[i] - 1) + 1 for i in range(2)]
            views.append(e.node("Slice", [v, e.ints(start), e.ints(stop), e.ints([2, 3]), e.ints(s)]))
    return views


def _channels_first(e: Lowering, x: str) -> str:
    """(n, c, h, w) -> (c, n, h, w), so a view's (c, n*ho*wo) columns need no further copy."""
    return e.node("Transpose", [x], perm=[1, 0, 2, 3]) if e.type(x).shape[0] > 1 else \
        e.node("Reshape", [x, e.ints([e.type(x).shape[1], 1] + list(e.type(x).shape[2:]))])


def _im2col(e: Lowering, node: Node) -> None:
    """Patches (c_in * k*k, n*ho*wo) from the tap views of x, then dW = G P^T: one GEMM (groups 1) or one
    MatMul batched over groups."""
    x, g = node.inputs
    c_out, cig, kh, kw = node.attrs["weight_shape"]
    groups = node.attrs["groups"]
    n, c_in = e.type(x).shape[:2]
    ho_wo = e.type(g).shape[2:]
    cols = n * ho_wo[0] * ho_wo[1]
    views = _tap_views(e, _channels_first(e, x), node, ho_wo)  # each (c_in, n, ho, wo)
    stacked = e.node("Concat", [e.node("Unsqueeze", [v, e.ints([1])]) for v in views], axis=1)  # (c_in, k*k, n, ho, wo)
    if groups == 1:
        patches = e.node("Reshape", [stacked, e.ints([c_in * kh * kw, cols])])
        dw = e.node("Gemm", [_columns(e, g, n, c_out, ho_wo[0] * ho_wo[1]), patches], transB=1)
        e.node("Reshape", [dw, e.ints([c_out, cig, kh, kw])], node.outputs)
        return
    cog = c_out // groups
    patches = e.node("Reshape", [stacked, e.ints([groups, cig * kh * kw, cols])])
    g4 = e.node("Reshape", [g, e.ints([n, groups, cog, ho_wo[0] * ho_wo[1]])])
    gt = e.node("Reshape", [e.node("Transpose", [g4], perm=[1, 0, 3, 2]), e.ints([groups, cols, cog])])
    dw = e.node("Transpose", [e.node("MatMul", [patches, gt])], perm=[0, 2, 1])  # (groups, cog, cig*k*k)
    e.node("Reshape", [dw, e.ints([c_out, cig, kh, kw])], node.outputs)


def _taps(e: Lowering, node: Node) -> None:
    """groups 1: dW[:, :, a, b] = G X_ab^T, one GEMM per tap against the columns of g (made once)."""
    x, g = node.inputs
    c_out, c_in, kh, kw = node.attrs["weight_shape"]
    n = e.type(x).shape[0]
    ho_wo = e.type(g).shape[2:]
    gcols = _columns(e, g, n, c_out, ho_wo[0] * ho_wo[1])
    per_tap = []
    for v in _tap_views(e, _channels_first(e, x), node, ho_wo):
        xcols = e.node("Reshape", [v, e.ints([c_in, n * ho_wo[0] * ho_wo[1]])])
        per_tap.append(e.node("Unsqueeze", [e.node("Gemm", [gcols, xcols], transB=1), e.ints([2])]))
    e.node("Reshape", [e.node("Concat", per_tap, axis=2), e.ints([c_out, c_in, kh, kw])], node.outputs)


def _depthwise_taps(e: Lowering, node: Node) -> None:
    """One input channel per group (channel multiplier m = c_out / groups): per tap, sum(g * x_ab) over batch
    and pixels, an elementwise product and a reduction instead of a GEMM with one-wide operands."""
    x, g = node.inputs
    c_out, _, kh, kw = node.attrs["weight_shape"]
    n, c_in = e.type(x).shape[:2]
    ho_wo = e.type(g).shape[2:]
    m = c_out // c_in
    if m > 1:  # (n, c_in, m, ho, wo) against x's views unsqueezed to (n, c_in, 1, ho, wo)
        g = e.node("Reshape", [g, e.ints([n, c_in, m] + list(ho_wo))])
    axes = e.ints([0, 3, 4] if m > 1 else [0, 2, 3])
    per_tap = []
    for v in _tap_views(e, x, node, ho_wo):
        if m > 1:
            v = e.node("Unsqueeze", [v, e.ints([2])])
        summed = e.node("ReduceSum", [e.node("Mul", [g, v]), axes], keepdims=0)  # (c_in,) or (c_in, m)
        per_tap.append(e.node("Unsqueeze", [summed, e.ints([-1])]))
    e.node("Reshape", [e.node("Concat", per_tap, axis=-1), e.ints([c_out, 1, kh, kw])], node.outputs)
