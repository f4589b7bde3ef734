"""Every lowering of conv2d's backward ops (ops/conv_grad.py) gives the default's and torch's gradients.

Each case builds a one-node graph (conv2d_input_grad or conv2d_weight_grad) by hand, lowers it once per
valid lowering, runs it on onnxruntime and compares with torch.nn.grad and with the default lowering;
a few cases go end to end through check_vjp (trace, VJP, a forced Chooser) as well.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pockprop.autodiff.gradcheck import check_vjp, run_onnx
from pockprop.emit.onnx import to_onnx
from pockprop.ir import Graph, Node, TensorType
from pockprop.ops import get_op
from pockprop.ops.conv import conv_out_size, pair
from pockprop.ops.registry import LOWERING, Need

# (n, c_in, c_out, (h, w), kernel, stride, padding, dilation, groups)
CASES = [
    (2, 3, 4, (7, 6), 3, 1, 1, 1, 1),       # 3x3 same size
    (1, 3, 4, (6, 7), 3, 1, 0, 1, 1),       # unpadded, batch 1
    (2, 3, 4, (5, 6), 1, 1, 1, 1, 1),       # 1x1 padded: padding > d*(k-1), the conv form crops g
    (2, 2, 3, (9, 8), 3, 1, 2, 2, 1),       # dilation 2
    (2, 3, 4, (9, 7), 3, 2, 1, 1, 1),       # stride 2, odd sizes
    (2, 3, 4, (8, 9), 3, 2, 0, 1, 1),       # stride 2 unpadded, even/odd
    (1, 3, 4, (9, 9), 3, 2, 1, 2, 1),       # stride 2 + dilation 2
    (2, 4, 6, (7, 8), 1, 2, 0, 1, 1),       # 1x1 stride 2 (a ResNet downsample)
    (3, 5, 4, (6, 5), 1, 1, 0, 1, 1),       # pointwise
    (2, 4, 4, (7, 7), 3, 2, 1, 1, 2),       # groups 2
    (2, 4, 6, (8, 7), 3, 1, 1, 2, 2),       # groups 2, dilated
    (2, 6, 6, (7, 7), 3, 1, 1, 1, 6),       # depthwise
    (1, 4, 4, (7, 9), 3, 2, 1, 1, 4),       # depthwise stride 2, odd sizes, batch 1
    (2, 4, 8, (8, 7), 3, 2, 1, 1, 4),       # depthwise, channel multiplier 2
    (2, 3, 6, (9, 8), 5, 2, 2, 1, 3),       # depthwise 5x5 stride 2, multiplier 2
    (2, 2, 3, (8, 8), 4, 2, 1, 1, 1),       # even kernel: phases with equal tap counts
    (2, 3, 4, (10, 9), 3, 3, 1, 1, 1),      # stride 3
    (1, 3, 4, (11, 10), 7, 2, 3, 1, 1),     # 7x7 stride 2 (a stem): too many taps for "taps"
    (2, 3, 4, (7, 6), (3, 1), (2, 1), (1, 0), 1, 1),  # per-axis stride: no subpixel
    (2, 1, 4, (6, 6), 3, 1, 1, 1, 1),       # one input channel: depthwise_taps applies at groups 1
]


def _ids(c) -> str:  # type: ignore[no-untyped-def]
    return "n{}c{}o{}hw{}k{}s{}p{}d{}g{}".format(*c)


def _conv(case):  # type: ignore[no-untyped-def]
    """The case's tensors and conv attributes, as conv2d's VJP would pass them."""
    n, c_in, c_out, hw, k, s, p, d, groups = case
    kh, kw = pair(k)
    attrs = dict(stride=pair(s), padding=pair(p), dilation=pair(d), groups=groups)
    out = tuple(conv_out_size(hw[i], (kh, kw)[i], attrs["stride"][i], attrs["padding"][i], attrs["dilation"][i])
                for i in range(2))
    gen = torch.Generator().manual_seed(sum(hw) + c_out)
    x = torch.randn(n, c_in, *hw, generator=gen)
    w = torch.randn(c_out, c_in // groups, kh, kw, generator=gen)
    g = torch.randn(n, c_out, *out, generator=gen)
    return x, w, g, attrs


def _one_node(op: str, inputs: dict[str, torch.Tensor], out_shape: tuple[int, ...], attrs: dict[str, Any]) -> Graph:
    graph = Graph()
    for name, t in inputs.items():
        graph.add_input(name, TensorType(tuple(t.shape), "float32"))
    graph.add_value("out", TensorType(out_shape, "float32"))
    graph.append(Node(op, tuple(inputs), ("out",), attrs))
    graph.outputs = ["out"]
    return graph


def _graphs(case):  # type: ignore[no-untyped-def]
    """(graph, feeds, torch's answer) for the input gradient and for the weight gradient of the case."""
    x, w, g, attrs = _conv(case)
    kw = dict(stride=attrs["stride"], padding=attrs["padding"], dilation=attrs["dilation"], groups=attrs["groups"])
    dx = torch.nn.grad.conv2d_input(x.shape, w, g, **kw)
    dw = torch.nn.grad.conv2d_weight(x, w.shape, g, **kw)
    ig = _one_node("conv2d_input_grad", {"g": g, "w": w}, tuple(x.shape), {**attrs, "input_shape": list(x.shape)})
    wg = _one_node("conv2d_weight_grad", {"x": x, "g": g}, tuple(w.shape),
                   {**attrs, "weight_shape": list(w.shape)})
    return [(ig, {"g": g.numpy(), "w": w.numpy()}, dx.numpy()), (wg, {"x": x.numpy(), "g": g.numpy()}, dw.numpy())]


def _options(graph: Graph) -> tuple[str, ...]:
    node = graph.nodes[0]
    return get_op(node.op).lowering_options(graph.types, node)


def _lowered(graph: Graph, how: str) -> onnx.ModelProto:
    node = graph.nodes[0]
    g = graph.copy()
    g.replace_node(g.nodes[0], node.replace(attrs={**node.attrs, LOWERING: how}))
    return to_onnx(g)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_every_lowering_matches_torch_and_the_default(case):  # type: ignore[no-untyped-def]
    _check_every_lowering(case)


def _check_every_lowering(case):  # type: ignore[no-untyped-def]
    for graph, feeds, want in _graphs(case):
        (default,) = run_onnx(to_onnx(graph), feeds)
        np.testing.assert_allclose(default, want, rtol=1e-4, atol=1e-4)
        for how in _options(graph)[1:]:
            (got,) = run_onnx(_lowered(graph, how), feeds)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{graph.nodes[0].op} {how}")
            np.testing.assert_allclose(got, default, rtol=1e-4, atol=1e-4, err_msg=f"{graph.nodes[0].op} {how}")


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_lowering_on_random_configurations(data):  # type: ignore[no-untyped-def]
    groups = data.draw(st.sampled_from([1, 2, 3]))
    depthwise = groups > 1 and data.draw(st.booleans())
    cig = 1 if depthwise else data.draw(st.integers(1, 3))
    cog = data.draw(st.integers(1, 2))
    k = (data.draw(st.sampled_from([1, 2, 3, 4])), data.draw(st.sampled_from([1, 3])))
    s = data.draw(st.sampled_from([(1, 1), (2, 2), (3, 3), (2, 1)]))
    p = (data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2)))
    d = data.draw(st.sampled_from([(1, 1), (2, 2), (1, 2)]))
    hw = tuple(data.draw(st.integers(max(1, d[i] * (k[i] - 1) + 1 - 2 * p[i]), 9)) for i in range(2))
    _check_every_lowering((data.draw(st.integers(1, 2)), groups * cig, groups * cog, hw, k, s, p, d, groups))


