"""LoRA adapters compiled into the step: y = W x + b + (alpha/r) * B(A x), only A and B trained.

Two sources of adapters, one representation (`Adapter`):
- `plan(spec, graph)`: the `lora=` option. Every `linear` node, and every `conv2d` with groups == 1, whose
  weight belongs to a module matching a target gets one (a target matches as in peft: the module's path
  equals it or ends with '.' + it; a target with * ? [ is an fnmatch pattern over the whole path). A is
  drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with numpy's default_rng(seed) (the bound of torch's
  kaiming_uniform_(a=sqrt(5)), which peft uses; fan_in = in features, or in channels * kh * kw), B = 0.
  conv2d: A is a conv with W's kernel, stride, padding and dilation to r channels, B a 1x1 conv.
  Grouped and depthwise convs, and (in, out) weights (Hugging Face's Conv1D), are refused.
- `strip_peft(graph, parameters)`: a model wrapped by peft traces as base(x) + lora_B(lora_A(x)) * s
  per LoraLayer; the adapter nodes are removed (so the inference graph has none) and become Adapters
  holding peft's current A, B and scale (s = alpha/r, or alpha/sqrt(r) with rslora: read from the graph).

`insert(graph, adapters)` puts them back in as IR for the training graph. The frozen W stays a constant,
so autodiff builds no gradient for it; A and B are constants that compile lifts to trainable inputs.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pockprop.artifact.contract import AdapterSpec
from pockprop.errors import CompileError
from pockprop.ir import Graph, Node, TensorType, module_of
from pockprop.ops.builder import Builder

KEYS = ("r", "alpha", "targets", "dropout", "seed")
_ADAPTED = ("linear", "conv2d")


@dataclass(frozen=True)
class LoraSpec:
    """What `compile(lora=...)` asks for."""

    r: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@dataclass
class Adapter:
    """One adapter: the frozen weight it adds to, its A and B (names and values) and the node it adapts."""

    spec: AdapterSpec
    a_value: np.ndarray
    b_value: np.ndarray
    node: Node  # the base linear/conv2d node in the graph the adapter was planned on


def parse_spec(spec: Any) -> LoraSpec:
    """A LoraSpec from a dict ({"r": 8, "alpha": 16, "targets": [...], "dropout": 0}), the CLI's text
    "r=8,alpha=16,targets=q_proj,v_proj" (a part without '=' continues the targets), or a LoraSpec."""
    if isinstance(spec, LoraSpec):
        d: dict[str, Any] = {k: getattr(spec, k) for k in KEYS}
    elif isinstance(spec, str):
        d = _parse_text(spec)
    elif isinstance(spec, dict):
        d = dict(spec)
    else:
        raise CompileError(f"lora: expected a dict like {{'r': 8, 'alpha': 16, 'targets': ['q_proj']}}, got {spec!r:.80}")
    unknown = sorted(set(d) - set(KEYS))
    if unknown:
        raise CompileError(f"lora: unknown keys {', '.join(unknown)}; known: {', '.join(KEYS)}")
    r, targets = d.get("r"), d.get("targets")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise CompileError(f"lora: r must be a positive integer, got {r!r}")
    alpha = d.get("alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha == 0:
        raise CompileError(f"lora: alpha must be a finite non-zero number, got {alpha!r}")
    if isinstance(targets, str):
        targets = [targets]
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise CompileError("lora: targets must name at least one module, e.g. ['q_proj', 'v_proj']")
    dropout = d.get("dropout", 0)
    if dropout != 0:
        raise CompileError(f"lora: dropout {dropout!r} is not supported; only 0 (the step has no random input)")
    seed = d.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise CompileError(f"lora: seed must be an integer, got {seed!r}")
    return LoraSpec(r, float(alpha), tuple(targets), 0.0, seed)


def _parse_text(text: str) -> dict[str, Any]:
    d: dict[str, Any] = {}
    key = None
    for part in (p.strip() for p in text.split(",")):
        if "=" in part:
            key, value = (s.strip() for s in part.split("=", 1))
            if key in d:
                raise CompileError(f"lora: {key} given twice in {text!r}")
            d[key] = [value] if key == "targets" else value
        elif key == "targets" and part:
            d[key].append(part)
        else:
            raise CompileError(f"lora: expected KEY=VALUE parts like r=8,alpha=16,targets=q_proj,v_proj; got {text!r}")
    for k, conv in (("r", int), ("alpha", float), ("dropout", float), ("seed", int)):
        if k in d:
            try:
                d[k] = conv(d[k])
            except ValueError:
                raise CompileError(f"lora: {k} must be a number, got {d[k]!r}") from None
    return d


def _matches(path: str, target: str) -> bool:
    if any(c in target for c in "*?["):
        return fnmatch.fnmatchcase(path, target)
    return path == target or path.endswith("." + target)


def plan(spec: LoraSpec, graph: Graph, parameters: list[str], taken: set[str]) -> list[Adapter]:
    """Adapters for every layer `spec.targets` match (see the module doc); CompileError for a target that
    matches no layer (listing the layer names), a layer that cannot take one, or a weight in `taken`
    (already adapted by peft, or trained whole by a scheme: the caller passes those)."""
    params = set(parameters)
    layers = [n for n in graph.nodes if n.op in _ADAPTED and len(n.inputs) > 1 and n.inputs[1] in params]
    hit = {t: False for t in spec.targets}
    rng = np.random.default_rng(spec.seed)
    adapters = []
    for node in layers:
        w = node.inputs[1]
        path = module_of(w)
        matched = [t for t in spec.targets if _matches(path, t)]
        if not matched:
            continue
        hit.update((t, True) for t in matched)
        _check_layer(graph, node, w, path, taken)
        shape = graph.types[w].shape
        kind = node.op
        base = AdapterSpec(w, f"{path}.lora_A.weight", f"{path}.lora_B.weight", spec.scale, kind, tuple(shape))
        a_shape, b_shape = base.expected_shapes(spec.r)
        fan_in = math.prod(a_shape[1:])
        dtype = graph.types[w].dtype
        a = rng.uniform(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), a_shape).astype(dtype)
        adapters.append(Adapter(base, a, np.zeros(b_shape, dtype), node))
    missing = [t for t, ok in hit.items() if not ok]
    if missing:
        names = sorted({module_of(n.inputs[1]).rsplit(".", 1)[-1] for n in layers})
        example = module_of(layers[0].inputs[1]) if layers else "none"
        raise CompileError(f"lora: targets {', '.join(map(repr, missing))} match no linear or conv layer; the "
                           f"model's are named {', '.join(names) or '(none)'} (full paths like {example!r})")
    return adapters


def _check_layer(graph: Graph, node: Node, w: str, path: str, taken: set[str]) -> None:
    if w in taken:
        raise CompileError(f"lora: {path} already has an adapter or is trained (trainable or scheme); "
                           "train one or the other")
    if node.attrs.get("weight_in_out"):
        raise CompileError(f"lora: {path} keeps its weight (in, out) (Hugging Face Conv1D); not supported")
    if node.op == "conv2d" and node.attrs.get("groups", 1) != 1:
        raise CompileError(f"lora: {path} is a grouped or depthwise conv (groups={node.attrs['groups']}); LoRA "
                           "applies to linear layers and convs with groups=1")
    users = graph.uses(w)
    if len(users) != 1:
        raise CompileError(f"lora: the weight of {path} is used by {len(users)} nodes (shared); not supported")
    for name in (f"{path}.lora_A.weight", f"{path}.lora_B.weight"):
        if name in graph.types:
            raise CompileError(f"lora: the model already has a value named {name!r}")


def insert(graph: Graph, adapters: list[Adapter]) -> Graph:
    """`graph` (changed and returned) with each adapter's branch after its layer: the layer's output
    value is renamed and `y = base + scale * B(A x)` takes its name, so every reader sees the adapted
    value. A and B become constants (compile lifts them); W is untouched."""
    if not adapters:
        return graph
    by_node = {ad.node: ad for ad in adapters}
    nodes = list(graph.nodes)
    graph.nodes = []
    for node in nodes:
        ad = by_node.get(node)
        if ad is None:
            graph.append(node)
            continue
        y = node.outputs[0]
        base = graph.add_value(graph.fresh(f"{y}.base"), graph.types[y])
        graph.append(node.replace(outputs=[base]))
        a = graph.add_constant(ad.a_value, name=ad.spec.a)
        b_ = graph.add_constant(ad.b_value, name=ad.spec.b)
        graph.param_names.update({a: a, b_: b_})
        b = Builder(graph, node.module or module_of(ad.spec.weight), node.phase)
        x = node.inputs[0]
        if ad.spec.kind == "linear":
            ax = b.op("linear", [x, a], hint="lora_a")
            bax = b.op("linear", [ax, b_], hint="lora_b")
        else:
            at = node.attrs
            ax = b.op("conv2d", [x, a], hint="lora_a", stride=at["stride"], padding=at["padding"],
                      dilation=at["dilation"], groups=1)
            bax = b.op("conv2d", [ax, b_], hint="lora_b", stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)
        scaled = b.op("mul", [bax, b.scalar_like(ad.spec.scale, bax)], hint="lora_scaled")
        graph.append(Node("add", (base, scaled), (y,), {}, b.module, node.phase))
    return graph


def strip_peft(graph: Graph, parameters: list[str]) -> tuple[Graph, list[str], list[Adapter]]:
    """Recognise peft's LoraLayers (y = base(x) + lora_B(lora_A(x)) * s) in a traced graph: returns the
    graph without them (changed in place), the parameters without A and B, and the adapters (their
    `node` is the base layer). A peft form this does not recognise (DoRA, ...) is refused."""
    a_names = [p for p in parameters if ".lora_A." in p]
    adapters = []
    drop: set[Node] = set()
    for a in a_names:
        module = a.split(".lora_A.")[0]
        try:
            ad, nodes = _peft_layer(graph, a)
        except (IndexError, KeyError, ValueError):
            raise CompileError(f"peft adapter {module}: not the plain LoRA form base(x) + lora_B(lora_A(x)) * "
                               "scaling (DoRA, several adapters or lora_dropout are not supported)") from None
        adapters.append(ad)
        drop.update(nodes)
    if not adapters:
        return graph, parameters, []
    graph.nodes = [n for n in graph.nodes if n not in drop]
    for v in [o for n in drop for o in n.outputs] + [i for n in drop for i in n.inputs if i in graph.constants]:
        if v in graph.types and not graph.uses(v) and v not in graph.outputs:
            graph.types.pop(v)
            graph.constants.pop(v, None)
            graph.param_names.pop(v, None)
    gone = {n for ad in adapters for n in (ad.spec.a, ad.spec.b)}
    return graph, [p for p in parameters if p not in gone], adapters


def _peft_layer(graph: Graph, a: str) -> tuple[Adapter, list[Node]]:
    """The adapter whose lora_A weight is `a`, and its four nodes (lora_A, lora_B, mul, add) to remove;
    the add's readers are pointed at the base layer's output."""
    (na,) = graph.uses(a)
    (nb,) = graph.uses(na.outputs[0])
    (mul,) = graph.uses(nb.outputs[0])
    (add,) = graph.uses(mul.outputs[0])
    b = nb.inputs[1]
    c = mul.inputs[1] if mul.inputs[0] == nb.outputs[0] else mul.inputs[0]
    base_out = add.inputs[0] if add.inputs[1] == mul.outputs[0] else add.inputs[1]
    base = graph.producer(base_out)
    if (na.op not in _ADAPTED or nb.op != na.op or ".lora_B." not in b or len(na.inputs) > 2 or len(nb.inputs) > 2
            or mul.op != "mul" or add.op != "add" or c not in graph.constants or graph.constants[c].size != 1
            or base is None or base.op != na.op or base.inputs[0] != na.inputs[0] or base.inputs[1] not in graph.constants
            or graph.types[add.outputs[0]] != graph.types[base_out] or base.attrs.get("weight_in_out")):
        raise ValueError("not a plain LoRA layer")
    w = base.inputs[1]
    spec = AdapterSpec(w, a, b, float(graph.constants[c].reshape(())), na.op, tuple(graph.types[w].shape))
    if (graph.types[a].shape, graph.types[b].shape) != spec.expected_shapes(graph.types[a].shape[0]):
        raise ValueError("unexpected adapter shapes")
    graph.replace_all_uses(add.outputs[0], base_out)
    return Adapter(spec, graph.constants[a], graph.constants[b], base), [na, nb, mul, add]


def describe(adapters: list[AdapterSpec], counts: dict[str, int], total: int) -> list[dict[str, Any]]:
    """The report's rows: per adapted layer, its kind, rank, scale, trained elements and their share of
    the model's `total` parameters (`counts`: elements per trained tensor)."""
    rows = []
    for ad in adapters:
        n = counts[ad.a] + counts[ad.b]
        rows.append({"layer": module_of(ad.weight), "kind": ad.kind, "scale": ad.scale, "params": n,
                     "r": counts[ad.a] // math.prod(ad.expected_shapes(1)[0]), "percent": 100.0 * n / max(total, 1)})
    return rows
