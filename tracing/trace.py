"""Frontend: a PyTorch module -> pockprop IR (forward graph), via torch.export and core ATen.

torch.export (non-strict) gives an fx graph; core-ATen decompositions reduce it to a small op set,
except for the ops we keep whole (`KEEP`) because ONNX has a fused form of them and a direct VJP is
cheaper than the decomposed one. What depends on no input and no parameter (masks from shapes,
position ids, rotary tables) is evaluated once and imported as constants (tracing/fold.py), so it
needs no importer. Parameters keep their fully qualified names as IR value names (a parameter shared
under several names is one value, named by its first), and every node keeps the module path it was
called from, so errors, schemes and reports speak the user's names.
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
from pockprop.tracing.fold import foldable

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
    parameters: list[str]  # FQNs of nn.Parameters, in model order; a shared one once, by its first name
    buffers: list[str]
    module_types: dict[str, str] = field(default_factory=dict)  # module path -> class name
    aliases: dict[str, str] = field(default_factory=dict)  # other name of a shared parameter -> its FQN above
    output_names: list[str] = field(default_factory=list)  # per graph output, its path in what forward returns


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


def _first_line(ex: Exception) -> str:
    text = str(ex).strip()
    return f"{type(ex).__name__}: {text.splitlines()[0]}" if text else type(ex).__name__


def _views_as_reshapes(ep: torch.export.ExportedProgram) -> None:
    """Every `view` of the exported graph becomes a `reshape` (in place), before decomposition.

    A view recorded at export time is valid for the strides torch's own kernels give (SDPA returns a
    contiguous layout), but decomposing an op can give its output other strides, and the view then fails
    ("Cannot view a tensor with shape ... and strides ...": GPT-2 under SDPA, pytorch/pytorch#136543).
    The exported graph is functional and our IR has no strides, so a view and a reshape are the same value.
    """
    view = torch.ops.aten.view.default
    changed = False
    for node in ep.graph_module.graph.nodes:
        if node.op == "call_function" and node.target is view:
            node.target = torch.ops.aten.reshape.default
            changed = True
    if changed:
        ep.graph_module.recompile()


def export(model: torch.nn.Module, example_inputs: tuple[Any, ...],
           kwargs: dict[str, Any] | None = None) -> torch.export.ExportedProgram:
    """torch.export of `model(*example_inputs, **kwargs)` in eval form (frozen BatchNorm statistics,
    dropout off), then core ATen.

    Any failure of torch here is one CompileError naming torch's first line, never torch's traceback.
    """
    model.eval()
    try:
        ep = torch.export.export(model, tuple(example_inputs), kwargs or None, strict=False)
    except Exception as ex:  # torch raises many types here; the user needs the first line, not a trace
        hint = ""
        if "Cache" in str(ex) and "in output" in str(ex):  # HF models return a KV cache unless told not to
            hint = " (a Hugging Face model returns its key/value cache unless its config says use_cache=False)"
        raise CompileError(f"torch.export could not trace the model: {_first_line(ex)}{hint}") from None
    try:
        _views_as_reshapes(ep)
        return ep.run_decompositions(_decomposition_table())
    except Exception as ex:  # noqa: BLE001 -- as above
        raise CompileError(f"torch.export could not reduce the model to core ATen ops: {_first_line(ex)}") from None


def _shared(sig: Any, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Parameters that are one tensor under several names (weight tying): other name -> first name.

    torch.export lists every name as its own placeholder, all holding the same tensor (and reads one of
    them at each use); the first name in the model's order is the one `named_parameters()` reports.
    """
    first: dict[int, str] = {}
    aliases = {}
    for fqn in sig.inputs_to_parameters.values():
        name = first.setdefault(id(state[fqn]), fqn)
        if name != fqn:
            aliases[fqn] = name
    return aliases


def output_paths(spec: Any, prefix: str = "") -> list[str]:
    """The path of each leaf of a pytree spec, as a user names it: a ModelOutput's or dict's keys, a
    tuple's positions, joined by dots (`logits`, `hidden_states.1`); a bare tensor is ''."""
    if spec.is_leaf():
        return [prefix]
    keys = spec.context if isinstance(spec.context, (list, tuple)) else range(spec.num_children)
    return [path for key, child in zip(keys, spec.children())
            for path in output_paths(child, f"{prefix}.{key}" if prefix else str(key))]


def trace(model: torch.nn.Module, example_inputs: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Traced:
    """The graph of `model(*example_inputs, **kwargs)`: the tensors among them are the graph's inputs,
    named as forward names them; parameters (each shared one once) and buffers are named constants; what
    does not depend on the inputs or parameters is folded (tracing/fold.py), everything else imported."""
    ep = export(model, example_inputs, kwargs)
    sig = ep.graph_signature
    fx_graph = ep.graph_module.graph
    state = dict(ep.state_dict)
    state.update(ep.constants)
    folded = foldable(ep, state)

    unsupported: dict[str, list[str]] = {}
    for node in fx_graph.nodes:
        if node.op == "call_function" and node not in folded and node.target is not operator.getitem \
                and str(node.target) not in ATEN:
            unsupported.setdefault(str(node.target), []).append(_module_path(node)[0])
    if unsupported:
        raise UnsupportedOpError(unsupported)

    g = Graph()
    b = Builder(g)
    env: dict[torch.fx.Node, Any] = {}
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    traced = Traced(g, [], [], [], aliases=_shared(sig, state))

    def arg(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            if a not in env:  # a folded value read here for the first time: one constant for all readers
                env[a] = _constant(g, folded[a], a.name)
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
                if fqn in traced.aliases:  # a shared parameter: every name reads the one value
                    env[node] = traced.aliases[fqn]
                    continue
                array = state[fqn].detach().cpu().numpy().copy()
                env[node] = g.add_constant(array, name=fqn)
                g.param_names[fqn] = fqn
                (traced.parameters if node.name in sig.inputs_to_parameters else traced.buffers).append(fqn)
            else:
                env[node] = g.add_input(g.fresh(node.name), ttype)
                traced.user_inputs.append(env[node])
        elif node.op == "call_function":
            if node in folded:
                continue
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
            g.outputs = [arg(o) for o in (outs if isinstance(outs, (list, tuple)) else [outs])]
    traced.output_names = output_paths(ep.call_spec.out_spec)
    for fqn in traced.buffers:  # a buffer no imported node reads (folded nodes only, or none) is not stored
        if not g.uses(fqn) and fqn not in g.outputs:
            del g.constants[fqn], g.types[fqn], g.param_names[fqn]
    g.verify()
    return traced


def _constant(g: Graph, value: Any, hint: str) -> Any:
    """A folded value as the importers take it: a tensor becomes an IR constant, a sequence stays a
    sequence of them, anything else (a Python number) stays a literal."""
    if isinstance(value, torch.Tensor):
        return g.add_constant(value.detach().cpu().numpy().copy(), hint=hint)
    if isinstance(value, (list, tuple)):
        return type(value)(_constant(g, v, hint) for v in value)
    return value


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