def test_the_cases_cover_every_lowering():
    seen = {op: set() for op in ("conv2d_input_grad", "conv2d_weight_grad")}  # type: ignore[var-annotated]
    for case in CASES:
        for graph, _, _ in _graphs(case):
            seen[graph.nodes[0].op].update(_options(graph))
    assert {op: sorted(v) for op, v in seen.items()} == {op: sorted(get_op(op).lowerings) for op in seen}


@pytest.mark.parametrize("case,want_in,want_w", [
    # stride 1: no subpixel / zero_interleave
    ((2, 3, 4, (7, 6), 3, 1, 1, 1, 1), ("auto", "conv", "conv_transpose"), ("auto", "im2col", "taps")),
    # stride 2, dilation 2: no subpixel
    ((1, 3, 4, (9, 9), 3, 2, 1, 2, 1), ("auto", "conv_transpose", "zero_interleave"), ("auto", "im2col", "taps")),
    # 1x1 stride 2: kernel smaller than the stride, no subpixel; the weight gradient one GEMM or batched
    ((2, 4, 6, (7, 8), 1, 2, 0, 1, 1), ("auto", "conv_transpose", "zero_interleave"), ("auto", "batched_gemm")),
    # pointwise at batch 1: nothing to batch, the weight gradient has one lowering
    ((1, 4, 6, (7, 8), 1, 1, 0, 1, 1), ("auto", "conv", "conv_transpose"), ()),
    # depthwise stride 2: subpixel, and the depthwise taps instead of per-tap GEMMs
    ((1, 4, 4, (7, 9), 3, 2, 1, 1, 4), ("auto", "conv_transpose", "subpixel", "zero_interleave"),
     ("auto", "im2col", "depthwise_taps")),
    # groups 2, 7x7 and per-axis strides
    ((2, 4, 4, (7, 7), 3, 2, 1, 1, 2), ("auto", "conv_transpose", "subpixel", "zero_interleave"), ("auto", "im2col")),
    ((1, 3, 4, (11, 10), 7, 2, 3, 1, 1), ("auto", "conv_transpose", "subpixel", "zero_interleave"), ("auto", "im2col")),
    ((2, 3, 4, (7, 6), (3, 1), (2, 1), (1, 0), 1, 1), ("auto", "conv_transpose", "zero_interleave"),
     ("auto", "im2col", "taps")),
])
def test_lowering_options_lists_only_valid_variants(case, want_in, want_w):  # type: ignore[no-untyped-def]
    (ig, _, _), (wg, _, _) = _graphs(case)
    assert (_options(ig), _options(wg)) == (want_in, want_w)


