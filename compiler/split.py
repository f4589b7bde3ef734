"""Split compile: a model cut at module boundaries into parts, each an artifact with its own training step.

The model is traced once and cut in the IR after the last node of each named module, so every part holds
a contiguous run of the forward graph and exactly one tensor, the activation, crosses each cut (a residual
branch or a data input that crosses one is refused, naming it). What is trained is resolved on the whole
model (scheme, trainable patterns, LoRA adapters planned once), so the parts together take the unsplit
model's step: part k's step feeds on part k-1's activation and, below the last part, on the gradient of its
own output as its labels (its loss is sum(output * labels), whose gradient is those labels exactly); a part
above a trained one returns the gradient of its input (contract INPUT_GRADIENT). Below the earliest part
that trains, no part returns one: backprop stops there, as in the unsplit step.

`save_split` writes part0/, part1/, ... and split.json, the index: the split's id, each part's directory,
manifest digest and holder (the device holds the first part and, in a U-shaped split of three parts, the
last one with the head and the loss, so labels never leave it; the server holds the rest).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterable, Sequence

import torch

from pockprop.artifact.contract import APPLY_FILE, INPUT_GRADIENT, VJP_FILE, SplitSpec
from pockprop.artifact.durable import write_atomic
from pockprop.compiler import lora as lora_adapters
from pockprop.compiler.artifact import Artifact
from pockprop.compiler.compile import (PartOptions, TracedModel, _check_options, batchnorm_mode, compile_traced,
                                       resolve_training, trace_model)
from pockprop.compiler.optim import parse_optimizer
from pockprop.compiler.scheme import load_scheme
from pockprop.errors import CompileError
from pockprop.ir import Graph, Role
from pockprop.ops.registry import FULL
from pockprop.tracing.trace import Traced

INDEX_FILE = "split.json"
MAX_CUTS = 2  # a bottom and a top (two parts), or bottom, middle and head (U-shaped)


def module_paths(graph: Graph) -> list[str]:
    """Every module path that owns a node, each with all its ancestors, in first-use order."""
    seen: dict[str, None] = {}
    for n in graph.nodes:
        parts = n.module.split(".") if n.module else []
        for k in range(1, len(parts) + 1):
            seen.setdefault(".".join(parts[:k]), None)
    return list(seen)


def _last_node(graph: Graph, path: str) -> int:
    inside = [k for k, n in enumerate(graph.nodes) if n.module == path or n.module.startswith(path + ".")]
    if not inside:
        tops = [p for p in module_paths(graph) if "." not in p]
        raise CompileError(f"split at {path!r}: no such module in the traced model (its top-level modules: "
                           f"{', '.join(tops[:12]) or 'none'})")
    return inside[-1]


def _segments(graph: Graph, paths: Sequence[str]) -> tuple[list[list[Any]], list[str]]:
    """The node runs between the cuts and the value crossing each cut; CompileError naming what else would."""
    if not paths:
        raise CompileError("split: give at least one module to cut after")
    if len(paths) > MAX_CUTS:
        raise CompileError(f"split: at most {MAX_CUTS} cuts (two or three parts), got {len(paths)}")
    ends = [_last_node(graph, p) for p in paths]
    if any(b <= a for a, b in zip(ends, ends[1:])):
        raise CompileError(f"split: the cuts {', '.join(paths)} must follow the forward order and differ")
    nodes = list(graph.nodes)
    if ends[-1] >= len(nodes) - 1:
        raise CompileError(f"split at {paths[-1]!r}: nothing of the model follows it")
    bounds = [0] + [e + 1 for e in ends] + [len(nodes)]
    segs = [nodes[a:b] for a, b in zip(bounds, bounds[1:])]
    defined_in = {o: k for k, seg in enumerate(segs) for n in seg for o in n.outputs}
    crossing: list[str] = []
    for k, path in enumerate(paths):
        out = {i for later in segs[k + 1:] for n in later for i in n.inputs
               if i is not None and defined_in.get(i, -1) <= k and i not in graph.constants}
        if graph.outputs[0] in defined_in and defined_in[graph.outputs[0]] <= k:
            out.add(graph.outputs[0])
        data = sorted(i for i in out if i in graph.inputs)
        acts = sorted(i for i in out if i not in graph.inputs)
        if data:
            raise CompileError(f"split at {path!r}: the model's input {', '.join(data)} is read after the cut; "
                               "a part may take only the activation")
        if len(acts) != 1:
            raise CompileError(f"split at {path!r}: {len(acts)} tensors cross the cut ({', '.join(acts[:6])}): cut "
                               "where one activation carries everything on (not inside a residual block)")
        act = acts[0]
        if defined_in[act] != k:
            raise CompileError(f"split at {path!r}: the activation crossing it comes from before the previous cut")
        if not graph.types[act].dtype.startswith("float"):
            raise CompileError(f"split at {path!r}: the crossing tensor {act} is {graph.types[act].dtype}, not float")
        crossing.append(act)
    return segs, crossing


def _part_graph(whole: Graph, nodes: list[Any], inp: str | None, out: str) -> Graph:
    g = whole.copy()
    g.nodes = nodes
    if inp is not None:  # the previous part's activation is this part's one data input
        for i in g.inputs:
            g.roles.pop(i, None)
        g.inputs = [inp]
        g.roles[inp] = Role.DATA
    g.outputs = [out]
    read = {i for n in nodes for i in n.inputs if i is not None}
    g.constants = {k: v for k, v in g.constants.items() if k in read}
    defined = set(g.inputs) | set(g.constants) | {o for n in nodes for o in n.outputs}
    g.types = {k: t for k, t in g.types.items() if k in defined}
    g.verify()
    return g


def cut(tm: TracedModel, paths: Sequence[str]) -> list[TracedModel]:
    """The traced model's parts between the cuts after modules `paths` (module paths, forward order)."""
    tr = tm.traced
    segs, crossing = _segments(tr.graph, paths)
    parts = []
    for k, nodes in enumerate(segs):
        inp = crossing[k - 1] if k else None
        out = crossing[k] if k < len(crossing) else tr.graph.outputs[0]
        g = _part_graph(tr.graph, nodes, inp, out)
        params = [p for p in tr.parameters if p in g.constants]
        traced = Traced(g, [inp] if inp else list(tr.user_inputs), params, [b for b in tr.buffers if b in g.constants],
                        dict(tr.module_types), {a: p for a, p in tr.aliases.items() if p in params},
                        tr.output_names if k == len(segs) - 1 else [])
        parts.append(TracedModel(traced, tm.tree, tm.name, [a for a in tm.adapters if a.spec.weight in params],
                                 tm.prompt if tm.prompt in params else None))
    return parts


