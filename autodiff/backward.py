"""Compile-time reverse-mode autodiff over the IR.

`backward(graph, loss, wants)` appends the backward graph to `graph` and returns the gradient value
of every wanted tensor. Only values that depend on a wanted tensor carry gradients, so no node is
built below the earliest trainable layer: backprop stops there by construction, not by a later pass.
"""
from __future__ import annotations

from pockprop.errors import CompileError
from pockprop.ops.builder import Builder
from pockprop.ir import Graph, Phase
from pockprop.ops.registry import FULL, Need, get_op


def requires_grad(graph: Graph, wants: set[str]) -> set[str]:
    """Values through which a gradient can reach a wanted tensor (forward reachability)."""
    live = set(wants)
    for node in graph.nodes:
        if get_op(node.op).differentiable and any(i in live for i in node.inputs if i is not None):
            live.update(o for o in node.outputs if graph.types[o].dtype.startswith("float"))
    return live


def backward(graph: Graph, loss: str, wants: dict[str, Need]) -> dict[str, str]:
    """Append d(loss)/d(w) for each w in `wants` (whole or a slice, per its Need); returns w -> grad."""
    if graph.types[loss].shape != ():
        raise CompileError(f"the loss must be a scalar, got {graph.types[loss]}")
    live = requires_grad(graph, set(wants))
    if loss not in live:
        raise CompileError("the loss does not depend on any trainable tensor")

    forward = list(graph.nodes)
    b = Builder(graph, phase=Phase.BACKWARD)
    cot: dict[str, str] = {loss: b.const(1.0, graph.types[loss].dtype, hint="d_loss")}

    def accumulate(value: str, grad: str) -> None:
        if value in cot:
            cot[value] = b.op("add", [cot[value], grad], hint=f"d_{value}")
        else:
            cot[value] = grad

    for node in reversed(forward):
        gouts = [cot.get(o) for o in node.outputs]
        if all(g is None for g in gouts):
            continue
        needs: list[Need | None] = [
            None if i is None or i not in live else wants.get(i, FULL) for i in node.inputs
        ]
        if all(n is None for n in needs):
            continue
        op = get_op(node.op)
        # Slices the rule cannot compute directly: ask for the whole gradient, slice it below.
        asked = [n if n is None or n.is_full or k in op.sliceable else FULL for k, n in enumerate(needs)]
        with b.scope(node.module):
            grads = op.vjp(b, node, gouts, asked)
            if len(grads) != len(node.inputs):
                raise CompileError(f"internal: VJP of {node.op} returned {len(grads)} grads for {len(node.inputs)} inputs")
            for k, (inp, grad, need) in enumerate(zip(node.inputs, grads, needs)):
                if need is None:
                    continue
                if grad is None:
                    raise CompileError(f"internal: VJP of {node.op} gave no gradient for input {k} ({inp})")
                if need.axis is not None and asked[k].is_full:
                    grad = b.op("slice", [grad], axis=need.axis, start=need.start, stop=need.stop, step=1)
                want_type = need.sliced_type(graph.types[inp])
                if graph.types[grad] != want_type:
                    raise CompileError(f"internal: VJP of {node.op} gave {graph.types[grad]} for input {k}, "
                                       f"expected {want_type}")
                accumulate(inp, grad)

    missing = [w for w in wants if w not in cot]
    if missing:
        raise CompileError(f"no gradient reaches {', '.join(missing)}: the loss does not depend on them")
    return {w: cot[w] for w in wants}
