"""BatchNorm in training mode: batch statistics in the step, running statistics as updated state.

pockprop traces a model in eval form, where batch norm is a per-channel affine map with frozen statistics.
`compile(..., batchnorm="train")` trains as PyTorch's `model.train()` does instead: every batch norm of the
training step normalizes with its batch's mean and (biased) variance over every axis but the channels, built
from primitive ops (mean, sub, mul, rsqrt), so autodiff takes the gradient through the statistics with the
rules it already checks; and its running statistics become state (contract StateRole.STATISTIC) that the step
returns updated as torch does: r <- (1 - momentum) r + momentum s, the variance unbiased (n / (n - 1)). No
gradient reaches them: nothing on the loss's path reads the updates. The inference graph keeps eval-form
batch norm and reads the running statistics as inputs, which the runtime feeds from the state.

What stays true: with batchnorm="frozen" (the default) nothing here runs, and artifacts are as before.
"""
from __future__ import annotations

from dataclasses import dataclass

from pockprop.errors import CompileError
from pockprop.ir import Graph, Node, Role
from pockprop.ops.builder import Builder

MODES = ("frozen", "train")


@dataclass(frozen=True)
class Statistic:
    """A running statistic of a batch norm: the state tensor `name` (the model's buffer) and the value of the
    training step that holds its update."""

    name: str
    updated: str


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise CompileError(f"batchnorm must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def statistics(graph: Graph) -> list[str]:
    """The running statistics that train_mode makes state, in order."""
    return [v for n in graph.nodes if n.op == "batch_norm" for v in n.inputs[3:5] if v in graph.constants]


def _channel_view(b: Builder, v: str, rank: int) -> str:
    return b.op("reshape", [v], shape=[1, b.type(v).shape[0]] + [1] * (rank - 2))


def train_mode(graph: Graph) -> tuple[Graph, list[Statistic]]:
    """`graph` (changed and returned) with every batch norm in training mode (see the module doc), its
    running statistics lifted to graph inputs; the statistics and the values of their updates, in order."""
    nodes = list(graph.nodes)
    graph.nodes = []
    stats: list[Statistic] = []
    for node in nodes:
        if node.op != "batch_norm":
            graph.append(node)
            continue
        x, w, bias, mean, var = node.inputs
        where = node.module or "a batch norm"
        if mean not in graph.constants or var not in graph.constants:
            raise CompileError(f"{where}: batchnorm='train' needs the running statistics as buffers")
        momentum = float(node.attrs.get("momentum", 0.1))
        if momentum <= 0.0:
            raise CompileError(f"{where}: BatchNorm with momentum=None (a cumulative average) is not supported "
                               "in train mode; give it a momentum")
        t = graph.types[x]
        rank, channels = t.rank, t.shape[1]
        axes = [0] + list(range(2, rank))
        n = t.numel // channels
        if n < 2:
            raise CompileError(f"{where}: train-mode batch norm needs more than one value per channel (input {t})")
        b = Builder(graph, node.module, node.phase)
        mu = b.op("mean", [x], axes=axes, keepdim=True, hint="bn_batch_mean")
        centered = b.op("sub", [x, mu], hint="bn_centered")
        sigma2 = b.op("mean", [b.op("mul", [centered, centered])], axes=axes, keepdim=True, hint="bn_batch_var")
        inv = b.op("rsqrt", [b.op("add", [sigma2, b.scalar_like(float(node.attrs["eps"]), sigma2)])], hint="bn_invstd")
        scale = inv if w is None else b.op("mul", [inv, _channel_view(b, w, rank)])
        y = node.outputs[0]
        if bias is None:
            graph.append(Node("mul", (centered, scale), (y,), {}, node.module, node.phase))
        else:
            scaled = b.op("mul", [centered, scale])
            graph.append(Node("add", (scaled, _channel_view(b, bias, rank)), (y,), {}, node.module, node.phase))
        # the running statistics, as torch updates them (nothing on the loss's path reads these)
        for buffer, batch, factor in ((mean, mu, 1.0), (var, sigma2, n / (n - 1))):
            flat = b.op("reshape", [batch], shape=[channels])
            if factor != 1.0:
                flat = b.op("mul", [flat, b.scalar_like(factor, flat)])
            kept = b.op("mul", [buffer, b.scalar_like(1.0 - momentum, buffer)])
            new = b.op("add", [kept, b.op("mul", [flat, b.scalar_like(momentum, flat)])], hint=f"{buffer}.updated")
            stats.append(Statistic(buffer, new))
    for s in stats:
        graph.lift(s.name, Role.OPTIMIZER_STATE)  # state the step updates; not trained
    graph.outputs = graph.outputs[:1] + [s.updated for s in stats]  # kept alive by the forward passes
    return graph, stats
