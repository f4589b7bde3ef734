"""Conv and pool op families: importers, shape rules, VJPs and lowerings against torch.autograd.

Every case goes through `check_vjp` (torch.export -> IR -> our VJPs -> ONNX -> onnxruntime vs torch),
with tiny shapes so the whole file stays fast; the structural tests inspect the IR and the emitted
ONNX for what sparse training relies on (a sliced weight gradient touches only the sliced channels).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pockprop.autodiff.backward import backward
from pockprop.emit.onnx import to_onnx
from pockprop.errors import UnsupportedOpError
from pockprop.autodiff.gradcheck import _Wrap, check_vjp, run_onnx
from pockprop.ops.builder import Builder
from pockprop.ir import Graph
from pockprop.ops.registry import FULL, Need
from pockprop.tracing.trace import trace


def _t(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _conv_tensors(n, c_in, c_out, hw, k, groups, seed=0):  # type: ignore[no-untyped-def]
    kh, kw = (k, k) if isinstance(k, int) else k
    return (_t(n, c_in, *hw, seed=seed), _t(c_out, c_in // groups, kh, kw, seed=seed + 1),
            _t(c_out, seed=seed + 2))


# -- conv2d ----------------------------------------------------------------------------------------

# (n, c_in, c_out, (h, w), kernel, stride, padding, dilation, groups, bias)
CONV_CASES = [
    (2, 3, 4, (7, 6), 3, 1, 1, 1, 1, True),            # plain 3x3 same-size
    (2, 3, 4, (8, 9), 3, 2, 0, 1, 1, False),           # stride 2, odd/even sizes (remainders)
    (2, 3, 4, (9, 9), 3, 2, 1, 1, 1, True),
    (2, 3, 5, (9, 8), 3, 3, 1, 2, 1, True),            # stride 3 + dilation 2
    (2, 2, 3, (9, 9), 3, 1, 2, 3, 1, False),           # dilation 3
    (2, 3, 4, (9, 8), 5, 2, 2, 1, 1, True),            # 5x5
    (1, 4, 4, (9, 8), 5, 3, 0, 1, 1, False),           # kernel taps beyond k in the weight-grad conv
    (2, 4, 6, (7, 7), 1, 1, 0, 1, 1, True),            # pointwise: GEMM weight gradient
    (1, 4, 6, (7, 7), 1, 1, 0, 1, 1, False),           # pointwise, batch 1
    (2, 4, 6, (7, 8), 1, 2, 0, 1, 1, False),           # pointwise strided: GEMM on strided x
    (2, 4, 4, (7, 7), 1, 2, 1, 1, 1, True),            # 1x1 padded: conv path, padding > d(k-1)
    (2, 4, 4, (7, 7), 3, 2, 1, 1, 2, True),            # groups=2, 2 channels per group
    (2, 4, 6, (8, 7), 3, 1, 1, 2, 2, False),           # groups=2 dilated, 3 out channels per group
    (2, 6, 6, (7, 7), 3, 1, 1, 1, 6, True),            # depthwise
    (2, 4, 8, (7, 7), 3, 2, 1, 1, 4, False),           # depthwise, channel multiplier 2
    (2, 3, 6, (9, 8), 5, 2, 2, 1, 3, True),            # depthwise 5x5 strided, multiplier 2
    (2, 4, 4, (8, 8), 3, 2, 0, 1, 4, True),            # depthwise, unpadded, stride not dividing
    (2, 3, 4, (6, 7), (3, 1), (2, 1), (1, 0), 1, 1, True),  # non-square kernel, per-axis stride/padding
    (2, 3, 4, (6, 7), (1, 3), 1, (0, 1), (1, 2), 1, False),
    (2, 2, 2, (3, 3), 3, 1, 0, 1, 1, True),            # output 1x1
    (2, 2, 3, (2, 3), 3, 2, 2, 1, 1, True),            # padding larger than the input
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "n{}c{}o{}hw{}k{}s{}p{}d{}g{}b{}".format(*c))
def test_conv2d_vjp(case):  # type: ignore[no-untyped-def]
    n, c_in, c_out, hw, k, s, p, d, groups, bias = case
    x, w, b = _conv_tensors(n, c_in, c_out, hw, k, groups)
    if bias:
        check_vjp(lambda x, w, b: F.conv2d(x, w, b, s, p, d, groups), x, w, b)
    else:
        check_vjp(lambda x, w: F.conv2d(x, w, None, s, p, d, groups), x, w)


def test_conv2d_module_with_bias():  # nn.Conv2d goes through the same importer
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    check_vjp(lambda x, w, b: F.conv2d(x, w, b, conv.stride, conv.padding), _t(2, 3, 7, 7), conv.weight.detach(),
              conv.bias.detach())


# (conv kwargs, c_in, c_out, need on the weight)
SLICED_CASES = [
    (dict(stride=2, padding=1), 6, 4, Need(1, 2, 5)),                 # groups 1, input channels
    (dict(stride=1, padding=1, dilation=2), 6, 4, Need(1, 0, 1)),
    (dict(stride=2, padding=1), 6, 5, Need(0, 1, 3)),                 # groups 1, output channels
    (dict(stride=1, padding=0), 6, 4, Need(1, 3, 6)),                 # pointwise GEMM, input channels
    (dict(stride=2, padding=0), 6, 4, Need(0, 0, 2)),                 # pointwise GEMM, output channels
    (dict(stride=1, padding=1, groups=6), 6, 6, Need(0, 2, 5)),       # depthwise channels
    (dict(stride=2, padding=1, groups=6), 6, 12, Need(0, 3, 10)),     # depthwise x2, unaligned to groups
    (dict(stride=1, padding=1, groups=6), 6, 12, Need(0, 4, 6)),      # depthwise x2, one group
    (dict(stride=1, padding=1, groups=6), 6, 12, Need(1, 0, 1)),      # depthwise, axis 1 (size 1)
    (dict(stride=1, padding=1, groups=2), 6, 4, Need(1, 1, 3)),       # groups 2, channels inside groups
    (dict(stride=1, padding=1, groups=2), 6, 4, Need(0, 1, 4)),       # groups 2, across groups
    (dict(stride=2, padding=1), 6, 4, Need(2, 1, 3)),                 # kernel rows: whole grad, sliced
    (dict(stride=2, padding=1), 6, 4, Need(1, 0, 6)),                 # a "slice" that is everything
]


@pytest.mark.parametrize("kwargs,c_in,c_out,need", SLICED_CASES)
def test_conv2d_sliced_weight_grad(kwargs, c_in, c_out, need):  # type: ignore[no-untyped-def]
    k = 1 if kwargs.get("padding") == 0 else 3
    x, w, b = _conv_tensors(2, c_in, c_out, (7, 7), k, kwargs.get("groups", 1), seed=3)
    check_vjp(lambda x, w, b: F.conv2d(x, w, b, **kwargs), x, w, b, needs={1: need})


def _build(fn, tensors, wants):  # type: ignore[no-untyped-def]
    """What check_vjp builds, with a chosen set of trainable arguments: (graph, {arg: grad})."""
    g = trace(_Wrap(fn, list(tensors), {}), (torch.zeros(1),)).graph
    b = Builder(g)
    (y,) = g.outputs
    for i in wants:
        g.constants.pop(f"args.{i}")
        g.inputs.append(f"args.{i}")
    cot = b.const(np.ones(g.types[y].shape, np.float32), hint="cotangent")
    loss = b.op("sum", [b.op("mul", [y, cot])], axes=list(range(g.types[y].rank)), keepdim=False)
    grads = backward(g, loss, {f"args.{i}": need for i, need in wants.items()})
    g.outputs = [y] + list(grads.values())
    return g, grads


def _onnx_nodes_of(g: Graph, ir_value: str) -> tuple[list[onnx.NodeProto], dict[str, tuple[int, ...]]]:
    """The ONNX nodes an IR node (named by its output) lowered to, and the inferred shape of every value."""
    model = onnx.shape_inference.infer_shapes(to_onnx(g), strict_mode=True)
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
              for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    shapes.update({t.name: tuple(t.dims) for t in model.graph.initializer})
    nodes = [n for n in model.graph.node if any(o == ir_value or o.startswith(ir_value + "/") for o in n.output)]
    return nodes, shapes


@pytest.mark.parametrize("k,stride", [(3, 2), (1, 1)])
def test_sliced_weight_grad_touches_only_the_slice(k, stride):  # type: ignore[no-untyped-def]
    """Need(axis=1) on a conv weight: x is sliced before the weight gradient, whose Conv/GEMM sees 3 of 8 channels."""
    x, w, _ = _conv_tensors(2, 8, 4, (9, 9), k, 1)
    fn = lambda x, w: F.conv2d(x, w, None, stride, k // 2)  # noqa: E731
    g, grads = _build(fn, (x, w), {1: Need(1, 2, 5)})
    (wg,) = [n for n in g.nodes if n.op == "conv2d_weight_grad"]
    assert g.types[wg.inputs[0]].shape == (2, 3, 9, 9)
    (sl,) = [n for n in g.nodes if n.outputs[0] == wg.inputs[0]]
    assert sl.op == "slice" and sl.inputs == ("args.0",) and (sl.attrs["start"], sl.attrs["stop"]) == (2, 5)
    assert not any(n.op == "conv2d_input_grad" for n in g.nodes)  # x is not trainable: no dx is built
    assert g.types[grads["args.1"]].shape == (4, 3, k, k)

    nodes, shapes = _onnx_nodes_of(g, wg.outputs[0])
    (mac,) = [n for n in nodes if n.op_type in ("Conv", "Gemm", "MatMul")]
    if mac.op_type == "Conv":  # x transposed to (channels, batch, h, w)
        assert shapes[mac.input[0]][0] == 3
    else:  # GEMM: x as (channels, batch * pixels), used transposed
        assert shapes[mac.input[1]] == (3, 2 * 81)
    # and the numbers: the slice of torch's gradient
    got = run_onnx(to_onnx(g), {"args.1": w.numpy(), g.inputs[0]: np.zeros(1, np.float32)})[1]
    ref_w = w.clone().requires_grad_(True)
    fn(x, ref_w).sum().backward()
    np.testing.assert_allclose(got, ref_w.grad[:, 2:5].numpy(), rtol=1e-4, atol=1e-5)


def test_depthwise_sliced_weight_grad_slices_x_and_g():
    x, w, _ = _conv_tensors(2, 8, 8, (7, 7), 3, 8)
    g, _ = _build(lambda x, w: F.conv2d(x, w, None, 1, 1, 1, 8), (x, w), {1: Need(0, 2, 6)})
    (wg,) = [n for n in g.nodes if n.op == "conv2d_weight_grad"]
    assert g.types[wg.inputs[0]].shape[1] == 4 and g.types[wg.inputs[1]].shape[1] == 4
    assert wg.attrs["groups"] == 4


def test_conv2d_only_the_needed_gradients_are_built():
    x, w, b = _conv_tensors(2, 3, 4, (7, 7), 3, 1)
    fn = lambda x, w, b: F.conv2d(x, w, b, 1, 1)  # noqa: E731
    g, _ = _build(fn, (x, w, b), {2: FULL})  # bias only
    assert not any(n.op in ("conv2d_input_grad", "conv2d_weight_grad") for n in g.nodes)
    g, _ = _build(fn, (x, w, b), {0: FULL})  # input only
    assert [n.op for n in g.nodes].count("conv2d_input_grad") == 1
    assert not any(n.op == "conv2d_weight_grad" for n in g.nodes)


@pytest.mark.parametrize("fn,args,match", [
    (lambda x, w: F.conv_transpose2d(x, w), ((2, 3, 5, 5), (3, 2, 3, 3)), "transposed convolution"),
    (lambda x, w: F.conv1d(x, w), ((2, 3, 7), (4, 3, 3)), "1-D convolution"),
    (lambda x, w: F.conv3d(x, w), ((1, 2, 4, 4, 4), (2, 2, 3, 3, 3)), "3-D convolution"),
])
def test_conv_unsupported_variants(fn, args, match):  # type: ignore[no-untyped-def]
    with pytest.raises(UnsupportedOpError, match=match):
        check_vjp(fn, *(_t(*s) for s in args))


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_conv2d_random_configurations(data):  # type: ignore[no-untyped-def]
    kind = data.draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    groups = {"dense": 1, "grouped": 2, "depthwise": data.draw(st.integers(1, 4))}[kind]
    cig = 1 if kind == "depthwise" else data.draw(st.integers(1, 3))
    cog = data.draw(st.integers(1, 2 if kind == "depthwise" else 3))
    kh, kw = data.draw(st.sampled_from([1, 2, 3, 5])), data.draw(st.sampled_from([1, 3]))
    s = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
    p = (data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2)))
    d = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)))
    h = data.draw(st.integers(max(1, d[0] * (kh - 1) + 1 - 2 * p[0]), 9))
    w_ = data.draw(st.integers(max(1, d[1] * (kw - 1) + 1 - 2 * p[1]), 9))
    n = data.draw(st.integers(1, 2))
    c_out = groups * cog
    x, w, b = _conv_tensors(n, groups * cig, c_out, (h, w_), (kh, kw), groups, seed=data.draw(st.integers(0, 99)))
    axis = data.draw(st.sampled_from([None, 0, 1]))
    needs = None
    if axis is not None:
        size = w.shape[axis]
        lo = data.draw(st.integers(0, size - 1))
        needs = {1: Need(axis, lo, data.draw(st.integers(lo + 1, size)))}
    check_vjp(lambda x, w, b: F.conv2d(x, w, b, s, p, d, groups), x, w, b, needs=needs)


# -- pooling ---------------------------------------------------------------------------------------

# (kernel, stride, padding, dilation, ceil_mode) on a (2, 3, 7, 8) input
MAX_CASES = [
    (2, 2, 0, 1, False),
    (2, None, 0, 1, True),      # stride defaults to the kernel
    (3, 1, 1, 1, False),        # overlapping windows: gradients add up
    (3, 2, 1, 1, False),
    (3, 2, 1, 1, True),         # ceil_mode adds a window on one axis
    (2, 2, 1, 1, True),
    (3, 3, 1, 1, True),
    (2, 3, 1, 1, True),
    (3, 2, 0, 2, True),         # dilation
    ((3, 2), (2, 1), (1, 0), 1, False),
]


@pytest.mark.parametrize("k,s,p,d,ceil", MAX_CASES)
def test_max_pool2d_vjp(k, s, p, d, ceil):  # type: ignore[no-untyped-def]
    check_vjp(lambda x: F.max_pool2d(x, k, s, p, d, ceil_mode=ceil), _t(2, 3, 7, 8))


def test_max_pool2d_unbatched_and_after_conv():
    check_vjp(lambda x: F.max_pool2d(x, 2), _t(3, 6, 5))
    check_vjp(lambda x, w: F.max_pool2d(F.conv2d(x, w, padding=1), 3, 2, 1), _t(2, 2, 8, 8), _t(3, 2, 3, 3))


def test_max_pool2d_indices_are_emitted_only_for_backward():
    x = _t(2, 3, 6, 6)
    g, _ = _build(lambda x: F.max_pool2d(x, 2), (x,), {0: FULL})
    nodes, _ = _onnx_nodes_of(g, next(n.outputs[0] for n in g.nodes if n.op == "max_pool2d"))
    assert [len(n.output) for n in nodes if n.op_type == "MaxPool"] == [2]
    fwd = trace(_Wrap(lambda x: F.max_pool2d(x, 2), [x], {}), (torch.zeros(1),)).graph
    pools = [n for n in to_onnx(fwd).graph.node if n.op_type == "MaxPool"]
    assert [len(n.output) for n in pools] == [1]


# (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override) on a (2, 3, 7, 8) input
AVG_CASES = [
    (2, 2, 0, False, True, None),
    (2, None, 0, True, True, None),
    (3, 1, 1, False, True, None),
    (3, 1, 1, False, False, None),
    (3, 2, 1, False, False, None),
    (3, 2, 1, True, True, None),     # ceil window runs past the padding: torch's smaller divisor
    (3, 2, 1, True, False, None),
    (3, 2, 0, True, True, None),
    (2, 3, 1, True, True, None),
    (2, 3, 1, True, False, None),
    (3, 2, 1, True, True, 5),        # divisor_override
    (2, 2, 0, False, True, 3),
    ((3, 1), (1, 2), (1, 0), True, False, None),
]


@pytest.mark.parametrize("k,s,p,ceil,cip,div", AVG_CASES)
def test_avg_pool2d_vjp(k, s, p, ceil, cip, div):  # type: ignore[no-untyped-def]
    check_vjp(lambda x: F.avg_pool2d(x, k, s, p, ceil, cip, div), _t(2, 3, 7, 8))


def test_avg_pool2d_unbatched():
    check_vjp(lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True), _t(3, 6, 7))


@pytest.mark.parametrize("out", [1, (1, 1), (4, 2), (2, 3), (8, 6)])
def test_adaptive_avg_pool2d_vjp(out):  # type: ignore[no-untyped-def]
    check_vjp(lambda x: F.adaptive_avg_pool2d(x, out) * 2, _t(2, 3, 8, 6))


def test_adaptive_avg_pool2d_uneven_is_unsupported():
    with pytest.raises(UnsupportedOpError, match="8x6 to 3x4"):
        check_vjp(lambda x: F.adaptive_avg_pool2d(x, (3, 4)), _t(2, 3, 8, 6))


def test_adaptive_avg_pool2d_importer_maps_to_mean_or_avg_pool():
    """torch.export already turns output (1, 1) into a mean; the importer does the same if it meets one."""
    from pockprop.ir import TensorType
    from pockprop.ops import ATEN

    g = Graph()
    b = Builder(g)
    x = g.add_input("x", TensorType((2, 3, 8, 6), "float32"))
    imp = ATEN["aten._adaptive_avg_pool2d.default"]
    imp(b, x, [1, 1])
    imp(b, x, [4, 3])
    assert [(n.op, n.attrs.get("axes"), n.attrs.get("kernel")) for n in g.nodes] == [
        ("mean", [2, 3], None), ("avg_pool2d", None, [2, 2])]
    assert [g.types[n.outputs[0]].shape for n in g.nodes] == [(2, 3, 1, 1), (2, 3, 4, 3)]
