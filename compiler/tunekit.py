"""The tuning kit of a training step: one tiny ONNX model per candidate lowering of each distinct lowering key.

`pockprop tune` times the kit on the device (numpy + onnxruntime only: no IR there, so the compiler lowers
every candidate here). A candidate is the one node lowered alone, exactly as in the step: the same op,
input types, attributes, module path and phase; an input that is a constant in the step (a frozen layer's
weight) stays a constant, so onnxruntime folds what the lowering derives from it, as it does in the step.
Big float constants are left to the device to fill with noise (pockprop.artifact.tuning), so the kit holds
no weights. The format is pockprop.artifact.tuning's; docs/tuning.md shows its use.
"""
from __future__ import annotations

import os
import re

import numpy as np
import onnx

from pockprop.artifact.contract import BY_ONNX
from pockprop.artifact.durable import write_atomic
from pockprop.artifact.external import MIN_BYTES
from pockprop.artifact.tuning import KIT_FILE, Candidate, Kit, KitEntry
from pockprop.emit.onnx import to_onnx
from pockprop.ir import Graph, Node
from pockprop.ops.registry import LOWERING
from pockprop.passes.lowerings import with_choice

_NOISE = "noise"  # the external-data location named in a kit's models (never a file: the device fills it)
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


def choices(graph: Graph) -> dict[str, tuple[Node, tuple[str, ...], list[str]]]:
    """Each distinct lowering key of `graph` whose node has two or more valid lowerings: its first node,
    the options (default first) and the modules where it occurs, in graph order."""
    out: dict[str, tuple[Node, tuple[str, ...], list[str]]] = {}
    for node, options, key in with_choice(graph):
        if key not in out:
            out[key] = (node, options, [])
        if node.module not in out[key][2]:
            out[key][2].append(node.module)
    return out


def one_node_graph(graph: Graph, node: Node, lowering: str | None) -> Graph:
    """`node` alone, with its lowering set (None: the op's default): the step's constants it reads stay
    constants, its other inputs become graph inputs, its outputs the step reads become graph outputs.
    Values are renamed in0, in1..., out0..., the module to "tune", and float constants hold fixed noise
    (their values do not change a kernel's speed), so one key's candidate is the same file (the same
    sha256, which the device's cache keys by) whatever model and layer it came from."""
    g = Graph()
    rng = np.random.default_rng(0)
    names = {v: f"in{i}" for i, v in enumerate(dict.fromkeys(i for i in node.inputs if i is not None))}
    for v, name in names.items():
        if v in graph.constants and v not in graph.inputs:
            value = graph.constants[v]
            if value.dtype.kind == "f":
                value = rng.standard_normal(value.shape).astype(value.dtype)
            g.add_constant(value, name=name)
        else:
            g.add_input(name, graph.types[v])
    names |= {v: f"out{i}" for i, v in enumerate(node.outputs)}
    for v in node.outputs:
        g.add_value(names[v], graph.types[v])
    attrs = {k: a for k, a in node.attrs.items() if k != LOWERING} | ({LOWERING: lowering} if lowering else {})
    g.append(node.replace(inputs=tuple(None if i is None else names[i] for i in node.inputs),
                          outputs=tuple(names[v] for v in node.outputs), attrs=attrs, module="tune"))
    read = [names[v] for v in node.outputs if graph.uses(v) or v in graph.outputs]
    g.outputs = read or [names[v] for v in node.outputs]
    return g


def _noise_out(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], str]]:
    """Turn the model's big float initializers into external data the device fills; returns them."""
    out = {}
    for t in model.graph.initializer:
        if t.data_type in _FLOATS and len(t.raw_data) >= MIN_BYTES:
            out[t.name] = (tuple(t.dims), BY_ONNX[t.data_type].name)
            length = len(t.raw_data)
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", _NOISE), ("offset", "0"), ("length", str(length))):
                t.external_data.add(key=key, value=value)
    return out


def _file_name(i: int, lowering: str) -> str:
    return f"k{i:03d}-{re.sub(r'[^A-Za-z0-9_]+', '_', lowering)}.onnx"


def build_kit(graph: Graph, directory: str, model: str = "") -> Kit:
    """Write the kit of `graph` (a training step's IR: `Artifact.train_graph`) to `directory` (created if
    missing; kit.json last, so a folder with one is complete) and return it."""
    os.makedirs(directory, exist_ok=True)
    entries = []
    for i, (key, (node, options, modules)) in enumerate(choices(graph).items()):
        cands = []
        for j, name in enumerate(options):
            m = to_onnx(one_node_graph(graph, node, None if j == 0 else name), f"{node.op}.{name}")
            random = _noise_out(m)
            file = _file_name(i, name)
            digest = write_atomic(os.path.join(directory, file), m.SerializeToString())
            cands.append(Candidate(name, file, digest, random))
        entries.append(KitEntry(key, tuple(modules), tuple(cands)))
    kit = Kit(model, tuple(entries))
    write_atomic(os.path.join(directory, KIT_FILE), kit.dumps())
    return kit
