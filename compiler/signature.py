"""The model's signature at compile time: how example inputs are given, which output is trained, and the
values an integer input may take.

- Example inputs are a tensor, a tuple of positional tensors, or a dict of keyword tensors (Hugging Face
  models are called as `model(input_ids=..., attention_mask=...)`). Each tensor becomes a data input
  named as torch.export names it: the forward argument's name (`x`, `input_ids`).
- A model returning several tensors (a tuple, a dict, a ModelOutput with more than `logits`) trains on
  the one `output` names, by its path (`logits`, `hidden_states.1`, `0`); the rest is dropped before
  anything is compiled. One returned tensor needs no name.
- An integer input that reaches the index of a gather (an embedding's token ids, through reshapes,
  slices, casts and concatenations) may only hold indices inside the gathered axis: its inclusive range
  is recorded in the manifest, so the device refuses an out-of-vocabulary id with a one-line error
  instead of an onnxruntime failure inside the step. Indices computed from an input (arithmetic,
  cumsum) are not traced through: nothing is recorded for them.
"""
from __future__ import annotations

from typing import Any

import torch

from pockprop.errors import CompileError
from pockprop.ir import Graph
from pockprop.passes.dce import eliminate_dead_code
from pockprop.tracing.trace import Traced

# ops whose output holds some of their input's values unchanged: a bound on the output bounds them too
_PASS_THROUGH = {"reshape", "permute", "expand", "slice", "concat"}
# indexing ops (index at input 1): the lowest index they accept for an axis of `size` (torch's rule)
_INDEXING = {"embedding": lambda size: 0, "take_along_axis": lambda size: 0, "take": lambda size: -size}


def example_args(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(positional, keyword) example inputs of `compile`'s `example_inputs`."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        if not all(isinstance(k, str) for k in example_inputs):
            raise CompileError("example_inputs: a dict's keys must be the forward's argument names")
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CompileError("example_inputs: expected a tensor, a tuple of positional inputs or a dict of keyword "
                       f"inputs, got {type(example_inputs).__name__}")


def pick_output(traced: Traced, output: str | None) -> None:
    """Keep only the model output `output` (in place; `traced` is fresh from tracing), or CompileError."""
    g, names = traced.graph, traced.output_names
    listing = ", ".join(repr(n) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    if output is None:
        if len(g.outputs) == 1:
            return
        raise CompileError(f"the model returns {len(g.outputs)} tensors ({listing}); name the one to train on "
                           f"with output=... (pockprop compile --model-output), e.g. output={names[0]!r}")
    if names == [""]:
        raise CompileError(f"output={output!r}: the model returns one unnamed tensor; leave output unset")
    if output not in names:
        raise CompileError(f"output={output!r}: the model returns {listing}")
    if len(g.outputs) == 1:
        return
    g.outputs = [g.outputs[names.index(output)]]
    traced.output_names = [output]
    traced.graph = pruned = eliminate_dead_code(g).graph
    kept = set(pruned.constants)  # parameters only the dropped outputs read are gone with them
    traced.parameters = [p for p in traced.parameters if p in kept]
    traced.buffers = [b for b in traced.buffers if b in kept]
    traced.aliases = {a: p for a, p in traced.aliases.items() if p in kept}


def index_ranges(g: Graph, inputs: list[str]) -> dict[str, tuple[int, int]]:
    """Per integer input used (directly or through _PASS_THROUGH ops) as the index of an _INDEXING op:
    the inclusive (lowest, highest) value every such use accepts."""
    ranges = {}
    for name in inputs:
        if not g.types[name].dtype.startswith(("int", "uint")):
            continue
        lo, hi = None, None
        frontier, seen = [name], {name}
        while frontier:
            v = frontier.pop()
            for node in g.uses(v):
                if node.op in _INDEXING and node.inputs[1] == v and node.inputs[0] != v:
                    size = g.types[node.inputs[0]].shape[node.attrs["axis"]]
                    low = _INDEXING[node.op](size)
                    lo, hi = (low, size - 1) if lo is None else (max(lo, low), min(hi, size - 1))
                    continue
                follows = node.op in _PASS_THROUGH or (node.op == "cast" and
                                                       g.types[node.outputs[0]].dtype.startswith(("int", "uint")))
                if follows and node.outputs[0] not in seen:
                    seen.add(node.outputs[0])
                    frontier.append(node.outputs[0])
        if lo is not None:
            ranges[name] = (lo, hi)
    return ranges