def compile_split(model: torch.nn.Module, example_inputs: Any, split_at: str | Sequence[str], labels: Any = None,
                  loss: str = "cross_entropy", optimizer: str | dict[str, Any] = "sgd",
                  trainable: str | Iterable[str] | None = None, *, scheme: Any = None, label_smoothing: float = 0.0,
                  name: str | None = None, preprocess: Any = None, optimize: bool = True, output: str | None = None,
                  target_profile: Any = None, lora: Any = None, prompt: Any = None,
                  pos_weight: Any = None, private: bool = False) -> list[Artifact]:
    """Compile `model` cut after each module of `split_at` (one path or two, in forward order) into parts.

    The arguments are `pockprop.compile`'s (loss="kd" is not supported here); what they train is resolved
    on the whole model and each part trains its share, so stepping the parts in turn equals the unsplit
    step (runtime/split.py). Returns one Artifact per part, each with its `split` record; `save_split`
    writes them with their index. private=True gives every part that the server holds and that returns its
    input gradient two more graphs (contract VJP_FILE, APPLY_FILE) for private backpropagation
    (runtime/private_backprop.py, docs/split.md).
    """
    paths = [split_at] if isinstance(split_at, str) else list(split_at)
    if loss == "kd":
        raise CompileError("split: loss 'kd' is not supported in a split model")
    _check_options(loss, label_smoothing, trainable, scheme, None, pos_weight)
    parse_optimizer(optimizer)
    spec = load_scheme(scheme) if scheme is not None else None
    if batchnorm_mode(None, spec) != "frozen":
        raise CompileError(f"split: the scheme {spec.name} trains batch norm in train mode, which a split model "
                           "does not support")
    lora_spec = lora_adapters.parse_spec(lora) if lora is not None else None
    tm = trace_model(model, example_inputs, output, prompt)
    needs, resolved, adapters = resolve_training(tm, trainable, spec, lora_spec)
    parts = cut(tm, paths)
    shares = [({p: n for p, n in needs.items() if p in pt.traced.parameters},
               [a for a in adapters if a.spec.weight in pt.traced.parameters]) for pt in parts]  # what each trains
    earliest = next(k for k, (part_needs, part_adapters) in enumerate(shares) if part_needs or part_adapters)
    arts = []
    for k, (pt, (part_needs, part_adapters)) in enumerate(zip(parts, shares)):
        params = set(pt.traced.parameters)
        last = k == len(parts) - 1
        options = PartOptions(
            needs=part_needs, adapters=part_adapters, output_gradient=not last, input_gradient=k > earliest,
            gradients=private and holders(len(parts))[k] == "server" and k > earliest,
            scheme=None if resolved is None else dataclasses.replace(
                resolved, updates=[u for u in resolved.updates if set(u.layer.params) <= params]))
        arts.append(compile_traced(pt, labels if last else None, loss, optimizer, scheme=None, trainable=None,
                                   label_smoothing=label_smoothing if last else 0.0,
                                   name=f"{name or tm.name}.part{k}", preprocess=preprocess if k == 0 else None,
                                   optimize=optimize, target_profile=target_profile,
                                   pos_weight=pos_weight if last else None, part=options))
    split_id = _split_id(arts, paths)
    for k, art in enumerate(arts):
        art.split = SplitSpec(split_id, k, len(arts), paths[k - 1] if k else None,
                              paths[k] if k < len(paths) else None,
                              INPUT_GRADIENT if k > earliest else None,
                              *((VJP_FILE, APPLY_FILE) if art.extra_models else ()))
    return arts


