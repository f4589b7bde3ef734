"""Update schemes: which parts of which layers a training step updates (sparse backpropagation).

A scheme is a list of rules over layer module paths (fnmatch; 'fc.*' also matches 'fc' itself; a
later rule overrides an earlier one for the layers it matches). Each rule gives an update kind:

  frozen   nothing
  full     weight and bias, whole
  bias     the bias only (BatchNorm: beta)
  weight   the weight on a channel slice at `ratio` (0 < ratio <= 1), with the bias if `bias: true`

Slices take the first round(ratio * C) channels (at least one), as the Tiny Training Engine does, on
the **input**-channel axis of a conv or linear weight: the weight gradient then needs only that slice
of the input activation, which is the memory win. A depthwise conv has one input channel per group,
so its slice is over channels (axis 0), and the activation slice shrinks the same way.

Presets (`resolve_scheme("NAME", ...)`) are defined over the model's blocks (compiler/blocks.py: the
elements of its repeated stacks wherever they are nested, the children of its top-level containers, and
runs of other modules grouped into one block, such as a ResNet's stem). The head is the last linear layer
in forward order; the head's block (the head, and a final norm or pooler between the last block and it)
is the rear end of the model, not one of "the blocks" below.
  full          every parameter
  classifier    the head only
  last-k:N      every layer of the last N blocks and of the head's block
  bias-only     every bias (conv/linear bias, BatchNorm beta), and the head
  sparse        the head; biases of the layers in the last half of the blocks; in each of the last 4
                blocks one weight at ratios 1/8, 1/4, 1/4, 1/2: a CNN's first conv/linear layer, or in a
                transformer (its last block has a feed-forward network, see `_ffn_input`) the FFN's first
                linear layer, so that attention weights stay frozen (PockEngine's choice; docs/schemes.md)
  tbft-front / tbft-middle / tbft-rear
                the blocks and the head's block split into three consecutive groups of near-equal size
                (earlier groups take the remainder); every layer of the chosen group, and the head
                (TBFT: input-, feature- and output-level drift respectively)
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from pockprop.compiler.batchnorm import MODES as BATCHNORM_MODES
from pockprop.compiler.blocks import blocks
from pockprop.errors import CompileError
from pockprop.ir import Graph, module_of
from pockprop.ops.registry import FULL, Need, Tag, get_op, ops_tagged

KINDS = ("frozen", "full", "bias", "weight")
PRESETS = ("full", "classifier", "last-k:N", "bias-only", "sparse", "tbft-front", "tbft-middle", "tbft-rear")
SPARSE_RATIOS = (1 / 8, 1 / 4, 1 / 4, 1 / 2)


@dataclass(frozen=True)
class Rule:
    pattern: str
    update: str = "full"
    ratio: float = 1.0
    bias: bool = False

    def __post_init__(self) -> None:
        if self.update not in KINDS:
            raise CompileError(f"scheme rule {self.pattern!r}: update {self.update!r} is not one of {', '.join(KINDS)}")
        if not 0.0 < self.ratio <= 1.0:
            raise CompileError(f"scheme rule {self.pattern!r}: ratio {self.ratio} is outside (0, 1]")
        if self.update != "weight" and (self.ratio != 1.0 or self.bias):
            raise CompileError(f"scheme rule {self.pattern!r}: ratio and bias apply to update 'weight' only")


@dataclass(frozen=True)
class Scheme:
    """Rules, and how the step treats batch norm: "frozen" (running statistics, eval form) or "train" (batch
    statistics, running statistics updated; compiler/batchnorm.py), a scheme option like the rules."""

    name: str
    rules: tuple[Rule, ...]
    batchnorm: str = "frozen"

    def __post_init__(self) -> None:
        if self.batchnorm not in BATCHNORM_MODES:
            raise CompileError(f"scheme {self.name}: batchnorm {self.batchnorm!r} is not one of "
                               f"{', '.join(BATCHNORM_MODES)}")


@dataclass
class Layer:
    """A module that owns parameters, in forward order, as the traced graph uses them."""

    path: str
    op: str  # conv2d | linear | batch_norm | other
    weight: str | None = None
    bias: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)  # of the node the weight feeds (conv groups, layouts)
    block: str = ""
    params: list[str] = field(default_factory=list)  # every parameter of the module
    shape: tuple[int, ...] = ()  # the weight's shape (conv2d, linear, batch_norm)


@dataclass
class LayerUpdate:
    layer: Layer
    weight: Need | None  # None: frozen weight
    bias: bool
    ratio: float = 1.0

    @property
    def kind(self) -> str:
        if self.weight is None:
            return "bias" if self.bias else "frozen"
        if self.weight.is_full:
            return "full" if self.bias or self.layer.bias is None else "weight"
        return f"weight@{self.ratio:g}" + ("+bias" if self.bias else "")


@dataclass
class ResolvedScheme:
    name: str
    updates: list[LayerUpdate]

    def needs(self) -> dict[str, Need]:
        """Trainable parameter -> the part of it that is updated."""
        out: dict[str, Need] = {}

        def want(p: str, need: Need) -> None:  # a shared tensor may be wanted by several layers: the union
            have = out.get(p, need)
            same_axis = have.axis is not None and have.axis == need.axis  # slices all start at 0
            out[p] = have if have == need else Need(need.axis, 0, max(have.stop, need.stop)) if same_axis else FULL

        for u in self.updates:
            if u.weight is not None and u.layer.weight:
                want(u.layer.weight, u.weight)
            if u.bias and u.layer.bias:
                want(u.layer.bias, FULL)
            if u.weight is not None and u.layer.op == "other":
                for p in u.layer.params:
                    want(p, FULL)
        return out

    def table(self, counts: dict[str, int] | None = None) -> str:
        rows = [("layer", "op", "block", "update")] + [
            (u.layer.path or "<top>", u.layer.op, u.layer.block, u.kind) for u in self.updates]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"scheme {self.name}:"] + ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        return "\n".join(lines)


# -- reading schemes ------------------------------------------------------------------------------

def scheme_from_dict(d: dict[str, Any], name: str = "custom") -> Scheme:
    if not isinstance(d, dict) or not isinstance(d.get("rules"), list) or not d["rules"]:
        raise CompileError(f"scheme {name}: expected a mapping with a non-empty list 'rules'")
    unknown = set(d) - {"name", "rules", "batchnorm"}
    if unknown:
        raise CompileError(f"scheme {name}: unknown keys {', '.join(sorted(unknown))} (expected name, rules, "
                           "batchnorm)")
    rules = []
    for i, r in enumerate(d["rules"]):
        if not isinstance(r, dict) or "match" not in r:
            raise CompileError(f"scheme {name}: rule {i + 1} needs a 'match' pattern")
        extra = set(r) - {"match", "update", "ratio", "bias"}
        if extra:
            raise CompileError(f"scheme {name}: rule {i + 1} ({r['match']!r}) has unknown keys {', '.join(sorted(extra))}")
        rules.append(Rule(str(r["match"]), str(r.get("update", "full")), _ratio(r.get("ratio", 1.0), r["match"]),
                          bool(r.get("bias", False))))
    return Scheme(str(d.get("name", name)), tuple(rules), str(d.get("batchnorm", "frozen")))


def _ratio(v: Any, pattern: str) -> float:
    try:
        if isinstance(v, str) and "/" in v:
            num, den = v.split("/")
            return float(num) / float(den)
        return float(v)
    except (ValueError, ZeroDivisionError):
        raise CompileError(f"scheme rule {pattern!r}: ratio {v!r} is not a number or fraction like 1/4") from None


def load_scheme(spec: str | Scheme | dict[str, Any]) -> Scheme | str:
    """A Scheme, a preset name (returned as is, resolved against the model later) or a YAML path."""
    if isinstance(spec, Scheme):
        return spec
    if isinstance(spec, dict):
        return scheme_from_dict(spec)
    if spec.endswith((".yaml", ".yml")) or os.path.sep in spec:
        import yaml

        try:
            with open(spec) as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise CompileError(f"scheme file {spec} not found") from None
        except yaml.YAMLError as ex:
            raise CompileError(f"scheme file {spec}: invalid YAML ({ex})") from None
        return scheme_from_dict(data, name=os.path.basename(spec))
    base = spec.split(":")[0]
    if base not in {p.split(":")[0] for p in PRESETS}:
        raise CompileError(f"unknown scheme preset {spec!r}; presets: {', '.join(PRESETS)}, or a YAML file")
    return spec


# -- model structure ------------------------------------------------------------------------------

def _sliceable_weight(op: str) -> bool:
    """A layer op that computes a channel slice of its weight gradient directly (conv2d, linear)."""
    return op != "other" and 1 in get_op(op).sliceable


def _home(homes: list[str], module: str) -> str:
    """Which of a parameter's modules a use inside `module` belongs to: the innermost one holding that
    use, else the module of its first name (a functional use from outside)."""
    inside = [h for h in homes if h == "" or module == h or module.startswith(h + ".")]
    return max(inside, key=len) if inside else homes[0]


def discover_layers(graph: Graph, parameters: list[str], tree: list[tuple[str, bool]],
                    aliases: dict[str, str] | None = None) -> list[Layer]:
    """Layers in forward order from the traced graph; `tree` is compiler/blocks.module_tree(model).

    A module whose parameters feed a conv/linear/batch norm as its weight (input 1) or bias (input 2)
    is that kind of layer; one whose parameters are used any other way is 'other' (whole tensors only).
    A shared parameter (`aliases`: other name -> its name in `parameters`) belongs to the layer of each
    module that uses it under one of its names: a tied LM head is a linear layer whose weight is the
    embedding's.
    """
    layers: dict[str, Layer] = {}
    layer_ops = ops_tagged(Tag.LAYER)
    homes = {p: [module_of(p)] for p in parameters}
    for alias, p in (aliases or {}).items():
        homes[p].append(module_of(alias))
    used_by: dict[str, list[str]] = {p: [] for p in parameters}
    for node in graph.nodes:
        for k, v in enumerate(node.inputs):
            if v not in homes:
                continue
            path = _home(homes[v], node.module)
            layer = layers.setdefault(path, Layer(path, node.op))
            used_by[v].append(path)
            if node.op not in layer_ops or k not in (1, 2) or layer.op != node.op:
                layer.op = "other"
            elif k == 1:
                layer.weight, layer.attrs = v, dict(node.attrs)
                layer.shape = graph.types[v].shape
            else:
                layer.bias = v
    for p in parameters:
        for path in dict.fromkeys([module_of(p)] + used_by[p]):
            if path in layers:
                layers[path].params.append(p)
    named = blocks(tree)
    for layer in layers.values():
        layer.block = next((name for name, prefix in named
                            if layer.path == prefix or layer.path.startswith(prefix + ".")), layer.path)
    return list(layers.values())


# -- resolution -----------------------------------------------------------------------------------

def _matches(path: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path + ".", pattern)


def _slice_need(layer: Layer, ratio: float, shapes: dict[str, tuple[int, ...]]) -> Need:
    shape = shapes[layer.weight] if layer.weight else ()
    if not _sliceable_weight(layer.op) or len(shape) < 2:
        raise CompileError(f"layer {layer.path} ({layer.op}): its weight cannot be sliced by channels; "
                           "use update 'full' or 'bias' for it")
    axis = get_op(layer.op).weight_slice_axis(layer.attrs, shape)
    assert axis is not None  # _sliceable_weight above
    k = max(1, round(ratio * shape[axis]))
    return FULL if k == shape[axis] else Need(axis, 0, k)


def _ffn_input(block: list[Layer]) -> Layer | None:
    """The first linear layer of a transformer block's feed-forward network, or None if `block` does not
    look like one: it has at least 3 linear layers, and an earlier one's output width is the input width of
    the last one (the FFN's down projection); the first such layer in forward order (Llama's gate_proj)."""
    linear = [l for l in block if l.op == "linear" and len(l.shape) == 2]
    if len(linear) < 3:
        return None

    def in_out(l: Layer) -> tuple[int, int]:  # (input, output) features, whichever way the weight is stored
        return (l.shape[0], l.shape[1]) if l.attrs.get("weight_in_out") else (l.shape[1], l.shape[0])

    width = in_out(linear[-1])[0]
    return next((l for l in linear[:-1] if in_out(l)[1] == width), None)


def preset_scheme(name: str, layers: list[Layer], batchnorm: str = "frozen") -> Scheme:
    """A preset resolved against the model's layers as explicit rules (a layer named twice is ruled once)."""
    return Scheme(name, tuple(dict.fromkeys(_preset_rules(name, layers))), batchnorm)


