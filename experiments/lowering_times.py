"""Standalone time of every lowering of conv2d's backward ops at ResNet-18 and MobileNetV2 layer shapes.

Each (layer, op, lowering) is a one-node ONNX graph (the node the VJP builds, attrs["lowering"] set),
run by onnxruntime with 2 threads on random inputs: the median of `--runs` runs after 2 warm-up runs, the
lowerings of one node interleaved run by run.
The shapes are the models' at batch 8 and a 128x128 input. The weight of the input gradient is fed
(a trained layer's kernel), or with --frozen a constant (a frozen layer's, whose transforms onnxruntime
folds at load). The table in docs/benchmarks.md ("Backward-op lowerings")
and the rule of compiler/lowering_cost.py come from this.

    python -m experiments.lowering_times [--runs 10] [--json out/lowering_times.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pockprop.emit.onnx import to_onnx
from pockprop.ir import Graph, Node, TensorType
from pockprop.ops import get_op
from pockprop.ops.conv import conv_out_size
from pockprop.ops.registry import LOWERING
from pockprop.runtime.session import session

# (model, layer, c_in, c_out, size, kernel, stride, groups) at batch 8, 128x128 input; padding k // 2
LAYERS = [
    ("resnet18", "stem 7x7/2", 3, 64, 128, 7, 2, 1),
    ("resnet18", "layer1 3x3", 64, 64, 32, 3, 1, 1),
    ("resnet18", "layer2 3x3/2", 64, 128, 32, 3, 2, 1),
    ("resnet18", "layer2 3x3", 128, 128, 16, 3, 1, 1),
    ("resnet18", "layer2 down 1x1/2", 64, 128, 32, 1, 2, 1),
    ("resnet18", "layer3 3x3/2", 128, 256, 16, 3, 2, 1),
    ("resnet18", "layer3 3x3", 256, 256, 8, 3, 1, 1),
    ("resnet18", "layer4 3x3/2", 256, 512, 8, 3, 2, 1),
    ("resnet18", "layer4 3x3", 512, 512, 4, 3, 1, 1),
    ("mobilenet_v2", "stem 3x3/2", 3, 32, 128, 3, 2, 1),
    ("mobilenet_v2", "dw 32 @64", 32, 32, 64, 3, 1, 32),
    ("mobilenet_v2", "dw 96 @64 /2", 96, 96, 64, 3, 2, 96),
    ("mobilenet_v2", "dw 144 @32", 144, 144, 32, 3, 1, 144),
    ("mobilenet_v2", "dw 144 @32 /2", 144, 144, 32, 3, 2, 144),
    ("mobilenet_v2", "dw 192 @16 /2", 192, 192, 16, 3, 2, 192),
    ("mobilenet_v2", "dw 192 @16", 192, 192, 16, 3, 1, 192),
    ("mobilenet_v2", "dw 384 @8", 384, 384, 8, 3, 1, 384),
    ("mobilenet_v2", "dw 960 @4", 960, 960, 4, 3, 1, 960),
    ("mobilenet_v2", "pw 32->16 @64", 32, 16, 64, 1, 1, 1),
    ("mobilenet_v2", "pw 16->96 @64", 16, 96, 64, 1, 1, 1),
    ("mobilenet_v2", "pw 96->24 @32", 96, 24, 32, 1, 1, 1),
    ("mobilenet_v2", "pw 144->24 @32", 144, 24, 32, 1, 1, 1),
    ("mobilenet_v2", "pw 192->32 @16", 192, 32, 16, 1, 1, 1),
    ("mobilenet_v2", "pw 64->384 @8", 64, 384, 8, 1, 1, 1),
    ("mobilenet_v2", "pw 320->1280 @4", 320, 1280, 4, 1, 1, 1),
]
BATCH = 8


def backward_nodes(c_in: int, c_out: int, size: int, k: int, stride: int, groups: int,
                   frozen: bool = False) -> list[Graph]:
    """One-node graphs of the layer's conv2d_input_grad (inputs g, w) and conv2d_weight_grad (inputs x, g);
    frozen: only the input gradient, its kernel a constant (a frozen layer's: onnxruntime folds its transforms)."""
    conv = dict(stride=[stride] * 2, padding=[k // 2] * 2, dilation=[1, 1], groups=groups)
    out = conv_out_size(size, k, stride, k // 2, 1)
    x, w, g = (BATCH, c_in, size, size), (c_out, c_in // groups, k, k), (BATCH, c_out, out, out)
    graphs = []
    for op, ins, result, extra in (("conv2d_input_grad", {"g": g, "w": w}, x, {"input_shape": list(x)}),
                                   ("conv2d_weight_grad", {"x": x, "g": g}, w, {"weight_shape": list(w)})):
        if frozen and op == "conv2d_weight_grad":
            continue
        graph = Graph()
        for name, shape in ins.items():
            if frozen and name == "w":
                graph.add_constant(np.random.default_rng(1).standard_normal(shape).astype(np.float32), name=name)
            else:
                graph.add_input(name, TensorType(shape, "float32"))
        graph.add_value("out", TensorType(result, "float32"))
        graph.append(Node(op, tuple(ins), ("out",), {**conv, **extra}))
        graph.outputs = ["out"]
        graphs.append(graph)
    return graphs


def time_lowerings(graph: Graph, options: tuple[str, ...], runs: int, threads: int = 2) -> dict[str, float]:
    """Median milliseconds of one run of `graph` per lowering, the lowerings interleaved run by run (so a
    neighbour's load on a shared machine hits all of them alike)."""
    node = graph.nodes[0]
    sessions = {}
    for how in options:
        g = graph.copy()
        g.replace_node(g.nodes[0], node.replace(attrs={**node.attrs, LOWERING: how}))
        sessions[how] = session(to_onnx(g).SerializeToString(), threads=threads)
    rng = np.random.default_rng(0)
    feeds = {i: rng.standard_normal(graph.types[i].shape).astype(np.float32) for i in graph.inputs}
    return interleaved_medians(sessions, feeds, runs)


def interleaved_medians(sessions: dict[str, Any], feeds: dict[str, np.ndarray], runs: int,
                        warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of one run of each session on `feeds`: `warmup` rounds, then `runs` timed rounds,
    each round running every session once."""
    times: dict[str, list[float]] = {how: [] for how in sessions}
    for k in range(runs + warmup):
        for how, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, feeds)
            if k >= warmup:
                times[how].append((time.perf_counter() - t) * 1e3)
    return {how: float(np.median(ts)) for how, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", default="out/lowering_times.json")
    ap.add_argument("--only", default="", help="only layers whose name contains this")
    ap.add_argument("--frozen", action="store_true", help="input gradients of frozen layers (constant kernels)")
    args = ap.parse_args(argv)
    rows = []
    print("| model | layer | op | ms per lowering (fastest first) |")
    print("|---|---|---|---|")
    for model, layer, c_in, c_out, size, k, stride, groups in LAYERS:
        if args.only not in layer:
            continue
        for graph in backward_nodes(c_in, c_out, size, k, stride, groups, args.frozen):
            node = graph.nodes[0]
            options = get_op(node.op).lowering_options(graph.types, node)
            ms = time_lowerings(graph, options, args.runs)
            rows.append(dict(model=model, layer=layer, op=node.op, ms=ms))
            cells = ", ".join(f"{how} {t:.2f}" for how, t in sorted(ms.items(), key=lambda kv: kv[1]))
            print(f"| {model} | {layer} | {node.op.replace('conv2d_', '')} | {cells or 'one lowering'} |", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
