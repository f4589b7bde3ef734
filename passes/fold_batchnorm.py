"""Fold a frozen BatchNorm into the frozen conv (or linear) that feeds it.

Rewrite: y = batch_norm(conv2d(x, W, b), gamma, beta, mean, var; eps)  ->  y = conv2d(x, W', b') with
    s  = gamma / sqrt(var + eps)             (gamma absent: 1)
    W' = W * s[:, None, None, None]          (linear: W * s[:, None])
    b' = (b - mean) * s + beta               (b absent: 0, beta absent: 0)
when W, b, gamma, beta, mean and var are all compile-time constants and the BatchNorm is the conv's
only user. The folded node keeps the conv's attributes, module and phase and takes the BatchNorm's
output name, so nothing downstream changes. `linear` + 1-d batch_norm over (N, C) folds the same way.

Run it on the forward graph before autodiff: a trainable weight or BatchNorm affine is a graph
input there, not a constant, so only fully frozen pairs fold, and the step's semantics (including
the gradient that flows *through* a frozen conv+BN to a trainable layer below) are exactly kept.
Folding is done in float64 and cast back, so results match the unfolded graph to ~1e-6 relative.
"""
from __future__ import annotations

import numpy as np

from pockprop.ir import Graph, Node
from pockprop.ops import get_op
from pockprop.passes.base import PassResult, drop_unused_constants, is_constant


def _const_or_absent(graph: Graph, value: str | None) -> bool:
    return value is None or is_constant(graph, value)


def _fold(graph: Graph, prod: Node, bn: Node) -> Node:
    """The producer with the BN folded in: new constants are added to `graph`, nothing is removed."""
    w_name, b_name = prod.inputs[1], (*prod.inputs, None)[2]
    assert w_name is not None
    _, gamma, beta, mean, var = bn.inputs
    w = graph.constants[w_name]
    out_axis = 1 if prod.attrs.get("weight_in_out") else 0  # a linear weight stored (in, out)
    c_out = w.shape[out_axis]

    def f64(v: str | None, default: float) -> np.ndarray:
        return np.full(c_out, default) if v is None else graph.constants[v].astype(np.float64)

    s = f64(gamma, 1.0) / np.sqrt(f64(var, 0.0) + float(bn.attrs["eps"]))
    s_shape = [1] * w.ndim
    s_shape[out_axis] = c_out
    new_w = (w.astype(np.float64) * s.reshape(s_shape)).astype(w.dtype)
    new_b = ((f64(b_name, 0.0) - f64(mean, 0.0)) * s + f64(beta, 0.0)).astype(w.dtype)
    # fresh names: the original weight may be read elsewhere (tied weights) and must stay intact
    w2 = graph.add_constant(new_w, hint=f"{w_name}.bn_folded")
    b2 = graph.add_constant(new_b, hint=f"{b_name or bn.module or w_name}.bn_folded_bias")
    return prod.replace(inputs=(prod.inputs[0], w2, b2), outputs=bn.outputs)


def fold_frozen_batchnorm(graph: Graph) -> PassResult:
    out = graph.copy()
    replace: dict[Node, Node] = {}  # producer node -> folded node
    drop: set[Node] = set()  # folded BatchNorm nodes
    touched: set[str] = set()
    for bn in out.nodes:
        if bn.op != "batch_norm":
            continue
        x, gamma, beta, mean, var = bn.inputs
        prod = out.producer(x) if x is not None else None
        rank = get_op(prod.op).bn_fold_rank if prod is not None else None
        if prod is None or rank is None or prod in replace:
            continue
        if out.types[x].rank != rank or len(prod.outputs) != 1:
            continue
        # the pre-BN value must vanish: no other reader, not returned
        if len(out.uses(x)) != 1 or x in out.outputs:
            continue
        params = [prod.inputs[1], (*prod.inputs, None)[2], gamma, beta, mean, var]
        if prod.inputs[1] is None or not all(_const_or_absent(out, v) for v in params):
            continue
        replace[prod] = _fold(out, prod, bn)
        drop.add(bn)
        touched.update(v for v in params if v is not None)
        del out.types[x]
    if not replace:
        return PassResult(out, False)
    # the folded node sits where the producer was: x is defined there, and the BN output's readers
    # all come after the BN, hence after the producer
    out.nodes = [replace.get(n, n) for n in out.nodes if n not in drop]
    drop_unused_constants(out, touched)
    return PassResult(out, True)