def _preset_rules(name: str, layers: list[Layer]) -> tuple[Rule, ...]:
    head = [l for l in layers if l.op == "linear"]
    if not head:
        raise CompileError(f"scheme {name}: the model has no linear layer to serve as the classifier head")
    head_rule = Rule(head[-1].path, "full")
    head_block = head[-1].block
    # the blocks in forward order; the head's block (the head, and what lies between the last block and
    # it: a final norm, a pooler) is the rear end, apart
    blocks: list[str] = list(dict.fromkeys(l.block for l in layers if l.block != head_block))
    in_block = lambda b: [l for l in layers if l.block == b]  # noqa: E731
    by_block = lambda bs: [Rule(l.path, "full") for l in layers  # noqa: E731
                           if l.block in bs and l.path != head[-1].path]
    if name == "full":
        return (Rule("*", "full"),)
    if name == "classifier":
        return (head_rule,)
    if name.startswith("last-k"):
        try:
            k = int(name.split(":")[1])
            assert k >= 1
        except (IndexError, ValueError, AssertionError):
            raise CompileError(f"scheme {name!r}: write last-k:N with N >= 1 blocks, e.g. last-k:2") from None
        if k > len(blocks):
            raise CompileError(f"scheme {name}: the model has only {len(blocks)} blocks")
        return tuple(by_block(blocks[-k:] + [head_block])) + (head_rule,)
    if name == "bias-only":
        return tuple(Rule(l.path, "bias") for l in layers if l.bias) + (head_rule,)
    if name == "sparse":
        late = blocks[len(blocks) // 2:]
        rules = [Rule(l.path, "bias") for l in layers if l.block in late and l.bias]
        transformer = bool(blocks) and _ffn_input(in_block(blocks[-1])) is not None
        for block, ratio in zip(blocks[-len(SPARSE_RATIOS):], SPARSE_RATIOS[-len(blocks):]):
            if transformer:
                first = _ffn_input(in_block(block))
            else:
                first = next((l for l in in_block(block) if _sliceable_weight(l.op)), None)
            if first is not None:
                rules.append(Rule(first.path, "weight", ratio, bias=first.bias is not None and block in late))
        return tuple(rules) + (head_rule,)
    if name.startswith("tbft-"):
        blocks = blocks + [head_block]  # the head is the rear end of the model here
        if len(blocks) < 3:
            raise CompileError(f"scheme {name}: needs at least 3 blocks, the model has {len(blocks)}")
        n, r = divmod(len(blocks), 3)
        sizes = [n + (1 if i < r else 0) for i in range(3)]
        part = {"tbft-front": 0, "tbft-middle": 1, "tbft-rear": 2}[name]
        start = sum(sizes[:part])
        return tuple(by_block(blocks[start:start + sizes[part]])) + (head_rule,)
    raise CompileError(f"unknown scheme preset {name!r}; presets: {', '.join(PRESETS)}")


def resolve_scheme(spec: Scheme | str, layers: list[Layer], shapes: dict[str, tuple[int, ...]]) -> ResolvedScheme:
    """Apply the rules to the layers; every rule must match something it can update."""
    scheme = spec if isinstance(spec, Scheme) else Scheme(spec, _preset_rules(spec, layers))
    chosen: dict[str, LayerUpdate] = {l.path: LayerUpdate(l, None, False) for l in layers}
    for rule in scheme.rules:
        hits = [l for l in layers if _matches(l.path, rule.pattern)]
        if not hits:
            raise CompileError(f"scheme {scheme.name}: pattern {rule.pattern!r} matches no layer; layers look like "
                               f"{', '.join(l.path for l in layers[:3])}, ...")
        if rule.update == "bias" and not any(l.bias for l in hits):
            raise CompileError(f"scheme {scheme.name}: pattern {rule.pattern!r} updates biases, but none of its "
                               f"layers ({hits[0].path}, ...) has one")
        for l in hits:
            if rule.update == "frozen":
                chosen[l.path] = LayerUpdate(l, None, False)
            elif rule.update == "full":
                chosen[l.path] = LayerUpdate(l, FULL, l.bias is not None)
            elif rule.update == "bias":
                chosen[l.path] = LayerUpdate(l, None, l.bias is not None)
            else:
                need = FULL if rule.ratio == 1.0 else _slice_need(l, rule.ratio, shapes)
                chosen[l.path] = LayerUpdate(l, need, rule.bias and l.bias is not None, rule.ratio)
    resolved = ResolvedScheme(scheme.name, [chosen[l.path] for l in layers])
    if not resolved.needs():
        raise CompileError(f"scheme {scheme.name} leaves nothing to train")
    return resolved


def scheme_names() -> Iterable[str]:
    return PRESETS
