"""Frontend: a PyTorch module -> pockprop IR (forward graph), via torch.export and core ATen.

torch.export (non-strict) gives an fx graph; core-ATen decompositions reduce it to a small op set,
except for the ops we keep whole (`KEEP`) because ONNX has a fused form of them and a direct VJP is
cheaper than the decomposed one. Parameters keep their fully qualified names as IR value names,
and every node keeps the module path it was called from, so errors, schemes and reports speak the
user's names.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pockprop.errors import CompileError, UnsupportedOpError, UnsupportedVariant
from pockprop.ops.builder import Builder
from pockprop.ir import Graph, TensorType
from pockprop.ops import ATEN

# ATen ops kept undecomposed: we have rules for them and their decompositions are slower to train.
KEEP = (
    "aten.linear.default",
    "aten.hardswish.default",
    "aten.hardsigmoid.default",
    "aten.silu.default",
    "aten._safe_softmax.default",  # rows all -inf give 0; decomposed it is five ops and a full-size zeros tensor
    "aten.scaled_dot_product_attention.default",  # one `attention` op (docs/benchmarks.md)
)


@dataclass
class Traced:
    graph: Graph  # all parameters and buffers are constants here; compile() lifts the trainable ones
    user_inputs: list[str]
    parameters: list[str]  # FQNs of nn.Parameters, in model order
    buffers: list[str]
    module_types: dict[str, str] = field(default_factory=dict)  # module path -> class name


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _module_path(node: torch.fx.Node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, cls_name.rsplit(".", 1)[-1]


def _decomposition_table() -> dict[Any, Any]:
    table = torch.export.default_decompositions()
    for op in list(table):
        if str(op) in KEEP:
            del table[op]
    return table


def export(model: torch.nn.Module, example_inputs: tuple[Any, ...]) -> torch.export.ExportedProgram:
    """torch.export in eval form (frozen BatchNorm statistics, dropout off), then core ATen."""
    model.eval()
    try:
        ep = torch.export.export(model, tuple(example_inputs), strict=False)
    except Exception as ex:  # torch raises many types here; the user needs the first line, not a trace
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        raise CompileError(f"torch.export could not trace the model: {first}") from ex
    return ep.run_decompositions(_decomposition_table())


def trace(model: torch.nn.Module, example_inputs: tuple[Any, ...]) -> Traced:
    ep = export(model, example_inputs)
    sig = ep.graph_signature
    fx_graph = ep.graph_module.graph

    unsupported: dict[str, list[str]] = {}
    for node in fx_graph.nodes:
        if node.op == "call_function" and node.target is not operator.getitem and str(node.target) not in ATEN:
            unsupported.setdefault(str(node.target), []).append(_module_path(node)[0])
    if unsupported:
        raise UnsupportedOpError(unsupported)

    g = Graph()
    b = Builder(g)
    env: dict[torch.fx.Node, Any] = {}
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    state = dict(ep.state_dict)
    state.update(ep.constants)
    traced = Traced(g, [], [], [])

    def arg(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(arg(x) for x in a)
        return a

    for node in fx_graph.nodes:
        if node.op == "placeholder":
            val = node.meta["val"]
            ttype = TensorType(tuple(int(s) for s in val.shape), torch_dtype_name(val.dtype))
            if node.name in lifted:
                fqn = lifted[node.name]
                array = state[fqn].detach().cpu().numpy().copy()
                env[node] = g.add_constant(array, name=fqn)
                g.param_names[fqn] = fqn
                (traced.parameters if node.name in sig.inputs_to_parameters else traced.buffers).append(fqn)
            else:
                env[node] = g.add_input(g.fresh(node.name), ttype)
                traced.user_inputs.append(env[node])
        elif node.op == "call_function":
            if node.target is operator.getitem:
                src, idx = env[node.args[0]], node.args[1]
                if src[idx] is None:  # an output the importer does not expose (e.g. max-pool indices)
                    producer = node.args[0]
                    raise UnsupportedOpError({f"{producer.target} (output {idx} used by the model)":
                                              [_module_path(producer)[0]]})
                env[node] = src[idx]
                continue
            path, cls = _module_path(node)
            if path and path not in traced.module_types:
                traced.module_types[path] = cls
            with b.scope(path):
                try:
                    env[node] = ATEN[str(node.target)](b, *arg(node.args), **arg(node.kwargs))
                except UnsupportedVariant as ex:
                    raise UnsupportedOpError({f"{node.target} ({ex})": [path]}) from None
            _check_type(g, env[node], node)
        elif node.op == "output":
            outs = node.args[0]
            g.outputs = [env[o] for o in (outs if isinstance(outs, (list, tuple)) else [outs])]
    g.verify()
    return traced


def _check_type(g: Graph, value: Any, node: torch.fx.Node) -> None:
    """Our shape rules must agree with torch's: a disagreement is our bug, caught at import."""
    val = node.meta.get("val")
    if not isinstance(value, str) or not isinstance(val, torch.Tensor):
        return
    want = tuple(int(s) for s in val.shape)
    got = g.types[value].shape
    if want != got:
        raise CompileError(f"internal: shape rule of {node.target} gave {got}, torch says {want} "
                           f"(module {_module_path(node)[0] or '<top level>'})")


def to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
