"""Passes run as declared pipelines, each pass checked and optionally dumped.

A `Pipeline` is a named sequence of `Pass`es (a name and a `Graph -> PassResult` function). Running it
returns the final graph and a log of what each pass did (changed or not, node counts, seconds). With
verification on (the tests turn it on; `POCKPROP_VERIFY=1` does elsewhere), the graph is checked after
every pass that changed it (`verify_graph`: SSA order, def-use, roles, and every node's output types
equal to its op's shape rule), and a failure names the pass that broke it. `POCKPROP_DUMP_PASSES=DIR`
writes the graph after each pass to DIR/<pipeline>-<k>-<pass>.txt.

The compiler's pipelines (compiler/compile.py) are declared here, so the order of the optimizations is
read in one place.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

from pockprop.ir import Graph
from pockprop.ops import get_op
from pockprop.passes.base import PassResult
from pockprop.passes.constant_folding import fold_constants
from pockprop.passes.dce import eliminate_dead_code
from pockprop.passes.fold_batchnorm import fold_frozen_batchnorm
from pockprop.passes.reorder_updates import reorder_updates
from pockprop.passes.save_for_backward import save_small_for_backward

VERIFY_ENV = "POCKPROP_VERIFY"
DUMP_ENV = "POCKPROP_DUMP_PASSES"


class PassError(RuntimeError):
    """A pass produced an invalid graph (a compiler bug): names the pipeline and the pass."""


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph], PassResult]


@dataclass
class PassRecord:
    name: str
    changed: bool
    nodes_before: int
    nodes_after: int
    seconds: float


@dataclass
class PipelineResult:
    graph: Graph
    log: list[PassRecord] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(r.changed for r in self.log)


def verify_graph(graph: Graph) -> None:
    """Structural checks (Graph.verify) plus every node's output types against its op's shape rule."""
    graph.verify()
    for node in graph.nodes:
        ins = [None if i is None else graph.types[i] for i in node.inputs]
        want = get_op(node.op).shape(ins, node.attrs)
        got = [graph.types[o] for o in node.outputs]
        if want != got:
            raise ValueError(f"node {node!r}: output types {[str(t) for t in got]}, "
                             f"but its shape rule says {[str(t) for t in want]}")


@dataclass(frozen=True)
class Pipeline:
    name: str
    passes: tuple[Pass, ...]

    def __call__(self, graph: Graph, verify: bool | None = None) -> PipelineResult:
        verify = os.environ.get(VERIFY_ENV, "") not in ("", "0") if verify is None else verify
        dump = os.environ.get(DUMP_ENV)
        result = PipelineResult(graph)
        for k, p in enumerate(self.passes):
            before = len(result.graph.nodes)
            t0 = time.perf_counter()
            out = p.run(result.graph)
            result.log.append(PassRecord(p.name, out.changed, before, len(out.graph.nodes), time.perf_counter() - t0))
            result.graph = out.graph
            if verify and out.changed:
                try:
                    verify_graph(out.graph)
                except ValueError as ex:
                    raise PassError(f"pipeline {self.name}: pass {p.name} broke the graph: {ex}") from ex
            if dump:
                os.makedirs(dump, exist_ok=True)
                with open(os.path.join(dump, f"{self.name}-{k}-{p.name}.txt"), "w") as f:
                    f.write(f"# {self.name} after {p.name} (changed: {out.changed})\n{out.graph!r}\n")
        return result


DCE = Pass("eliminate_dead_code", eliminate_dead_code)
FOLD_BATCHNORM = Pass("fold_frozen_batchnorm", fold_frozen_batchnorm)
FOLD_CONSTANTS = Pass("fold_constants", fold_constants)
SAVE_FOR_BACKWARD = Pass("save_small_for_backward", save_small_for_backward)
REORDER_UPDATES = Pass("reorder_updates", reorder_updates)

# The inference graph: frozen BatchNorms folded into their convs, constant subgraphs evaluated.
INFERENCE = Pipeline("inference", (FOLD_BATCHNORM, FOLD_CONSTANTS, DCE))
# The forward graph of the training step, before autodiff: a frozen conv+BN pair becomes one conv, so its
# backward is one op too.
TRAINING_FORWARD = Pipeline("training_forward", (FOLD_BATCHNORM,))
# The whole step after autodiff and the optimizer: backward keeps slices and masks rather than whole
# activations; reorder_updates goes last, it only reorders (PockEngine's update-right-after-gradient).
TRAINING = Pipeline("training", (DCE, SAVE_FOR_BACKWARD, FOLD_CONSTANTS, REORDER_UPDATES))
# compile(optimize=False): the step as autodiff built it, minus what no output needs.
UNOPTIMIZED = Pipeline("unoptimized", (DCE,))
