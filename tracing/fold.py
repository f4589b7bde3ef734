"""Trace-time folding: the fx nodes whose values do not depend on the model's inputs are evaluated once.

Attention masks built from shapes, position ids (arange, cumsum), rotary cos/sin tables and lookups of
a buffer are constants of the model. `foldable` finds them in the exported fx graph and computes them
with torch, so the importer meets only their values (one IR constant each, where an imported node reads
one) and needs no importer for the ops that built them.

What stays true:
- A node is folded only if every tensor it reads is itself folded: a buffer or lifted tensor constant
  (not one the model mutates), or the output of a folded node. Literals count as constant. A user input
  never does, and neither does an `nn.Parameter`: a scheme may train it, so its value is not known.
- Random ops (torch's `nondeterministic_seeded` tag) are never folded: their value is not a constant.
- Size bound, as `passes/constant_folding.py`: a node whose outputs take more than
  max(max_bytes, bytes of the folded tensors it reads) stays in the graph (an `expand` of a small mask to
  an activation-sized tensor would only move work from the step into the file), and so does everything
  that reads it.
- A node torch cannot evaluate here, or whose value has no numpy dtype, stays in the graph.
"""
from __future__ import annotations

import operator
from typing import Any, Iterable

import torch
import torch.fx

from pockprop.passes.constant_folding import DEFAULT_MAX_BYTES

_NUMPY_DTYPES = {torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64,
                 torch.uint8, torch.bool}


def _tensors(value: Any) -> Iterable[Any]:
    """The tensors in a value (a tensor, or a tuple/list of them); fake tensors from node.meta included."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _bytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _random(node: torch.fx.Node) -> bool:
    return torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())


def foldable(ep: torch.export.ExportedProgram, state: dict[str, torch.Tensor],
             max_bytes: int = DEFAULT_MAX_BYTES) -> dict[torch.fx.Node, Any]:
    """The constant fx nodes of `ep` and their values: constant placeholders (buffers, lifted constants)
    and the call nodes folded under the rules above. `state` maps an FQN to its tensor."""
    sig = ep.graph_signature
    mutated = set(sig.buffers_to_mutate.values())
    constant_inputs = {**sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    values: dict[torch.fx.Node, Any] = {}
    for node in ep.graph_module.graph.nodes:
        if node.op == "placeholder":
            fqn = constant_inputs.get(node.name)
            if fqn is not None and fqn not in mutated:
                values[node] = state[fqn]
            continue
        if node.op != "call_function" or _random(node):
            continue
        reads = node.all_input_nodes
        if not all(r in values for r in reads):
            continue
        if node.target is operator.getitem:  # one output of a folded multi-output node
            values[node] = values[node.args[0]][node.args[1]]
            continue
        in_bytes = sum(_bytes(values[r]) for r in reads)
        if _bytes(node.meta.get("val")) > max(max_bytes, in_bytes):
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda r: values[r])
        try:
            with torch.no_grad():
                value = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 -- not evaluable here: it stays in the graph, imported as usual
            continue
        if any(t.dtype not in _NUMPY_DTYPES for t in _tensors(value)) or _bytes(value) > max(max_bytes, in_bytes):
            continue
        values[node] = value
    return values
