"""MAC counting, from the IR and from the emitted ONNX, per node and per (module, phase).

One multiply-accumulate (MAC) per product summed into an output. From the IR, each op declares its own
count (`Op.macs` in its file of ops/: conv2d and its gradients, linear, matmul); every other op
(elementwise, reductions, data movement, optimizer arithmetic) counts 0 MACs and is tallied in
"other_ops". From ONNX (after shape inference): Conv, ConvTranspose, Gemm, MatMul.

Node names in the emitted ONNX are `<module>/<Op>` for forward and loss work and
`<module>/backward/<Op>` for gradient work (emit/onnx.py), "model" standing for the top level;
`macs_by_module` uses the same spelling for both sources so they can be compared directly.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import onnx

from pockprop.emit.onnx import node_place, split_node_name
from pockprop.ir import Graph, Node, Phase
from pockprop.ops import get_op


def node_macs(graph: Graph, node: Node) -> int:
    """MACs of one IR node, as its op declares them (0 for ops that are not products)."""
    return get_op(node.op).macs(graph.types, node)


def ir_macs(graph: Graph) -> dict[str, Any]:
    """{"nodes": {first output: MACs}, "by_module": {(module, phase): MACs}, "total", "other_ops"}.

    Only nodes with MACs appear in "nodes"/"by_module"; `module` and `phase` are spelled as the ONNX node
    names say them (emit.onnx.node_place), so the two sources compare directly.
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
        by_module[node_place(node.module, node.phase)] += macs
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
    out: dict[str, dict[str, int]] = defaultdict(lambda: {Phase.FORWARD.value: 0, Phase.BACKWARD.value: 0})
    pairs = ir_macs(model)["by_module"].items() if isinstance(model, Graph) else \
        ((split_node_name(name), macs) for name, macs in onnx_macs(model).items())
    for (module, phase), macs in pairs:
        out[module][phase.value] = out[module].get(phase.value, 0) + macs
    return dict(out)