def default_head(activation: tuple[int, ...], classes: int) -> torch.nn.Module:
    """A small auxiliary head for a local loss on an activation shaped `activation` (batch first): average
    over the spatial or token axes, then one linear layer to `classes` outputs."""
    if len(activation) not in (2, 3, 4):
        raise CompileError(f"local head: no default head for a rank-{len(activation)} activation")
    pool = {4: torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), 3: _TokenMean(),
            2: torch.nn.Identity()}[len(activation)]
    width = activation[1] if len(activation) == 4 else activation[-1]
    torch.manual_seed(0)
    return torch.nn.Sequential(pool, torch.nn.Linear(width, classes)).eval()


class _TokenMean(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def compile_local_head(head: torch.nn.Module, bottom: Artifact, labels: Any = None, loss: str = "cross_entropy",
                       optimizer: str | dict[str, Any] = "sgd", label_smoothing: float = 0.0) -> Artifact:
    """An auxiliary head on the first part's output, trained with its own loss on the device (SFPrompt's
    local loss): a two-part split model [bottom, head] that trains the bottom without the server. It is
    compiled as a last part taking `bottom`'s activation, returning its input gradient, with `bottom`'s
    split id, so SplitModel([bottom part, head]) pairs them."""
    if bottom.split is None or bottom.split.index != 0:
        raise CompileError("local head: give the split's first part")
    t = bottom.train_graph.types[bottom.output] if bottom.train_graph is not None else None
    if t is None:
        raise CompileError("local head: the first part has no traced graph")
    example = torch.zeros(t.shape, dtype=getattr(torch, t.dtype))
    tm = trace_model(head, example)
    params = tm.traced.parameters
    if not params:
        raise CompileError("local head: the head has no parameters to train")
    art = compile_traced(tm, labels, loss, optimizer, label_smoothing=label_smoothing, name=f"{bottom.name}.local_head",
                         part=PartOptions(needs={p: FULL for p in params}, adapters=[], output_gradient=False,
                                          input_gradient=True))
    art.split = SplitSpec(bottom.split.id, 1, 2, bottom.split.cut_out, None, INPUT_GRADIENT)
    return art


def _split_id(arts: list[Artifact], paths: list[str]) -> str:
    """A digest of the parts' graphs and initial state, and of where the model was cut."""
    h = hashlib.sha256(json.dumps(paths).encode())
    for art in arts:
        h.update(art.train_model.SerializeToString())
        h.update(art.infer_model.SerializeToString())
        for s in art.state:
            h.update(s.name.encode())
            h.update(s.initial.tobytes())
    return h.hexdigest()


def holders(parts: int) -> list[str]:
    """Who holds each part: the device the first, and the last of a U-shaped split (labels stay on it)."""
    return ["device"] + ["server"] * (parts - 2) + ["device" if parts == 3 else "server"]


def save_split(arts: list[Artifact], directory: str, local_head: Artifact | None = None) -> str:
    """Write part0/, part1/, ... (and local_head/) and the index split.json (written last: a directory with
    it is complete)."""
    os.makedirs(directory, exist_ok=True)

    def entry(art: Artifact, sub: str, holder: str) -> dict[str, Any]:
        art.save(os.path.join(directory, sub))
        with open(os.path.join(directory, sub, "manifest.json"), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        return {"path": sub, "holder": holder, "manifest_sha256": digest,
                "cut_in": art.split.cut_in if art.split else None, "cut_out": art.split.cut_out if art.split else None}

    entries = [entry(art, f"part{k}", holder) for k, (art, holder) in enumerate(zip(arts, holders(len(arts))))]
    doc = {"format": "pockprop-split", "id": arts[0].split.id if arts[0].split else None, "parts": entries}
    if local_head is not None:
        doc["local_head"] = entry(local_head, "local_head", "device")
    write_atomic(os.path.join(directory, INDEX_FILE), [(json.dumps(doc, indent=2) + "\n").encode()])
    return directory
