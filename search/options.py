"""Search options: what may be updated in each candidate layer, and the schemes they make.

Candidates are the layers pockprop.compiler.scheme.discover_layers finds with op conv2d, linear or batch_norm,
minus the head (the last linear layer), which every scheme trains in full: the `classifier` preset
is the baseline every gain is measured against. Per candidate layer the options are

  bias        its bias (conv/linear bias, BatchNorm beta), if it has one
  weight@r    its weight on the first round(r x C) input channels (depthwise convs: channels), for each
              ratio r, together with its bias when it has one ("weight@1/4+bias"); a BatchNorm weight
              cannot be sliced, so BatchNorm layers get weight@1 only

Each option is probed as the scheme {classifier head: full} + {that layer: that update}; a selection
of options becomes the scheme of the head plus one rule per chosen layer (`scheme_of`).
"""
from __future__ import annotations

import fnmatch
import glob
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Iterable, Sequence

from pockprop.errors import CompileError
from pockprop.compiler.scheme import Layer, Rule, Scheme

SEARCH_OPS = ("conv2d", "linear", "batch_norm")


class SearchError(CompileError):
    """The search cannot run as asked (budget, data, candidates); the message names what was given."""


def ratio_text(r: float) -> str:
    """1/4 for 0.25, 1 for 1.0; a decimal when no small fraction equals it."""
    f = Fraction(r).limit_denominator(1024)
    if float(f) != r:
        return f"{r:g}"
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def parse_ratios(text: str | Iterable[float]) -> tuple[float, ...]:
    """'1/8,1/4,0.5,1' -> (0.125, 0.25, 0.5, 1.0); each in (0, 1]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        try:
            value = float(Fraction(item.strip())) if isinstance(item, str) else float(item)
        except (ValueError, ZeroDivisionError):
            raise SearchError(f"ratio {item!r} is not a number or fraction like 1/4") from None
        if not 0.0 < value <= 1.0:
            raise SearchError(f"ratio {item!r} is outside (0, 1]")
        out.append(value)
    if not out:
        raise SearchError("no ratios given")
    return tuple(sorted(set(out)))


@dataclass
class Option:
    """One way to update one layer, with what probing it measured (filled in by the search)."""

    layer: str
    update: str  # "bias" | "weight" | "block"
    ratio: float = 1.0
    bias: bool = False  # weight options: the bias is trained too
    members: tuple[str, ...] = ()  # block options: the layers trained in full
    accuracy: float = 0.0  # validation accuracy after the probe's fine-tuning
    loss: float = 0.0  # validation loss after it
    gain: float = 0.0  # accuracy - baseline accuracy
    loss_gain: float = 0.0  # baseline loss - loss
    score: float = 0.0  # what the solver maximizes (see pockprop.search.contribution.score)
    memory_bytes: float = 0.0  # memory cost over the classifier baseline (see pockprop.search.costs)
    backward_macs: int = 0  # backward MACs over the baseline
    ms: float = 0.0  # measured ms per step over the baseline (>= 0)
    params: int = 0  # trainable parameters over the baseline
    cached: bool = False
    rung: int = 0  # 0: the screen's probe; k: re-probed by successive halving's round k (search/finalists.py)
    lr: float | None = None  # the learning rate of the probe that measured it

    @property
    def name(self) -> str:
        if self.update in ("bias", "block"):
            return self.update
        return f"weight@{ratio_text(self.ratio)}" + ("+bias" if self.bias else "")

    @property
    def paths(self) -> set[str]:
        """The layers this option updates: two options of one search never share one."""
        return set(self.members) if self.update == "block" else {self.layer}

    @property
    def label(self) -> str:
        return f"{self.layer}:{self.name}"

    def rules(self) -> tuple[Rule, ...]:
        if self.update == "block":
            return tuple(Rule(glob.escape(p), "full") for p in self.members)
        pattern = glob.escape(self.layer)  # a module path matched literally, whatever characters it has
        if self.update == "bias":
            return (Rule(pattern, "bias"),)
        return (Rule(pattern, "weight", self.ratio, self.bias),)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"name": self.name}

    def __repr__(self) -> str:
        return f"Option({self.label}, gain={self.gain:+.4f}, memory={self.memory_bytes:.0f}B)"


def head_of(layers: Sequence[Layer]) -> Layer:
    linear = [l for l in layers if l.op == "linear"]
    if not linear:
        raise SearchError("the model has no linear layer to serve as the classifier head (the search baseline)")
    return linear[-1]


def candidate_layers(layers: Sequence[Layer], candidates: str | Sequence[str] | None = None,
                     max_layers: int | None = None) -> list[Layer]:
    """Candidate layers in forward order: conv/linear/BN minus the head, filtered by fnmatch `candidates`
    (comma-separated or a list; 'layer4.*' also matches 'layer4'), then the last `max_layers` of them
    (the ones nearest the head: the cheapest to backpropagate to)."""
    head = head_of(layers)
    found = [l for l in layers if l.op in SEARCH_OPS and l.path != head.path]
    if candidates:
        pats = [p.strip() for p in (candidates.split(",") if isinstance(candidates, str) else candidates) if p.strip()]
        for p in pats:
            if not any(fnmatch.fnmatchcase(l.path, p) or fnmatch.fnmatchcase(l.path + ".", p) for l in found):
                raise SearchError(f"candidate pattern {p!r} matches no candidate layer; candidates look like "
                                  f"{', '.join(l.path for l in found[:4])}, ...")
        found = [l for l in found if any(fnmatch.fnmatchcase(l.path, p) or fnmatch.fnmatchcase(l.path + ".", p)
                                         for p in pats)]
    if max_layers is not None:
        if max_layers < 1:
            raise SearchError(f"max_layers must be >= 1, got {max_layers}")
        found = found[-max_layers:]
    return found


def enumerate_options(layers: Sequence[Layer], ratios: Sequence[float], weight_with_bias: bool = True) -> list[Option]:
    """Every option of every candidate layer (see the module docstring)."""
    out = []
    for l in layers:
        if l.bias:
            out.append(Option(l.path, "bias"))
        if not l.weight:
            continue
        for r in (ratios if l.op in ("conv2d", "linear") else (1.0,)):
            out.append(Option(l.path, "weight", float(r), bias=weight_with_bias and l.bias is not None))
    return out


def mode_label(name: str, batchnorm: str) -> str:
    """A scheme's name as the search's tables show it: with " +bn" when batch norm trains in train mode."""
    return name + (" +bn" if batchnorm == "train" else "")


def block_options(layers: Sequence[Layer], candidates: Sequence[Layer]) -> list[Option]:
    """One option per block of the model (compiler/blocks.py) with a candidate layer: every candidate layer of
    the block in full. Blocks are for the greedy selection (measured together), not the knapsack, whose
    options are one layer each."""
    head = head_of(layers)
    paths = {l.path for l in candidates}
    out: dict[str, list[str]] = {}
    for l in layers:
        if l.path in paths and l.block != head.block:
            out.setdefault(l.block, []).append(l.path)
    return [Option(b, "block", members=tuple(m)) for b, m in out.items()]


def scheme_of(head: Layer, chosen: Iterable[Option], name: str = "search", batchnorm: str = "frozen") -> Scheme:
    """The head in full plus the rules of each chosen option."""
    return Scheme(name, (Rule(glob.escape(head.path), "full"),) + tuple(r for o in chosen for r in o.rules()),
                  batchnorm)


def scheme_dict(scheme: Scheme) -> dict[str, Any]:
    """The mapping pockprop.compiler.scheme.scheme_from_dict reads (and `pockprop compile --scheme` loads as YAML)."""
    rules = []
    for r in scheme.rules:
        d: dict[str, Any] = {"match": r.pattern, "update": r.update}
        if r.update == "weight":
            text = ratio_text(r.ratio)  # 1/4 stays a readable fraction; whole numbers stay numbers in YAML
            d["ratio"] = int(text) if text.isdigit() else text
            if r.bias:
                d["bias"] = True
        rules.append(d)
    return {"name": scheme.name, "rules": rules} | ({"batchnorm": scheme.batchnorm} if scheme.batchnorm != "frozen" else {})
