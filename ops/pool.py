"""2-D pooling: max pooling (with indices), average pooling, adaptive average pooling (as mean or avg pool).

Output sizes follow torch, ceil_mode included (the last window must start inside the input or the
left padding). ONNX's own ceil_mode is never used: the windows that ceil_mode adds are made by extra
end padding (`_end_extra`) in floor mode, which MaxPool ignores and AveragePool's divisor is corrected
for with a compile-time divisor map, so the semantics are torch's exactly whatever the runtime does.

`max_pool2d`'s second output holds ONNX MaxPool indices, flattened over the whole input (N*C*H*W),
not torch's per-plane ones: it exists only for the backward scatter and must not reach user code.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pockprop.ops.builder import Builder
from pockprop.ir import Node, TensorType
from pockprop.ops.conv import pair
from pockprop.ops.registry import InputGradOp, Lowering, Op, aten, register


def pool_out_size(size: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """torch's pooling_output_shape along one axis."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


def _end_extra(size: int, out: int, k: int, s: int, p: int, d: int) -> int:
    """Extra end padding that makes floor mode give `out` windows (those ceil_mode adds); < s."""
    return max(0, (out - 1) * s + d * (k - 1) + 1 - (size + 2 * p))


def _geometry(in_shape: tuple[int, ...], attrs: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Output spatial size and the extra end padding per axis."""
    k, s, p = attrs["kernel"], attrs["stride"], attrs["padding"]
    d = attrs.get("dilation", [1, 1])
    outs = [pool_out_size(in_shape[2 + i], k[i], s[i], p[i], d[i], attrs["ceil_mode"]) for i in range(2)]
    extra = [_end_extra(in_shape[2 + i], outs[i], k[i], s[i], p[i], d[i]) for i in range(2)]
    return outs, extra


def _check(name: str, x: TensorType, attrs: dict[str, Any], outs: list[int]) -> None:
    if x.rank != 4 or min(outs) < 1:
        raise ValueError(f"{name}: input {x.shape} does not fit kernel {attrs['kernel']} (rank 4, non-empty output)")


def avg_divisors(in_hw: tuple[int, int], out_hw: list[int], attrs: dict[str, Any]) -> np.ndarray:
    """torch's per-window divisor of avg_pool2d, shape (Ho, Wo) (count_include_pad, ceil_mode, divisor_override)."""
    if attrs.get("divisor_override"):
        return np.full(out_hw, float(attrs["divisor_override"]))
    sizes = []
    for i in range(2):
        k, s, p = attrs["kernel"][i], attrs["stride"][i], attrs["padding"][i]
        start = np.arange(out_hw[i]) * s - p
        end = np.minimum(start + k, in_hw[i] + p)
        if attrs["count_include_pad"]:
            sizes.append(end - start)
        else:
            sizes.append(np.minimum(end, in_hw[i]) - np.maximum(start, 0))
    return np.outer(sizes[0], sizes[1]).astype(np.float64)


def _pooled_shape(op: str, x: TensorType, attrs: dict[str, Any]) -> tuple[int, ...]:
    """(N, C, Ho, Wo) of a pooling op, after checking its attributes against x."""
    outs, _ = _geometry(x.shape, attrs)
    _check(op, x, attrs, outs)
    return x.shape[:2] + tuple(outs)


@register
class MaxPool2d(Op):
    """y = max over each window of x (padding excluded), idx = flat argmax;  dx = scatter-add of g at idx."""
    name = "max_pool2d"

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        shape = _pooled_shape(self.name, ins[0], attrs)
        return [TensorType(shape, ins[0].dtype), TensorType(shape, "int64")]

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        return [b.op("max_pool2d_grad", [gouts[0], node.outputs[1]], input_shape=list(b.type(node.inputs[0]).shape),
                     hint="d_input")]

    def lower(self, e: Lowering, node: Node) -> None:
        a = node.attrs
        x = node.inputs[0]
        _, extra = _geometry(e.type(x).shape, a)
        p = list(a["padding"])
        idx = node.outputs[1]
        e.node("MaxPool", [x], node.outputs if e.is_used(idx) else node.outputs[:1], kernel_shape=list(a["kernel"]),
               strides=list(a["stride"]), pads=p + [p[i] + extra[i] for i in range(2)], dilations=list(a["dilation"]))


@register
class MaxPool2dGrad(InputGradOp):
    """Backward helper of max_pool2d: dx = zeros(N*C*H*W) with g scatter-added at the flat argmax indices."""
    name = "max_pool2d_grad"

    def lower(self, e: Lowering, node: Node) -> None:
        from onnx import numpy_helper

        g, idx = node.inputs
        shape = list(node.attrs["input_shape"])
        zero = numpy_helper.from_array(np.zeros(1, dtype=e.type(g).dtype))
        zeros = e.node("ConstantOfShape", [e.ints([int(np.prod(shape))])], value=zero)
        flat = e.ints([-1])
        dx = e.node("ScatterElements", [zeros, e.node("Reshape", [idx, flat]), e.node("Reshape", [g, flat])],
                    axis=0, reduction="add")  # overlapping windows add up
        e.node("Reshape", [dx, e.ints(shape)], node.outputs)


@register
class AvgPool2d(Op):
    """y = sum over each window of x / divisor (torch's: count_include_pad, ceil_mode, divisor_override);  dx = conv_transpose(g / divisor, ones)."""
    name = "avg_pool2d"

    def shape(self, ins, attrs):  # type: ignore[no-untyped-def]
        return [TensorType(_pooled_shape(self.name, ins[0], attrs), ins[0].dtype)]

    def vjp(self, b, node, gouts, needs):  # type: ignore[no-untyped-def]
        return [b.op("avg_pool2d_grad", [gouts[0]], input_shape=list(b.type(node.inputs[0]).shape),
                     hint="d_input", **node.attrs)]

    def lower(self, e: Lowering, node: Node) -> None:
        a = node.attrs
        x = node.inputs[0]
        xs = e.type(x).shape
        outs, extra = _geometry(xs, a)
        p = list(a["padding"])
        kk = a["kernel"][0] * a["kernel"][1]
        pool = dict(kernel_shape=list(a["kernel"]), strides=list(a["stride"]), pads=p + [p[i] + extra[i] for i in range(2)])
        div = avg_divisors(xs[2:], outs, a)
        if not a.get("divisor_override") and not a["count_include_pad"]:
            # the runtime divides by the real (non-pad) elements of each window: torch's divisor exactly
            e.node("AveragePool", [x], node.outputs, count_include_pad=0, **pool)
        elif np.all(div == kk):
            e.node("AveragePool", [x], node.outputs, count_include_pad=1, **pool)
        else:  # every window spans kk padded positions; rescale to torch's divisor
            y = e.node("AveragePool", [x], count_include_pad=1, **pool)
            e.node("Mul", [y, e.const(kk / div, e.type(x).dtype, "avg_scale")], node.outputs)


@register
class AvgPool2dGrad(InputGradOp):
    """Backward helper of avg_pool2d: dx = conv_transpose(g / divisor, ones(kh, kw)) per channel, cropped to input_shape."""
    name = "avg_pool2d_grad"

    def lower(self, e: Lowering, node: Node) -> None:
        a = node.attrs
        g = node.inputs[0]
        dt = e.type(g).dtype
        shape = list(a["input_shape"])
        n, c, h, w = shape
        ho, wo = e.type(g).shape[2:]
        _, extra = _geometry(tuple(shape), a)
        k, s, p = list(a["kernel"]), list(a["stride"]), list(a["padding"])
        scale = 1.0 / avg_divisors((h, w), [ho, wo], a)
        value = 1.0
        if np.all(scale == scale.flat[0]):
            value = float(scale.flat[0])  # one divisor: fold it into the kernel
        else:
            g = e.node("Mul", [g, e.const(scale, dt, "avg_scale")])
        # every (sample, channel) plane on its own: batch N*C, one channel, kernel of ones
        g = e.node("Reshape", [g, e.ints([n * c, 1, ho, wo])])
        out_pad = [(h, w)[i] + 2 * p[i] + extra[i] - s[i] * ((ho, wo)[i] - 1) - k[i] for i in range(2)]
        dx = e.node("ConvTranspose", [g, e.const(np.full([1, 1] + k, value), dt, "avg_kernel")], strides=s,
                    pads=p + [p[i] + extra[i] for i in range(2)], output_padding=out_pad if any(out_pad) else None)
        e.node("Reshape", [dx, e.ints(shape)], node.outputs)


# -- ATen importers -------------------------------------------------------------------------------

def _batched(b: Builder, x: str) -> tuple[str, tuple[int, ...] | None]:
    """Pooling takes (C, H, W) too: view it as (1, C, H, W); returns the view and the shape to restore."""
    shape = b.type(x).shape
    if len(shape) == 3:
        return b.op("reshape", [x], shape=[1, *shape]), shape
    if len(shape) != 4:
        from pockprop.errors import UnsupportedVariant

        raise UnsupportedVariant(f"pooling of a rank-{len(shape)} tensor")
    return x, None


def _unbatched(b: Builder, y: str, shape3: tuple[int, ...] | None) -> str:
    return y if shape3 is None else b.op("reshape", [y], shape=list(b.type(y).shape[1:]))


@aten("aten.max_pool2d_with_indices.default")
def _max_pool2d(b: Builder, x: str, kernel_size: Any, stride: Any = (), padding: Any = 0, dilation: Any = 1,
                ceil_mode: bool = False) -> list[str | None]:
    x, shape3 = _batched(b, x)
    k = pair(kernel_size)
    y, _ = b.op("max_pool2d", [x], kernel=k, stride=pair(stride) if stride else k, padding=pair(padding),
                  dilation=pair(dilation), ceil_mode=bool(ceil_mode))
    # The indices stay internal to the VJP: ONNX flattens them over N*C*H*W where torch counts per plane,
    # so a model that reads them (e.g. MaxUnpool) gets an "unsupported" error instead of wrong values.
    return [_unbatched(b, y, shape3), None]


def _avg_pool(b: Builder, x: str, kernel: list[int], stride: list[int], padding: list[int], ceil_mode: bool,
              count_include_pad: bool, divisor_override: int | None) -> str:
    x, shape3 = _batched(b, x)
    y = b.op("avg_pool2d", [x], kernel=kernel, stride=stride, padding=padding, ceil_mode=bool(ceil_mode),
             count_include_pad=bool(count_include_pad), divisor_override=divisor_override or None)
    return _unbatched(b, y, shape3)


@aten("aten.avg_pool2d.default")
def _avg_pool2d(b: Builder, x: str, kernel_size: Any, stride: Any = (), padding: Any = 0, ceil_mode: bool = False,
                count_include_pad: bool = True, divisor_override: int | None = None) -> str:
    k = pair(kernel_size)
    return _avg_pool(b, x, k, pair(stride) if stride else k, pair(padding), ceil_mode, count_include_pad,
                     divisor_override)


@aten("aten._adaptive_avg_pool2d.default")
def _adaptive_avg_pool2d(b: Builder, x: str, output_size: Any) -> str:
    from pockprop.errors import UnsupportedVariant

    rank = b.type(x).rank
    h, w = b.type(x).shape[-2:]
    oh, ow = pair(output_size)
    if (oh, ow) == (1, 1):
        return b.op("mean", [x], axes=[rank - 2, rank - 1], keepdim=True)
    if (oh, ow) == (h, w):
        return x
    if h % oh or w % ow:
        raise UnsupportedVariant(f"adaptive average pooling from {h}x{w} to {oh}x{ow}: the sizes do not divide")
    k = [h // oh, w // ow]
    return _avg_pool(b, x, k, k, [0, 0], False, True, None)
