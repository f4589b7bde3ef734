"""Memory planner: peak live bytes of one training step from tensor lifetimes in node order.

Invariant modelled: node i runs with its inputs and outputs all resident. A value lives from its
producer's index (graph inputs: from index 0) to its last reader's index (graph outputs: to the last
node); a value nobody reads lives at its producer only. Constants are the weights stored in the file,
reported as `constant_bytes` and never counted in the peak. The peak is the largest sum of
simultaneously live tensors: what an ideal allocator needs when nothing is computed in place (an
update's `new/...` output is a buffer of its own, as onnxruntime allocates it). It moves exactly with
what the passes change: what is kept for backward, and how long gradients and state live.

Categories of a live value (first match wins), from the values' roles (ir.graph.Role):
  optimizer_state   role OPTIMIZER_STATE: the optimizer's state inputs and their updated values
  parameters        role PARAMETER: trained tensors fed at run time and their updated values; and
                    forward values computed from weights alone, never from data (a channel-sliced
                    weight concatenated with its frozen rest)
  data              other graph inputs (model inputs, labels, lr)
  activations_kept  forward/loss-phase values computed from data that some backward node reads
  gradients         backward-phase values
  workspace         anything else (forward temporaries, optimizer temporaries)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pockprop.ir import Graph, Phase, Role
from pockprop.passes.base import nbytes

CATEGORIES = ("activations_kept", "gradients", "optimizer_state", "parameters", "data", "workspace")


@dataclass
class MemoryPlan:
    peak_bytes: int
    peak_node: int  # index in graph.nodes where the peak is reached (-1: empty graph)
    breakdown: dict[str, int]  # bytes per category at the peak (sums to peak_bytes)
    constant_bytes: int
    kept_for_backward_bytes: int  # activations (data-dependent forward/loss values) backward reads
    live_bytes: list[int] = field(default_factory=list)  # live bytes at every node index
    lifetimes: dict[str, tuple[int, int]] = field(default_factory=dict)  # value -> (first, last) index

    def peak_description(self, graph: Graph) -> str:
        where = repr(graph.nodes[self.peak_node]) if 0 <= self.peak_node < len(graph.nodes) else "-"
        parts = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in self.breakdown.items() if v)
        return f"peak {self.peak_bytes / 2**20:.2f} MiB at node {self.peak_node} ({where}): {parts}"


def _data_dependent(graph: Graph) -> set[str]:
    """Values computed (transitively) from a data input: the activations, as opposed to weights."""
    dep = {v for v in graph.inputs if not graph.role(v).is_state}
    for n in graph.nodes:
        if any(i in dep for i in n.inputs):
            dep.update(n.outputs)
    return dep


def _phase(graph: Graph, value: str) -> Phase | None:
    producer = graph.producer(value)
    return None if producer is None else producer.phase


def kept_for_backward(graph: Graph) -> set[str]:
    """Activations the backward pass reads: forward/loss values computed from data."""
    read = {i for n in graph.nodes if n.phase is Phase.BACKWARD for i in n.inputs if i is not None}
    return {v for v in read & _data_dependent(graph) if (p := _phase(graph, v)) is not None and p.is_forward}


def categorize(graph: Graph) -> dict[str, str]:
    """Category of every non-constant value (see module docstring)."""
    kept = kept_for_backward(graph)
    data = _data_dependent(graph)
    cat: dict[str, str] = {}
    for v in graph.types:
        if v in graph.constants and v not in graph.inputs:
            continue
        role, phase = graph.role(v), _phase(graph, v)
        if role is Role.OPTIMIZER_STATE:
            cat[v] = "optimizer_state"
        elif role is Role.PARAMETER:
            cat[v] = "parameters"
        elif v in graph.inputs:
            cat[v] = "data"
        elif v in kept:
            cat[v] = "activations_kept"
        elif phase is not None and phase.is_forward and v not in data:
            cat[v] = "parameters"
        elif phase is Phase.BACKWARD:
            cat[v] = "gradients"
        else:
            cat[v] = "workspace"
    return cat


def plan_memory(graph: Graph) -> MemoryPlan:
    n_nodes = len(graph.nodes)
    last = max(n_nodes - 1, 0)
    fed = set(graph.inputs)
    span: dict[str, list[int]] = {v: [0, 0] for v in graph.inputs}
    for k, node in enumerate(graph.nodes):
        for o in node.outputs:
            span[o] = [k, k]
        for i in node.inputs:
            if i is not None and (i in fed or i not in graph.constants):
                span[i][1] = k  # nodes are in order, so the last write is the last use
    for o in graph.outputs:
        if o in span:
            span[o][1] = last

    # sweep: +bytes at the first index, -bytes after the last
    delta = [0] * (n_nodes + 1)
    for v, (a, b) in span.items():
        delta[a] += nbytes(graph.types[v])
        delta[b + 1] -= nbytes(graph.types[v])
    live, total = [], 0
    for k in range(n_nodes):
        total += delta[k]
        live.append(total)
    peak_node = max(range(n_nodes), key=live.__getitem__) if n_nodes else -1
    peak = live[peak_node] if n_nodes else sum(nbytes(graph.types[v]) for v in graph.inputs)

    cat = categorize(graph)
    breakdown = dict.fromkeys(CATEGORIES, 0)
    for v, (a, b) in span.items():
        if a <= max(peak_node, 0) <= b:
            breakdown[cat[v]] += nbytes(graph.types[v])
    return MemoryPlan(
        peak_bytes=peak,
        peak_node=peak_node,
        breakdown=breakdown,
        constant_bytes=sum(int(a.nbytes) for c, a in graph.constants.items() if c not in graph.inputs),
        kept_for_backward_bytes=sum(nbytes(graph.types[v]) for v in kept_for_backward(graph)),
        live_bytes=live,
        lifetimes={v: (a, b) for v, (a, b) in span.items()},
    )
