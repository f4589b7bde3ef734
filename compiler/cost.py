"""MAC counting, from the IR and from the emitted ONNX, per node and per (module, phase).

One multiply-accumulate (MAC) per product summed into an output. Counted ops:
  conv2d             N*Cout*Ho*Wo * Cin/groups*kh*kw
  conv2d_input_grad  the same as the forward conv it differentiates (a transposed conv of equal work)
  conv2d_weight_grad N*Ho*Wo * Cout*cig*kh*kw, i.e. the (possibly sliced) weight-gradient shape times
                     the output positions of the forward conv: a channel slice costs its share
  linear             rows * out * in;   matmul   batch * M * N * K
Every other op (elementwise, reductions, data movement, optimizer arithmetic) counts 0 MACs and is
tallied in "other_ops". From ONNX (after shape inference): Conv, ConvTranspose, Gemm, MatMul.

Node names in the emitted ONNX are `<module>/<Op>` for forward and loss work and
`<module>/backward/<Op>` for gradient work (emit/onnx.py), "model" standing for the top level;
`macs_by_module` uses the same spelling for both sources so they can be compared directly.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import onnx

from pockprop.ir import Graph, Node

TOP = "model"  # how emit/onnx.py names the top-level module


def node_macs(graph: Graph, node: Node) -> int:
    """MACs of one IR node (0 for ops that are not products)."""
    t = graph.types
    if node.op in ("conv2d", "conv2d_input_grad"):
        w = t[node.inputs[1]].shape  # (Cout, Cin/groups, kh, kw)
        y = t[node.outputs[0]].shape if node.op == "conv2d" else t[node.inputs[0]].shape  # (N, Cout, Ho, Wo)
        return math.prod(y) * math.prod(w[1:])
    if node.op == "conv2d_weight_grad":
        g = t[node.inputs[1]].shape  # (N, Cout_slice, Ho, Wo)
        return g[0] * g[2] * g[3] * math.prod(node.attrs["weight_shape"])
    if node.op == "linear":
        x, w = t[node.inputs[0]].shape, t[node.inputs[1]].shape
        return math.prod(x[:-1]) * w[0] * w[1]
    if node.op == "matmul":
        return math.prod(t[node.outputs[0]].shape) * t[node.inputs[0]].shape[-1]
    return 0


def _phase_group(phase: str) -> str:
    """emit.py names loss nodes like forward ones; keep the two sources comparable."""
    return "forward" if phase in ("forward", "loss") else phase


def ir_macs(graph: Graph) -> dict[str, Any]:
    """{"nodes": {first output: MACs}, "by_module": {(module, phase): MACs}, "total", "other_ops"}.

    Only nodes with MACs appear in "nodes"/"by_module"; `module` is spelled as in the ONNX node names.
    """
    nodes: dict[str, int] = {}
    by_module: dict[tuple[str, str], int] = defaultdict(int)
    other = 0
    for node in graph.nodes:
        macs = node_macs(graph, node)
        if not macs:
            other += 1
            continue
        nodes[node.outputs[0]] = macs
        by_module[(node.module or TOP, _phase_group(node.phase))] += macs
    return {"nodes": nodes, "by_module": dict(by_module), "total": sum(nodes.values()), "other_ops": other}


# -- from the emitted ONNX -----------------------------------------------------------------------

def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    g = model.graph
    out: dict[str, tuple[int, ...]] = {i.name: tuple(i.dims) for i in g.initializer}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(d.dim_value for d in dims)
    return out


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _onnx_node_macs(node: onnx.NodeProto, shape: dict[str, tuple[int, ...]]) -> int:
    def s(i: int, io: str = "in") -> tuple[int, ...]:
        name = (node.input if io == "in" else node.output)[i]
        if name not in shape:
            raise ValueError(f"no static shape for {name!r} (input of {node.name}); run shape inference")
        return shape[name]

    if node.op_type == "Conv":  # Y (N, M, Ho, Wo), W (M, C/group, kh, kw)
        return math.prod(s(0, "out")) * math.prod(s(1)[1:])
    if node.op_type == "ConvTranspose":  # X (N, C, H, W), W (C, M/group, kh, kw): every input tap scatters
        return math.prod(s(0)) * math.prod(s(1)[1:])
    if node.op_type == "Gemm":
        a, b = s(0), s(1)
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else a
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return m * n * k
    if node.op_type == "MatMul":
        return math.prod(s(0, "out")) * s(0)[-1]
    return 0


def split_node_name(name: str) -> tuple[str, str]:
    """'features.3.conv.0/backward/Conv_2' -> ('features.3.conv.0', 'backward'); forward otherwise."""
    where = name.rsplit("/", 1)[0]
    for phase in ("backward", "optimizer"):
        if where.endswith("/" + phase):
            return where[: -len(phase) - 1], phase
    return where, "forward"


def onnx_macs(model: onnx.ModelProto) -> dict[str, int]:
    """MACs of every Conv / ConvTranspose / Gemm / MatMul node of `model`, by node name."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shape = _shapes(inferred)
    out: dict[str, int] = {}
    for node in inferred.graph.node:
        macs = _onnx_node_macs(node, shape)
        if macs:
            out[node.name] = macs
    return out


def macs_by_module(model: onnx.ModelProto | Graph) -> dict[str, dict[str, int]]:
    """{module: {"forward": MACs, "backward": MACs}} from an ONNX model (or, for comparison, an IR graph)."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"forward": 0, "backward": 0})
    if isinstance(model, Graph):
        for (module, phase), macs in ir_macs(model)["by_module"].items():
            out[module][phase] = out[module].get(phase, 0) + macs
    else:
        for name, macs in onnx_macs(model).items():
            module, phase = split_node_name(name)
            out[module][phase] = out[module].get(phase, 0) + macs
    return dict(out)