@pytest.mark.parametrize("op,how,onnx_op", [
    ("conv2d_input_grad", "conv_transpose", "ConvTranspose"),
    ("conv2d_input_grad", "subpixel", "DepthToSpace"),
    ("conv2d_input_grad", "zero_interleave", "Pad"),
    ("conv2d_weight_grad", "im2col", "Gemm"),
    ("conv2d_weight_grad", "taps", "Gemm"),
    ("conv2d_weight_grad", "batched_gemm", "MatMul"),
])
def test_a_lowering_emits_its_own_form(op, how, onnx_op):  # type: ignore[no-untyped-def]
    k = 1 if how == "batched_gemm" else 3
    graph = next(gr for gr, _, _ in _graphs((2, 3, 4, (9, 7), k, 2, k // 2, 1, 1)) if gr.nodes[0].op == op)
    ops = [n.op_type for n in _lowered(graph, how).graph.node]
    assert onnx_op in ops
    if how != "zero_interleave":
        assert "Conv" not in ops or how == "subpixel" and ops.count("Conv") == 4  # one per phase
    if how == "taps":
        assert ops.count("Gemm") == 9


def test_depthwise_taps_has_no_conv_or_gemm():
    graph = next(gr for gr, _, _ in _graphs((2, 6, 6, (7, 7), 3, 1, 1, 1, 6)) if gr.nodes[0].op == "conv2d_weight_grad")
    ops = [n.op_type for n in _lowered(graph, "depthwise_taps").graph.node]
    assert ops.count("ReduceSum") == 9 and not {"Conv", "Gemm", "MatMul"} & set(ops)


def _force(**by_op: str):  # type: ignore[no-untyped-def]
    """A Chooser that picks by_op[op] where the node offers it, else the default."""
    return lambda key, node, options, types: by_op[node.op] if by_op.get(node.op) in options else options[0]


@pytest.mark.parametrize("in_how,w_how", [("subpixel", "im2col"), ("zero_interleave", "taps"),
                                          ("conv_transpose", "depthwise_taps")])
def test_end_to_end_through_check_vjp(in_how, w_how):  # type: ignore[no-untyped-def]
    """The VJP rule, a forced Chooser and the emitter together, against torch.autograd and the default."""
    groups = 4 if w_how == "depthwise_taps" else 1
    x = torch.randn(2, 4, 9, 7, generator=torch.Generator().manual_seed(1))
    w = torch.randn(8, 4 // groups, 3, 3, generator=torch.Generator().manual_seed(2))
    fn = lambda x, w: F.conv2d(x, w, None, 2, 1, 1, groups)  # noqa: E731
    default = check_vjp(fn, x, w)
    got = check_vjp(fn, x, w, choose_lowering=_force(conv2d_input_grad=in_how, conv2d_weight_grad=w_how))
    for a, b in zip(got.values, default.values):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_sliced_weight_need_with_each_lowering():
    """A sparse update's sliced weight gradient (input channels 1..3) through each weight-gradient lowering."""
    x = torch.randn(2, 5, 8, 8, generator=torch.Generator().manual_seed(3))
    w = torch.randn(4, 5, 3, 3, generator=torch.Generator().manual_seed(4))
    for how in ("im2col", "taps"):
        check_vjp(lambda x, w: F.conv2d(x, w, None, 2, 1), x, w, needs={1: Need(1, 1, 3)},
                  choose_lowering=_force(conv2d_weight_grad=how))
