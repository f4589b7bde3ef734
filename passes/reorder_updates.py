"""Update reordering: apply each parameter's optimizer update as soon as its gradient is ready.

PockEngine's in-place update order. In the order autodiff + optimizer build, every update runs after
the whole backward pass, so every gradient -- and every old parameter and optimizer-state tensor the
update reads -- stays alive until the end of the step. Moving a parameter's update right after the
backward node that completes its gradient lets the gradient, the old parameter and the old state die
there, while the backward pass of the layers below is still running.

Rewrite (an order change only, no node is added or changed):
  * an optimizer-phase node that reads (transitively, within the optimizer phase) a value computed
    by a non-optimizer node is placed right after the last such producer ("as early as its inputs
    allow");
  * an optimizer-phase node that reads only graph inputs and constants (weight decay `p * wd`,
    momentum `buf * mu`, Adam's step counter) is placed right before its earliest reader: hoisting
    it to the start of the step would keep its output alive through the whole step for nothing;
  * optimizer nodes placed at the same point keep their original relative order, and non-optimizer
    nodes keep theirs exactly.
Guard: an early update briefly holds old parameter, new parameter and update temporaries together
while backward values are still alive, so where the weights dominate (small batches) moving it can
raise the peak. The pass therefore checks the peak with the memory planner and sends back to the end
of the step, one at a time, the update (all optimizer nodes of one module) scheduled last before the
peak, until the peak is no higher than the original order's. Worst case: the original order.
The result is a valid topological order (checked with `Graph.verify`).
"""
from __future__ import annotations

from pockprop.ir import Graph, Node, Phase
from pockprop.passes.base import PassResult
from pockprop.passes.memory_plan import plan_memory


def _schedule(rest: list[Node], opt: list[Node], deferred: set[str]) -> list[Node]:
    """Non-optimizer nodes in their order, each optimizer node inserted at its placement point.

    Optimizer nodes whose module is in `deferred` (and what reads them) go after the last node.
    """
    end = len(rest) - 1
    pos = {o: k for k, n in enumerate(rest) for o in n.outputs}  # value -> index in `rest`
    opt_of = {o: n for n in opt for o in n.outputs}

    # ready[n]: index in `rest` after which all of n's inputs exist (-1: from the start)
    ready: dict[Node, int] = {}
    for n in opt:  # `opt` is in a topological order already
        ready[n] = max([end if n.module in deferred else -1] + [pos[i] for i in n.inputs if i in pos]
                           + [ready[opt_of[i]] for i in n.inputs if i in opt_of])

    # readers of each optimizer node: later optimizer nodes, and non-optimizer nodes (by index)
    opt_readers: dict[Node, list[Node]] = {n: [] for n in opt}
    rest_reader: dict[Node, int] = {}
    for n in opt:
        for i in n.inputs:
            if i in opt_of:
                opt_readers[opt_of[i]].append(n)
    for k, n in enumerate(rest):
        for i in n.inputs:
            if i in opt_of:
                p = opt_of[i]
                rest_reader[p] = min(rest_reader.get(p, k), k)

    # place[n]: insert n right after rest[place[n]]
    place: dict[Node, int] = {}
    for n in reversed(opt):  # readers first
        if ready[n] >= 0:
            place[n] = ready[n]
            continue
        # input-only node: sink it to its earliest reader (a rest reader at k needs it before k)
        bounds = [place[r] for r in opt_readers[n]]
        if n in rest_reader:
            bounds.append(rest_reader[n] - 1)
        place[n] = min(bounds) if bounds else -1

    slots: dict[int, list[Node]] = {}
    for n in opt:  # stable: original relative order within a slot
        slots.setdefault(place[n], []).append(n)
    order = list(slots.get(-1, []))
    for k, n in enumerate(rest):
        order.append(n)
        order.extend(slots.get(k, []))
    return order


def reorder_updates(graph: Graph) -> PassResult:
    out = graph.copy()
    rest = [n for n in out.nodes if n.phase is not Phase.OPTIMIZER]
    opt = [n for n in out.nodes if n.phase is Phase.OPTIMIZER]
    if not opt or not rest:
        return PassResult(out, False)

    limit = plan_memory(out).peak_bytes
    deferred: set[str] = set()
    while True:
        out.nodes = _schedule(rest, opt, deferred)
        plan = plan_memory(out)
        if plan.peak_bytes <= limit:
            break
        # the update scheduled last at or before the peak (one must exist: before the first moved
        # update the order is the original one, with lifetimes only shortened)
        moved = [n.module for n in out.nodes[: plan.peak_node + 1]
                 if n.phase is Phase.OPTIMIZER and n.module not in deferred]
        if not moved:  # cannot happen (see above); the original order is always a safe answer
            out.nodes = graph.nodes
            break
        deferred.add(moved[-1])
    out.verify()
    changed = [n.outputs for n in out.nodes] != [n.outputs for n in graph.nodes]
    return PassResult(out, changed)
