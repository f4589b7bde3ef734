"""Memory planner: exact lifetimes and breakdown on a hand-built step, and sanity on compiled ones."""
from __future__ import annotations

import numpy as np
import torch

from pockprop.compiler.compile import compile
from pockprop.ops.builder import Builder
from pockprop.ir import Graph, Role, TensorType
from pockprop.passes import plan_memory

F4 = TensorType((4,), "float32")


def _step() -> Graph:
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", F4)
    w = g.add_input("w", F4, Role.PARAMETER)
    g.param_names["w"] = "w"
    m = g.add_input("optimizer.momentum.w", F4, Role.OPTIMIZER_STATE)
    lr = g.add_input("lr", TensorType((), "float32"), Role.HYPERPARAMETER)
    a = b.op("mul", [x, w], hint="a")                                      # 0
    t = b.op("relu", [a], hint="t")                                        # 1
    with b.scope("loss", phase="loss"):
        loss = b.op("sum", [t], axes=[0], keepdim=False, hint="loss")      # 2
    with b.scope("", phase="backward"):
        grad = b.op("mul", [a, b.const(2.0, hint="two")], hint="g")       # 3
    with b.scope("optimizer/w", phase="optimizer"):
        nm = b.op("add", [m, grad], hint="new/optimizer.momentum.w")       # 4
        u = b.op("mul", [nm, lr], hint="u")                                # 5
        nw = b.op("sub", [w, u], hint="new/w")                             # 6
    g.roles |= {nm: Role.OPTIMIZER_STATE, nw: Role.PARAMETER}  # what the step returns as updated state
    g.outputs = [loss, nw, nm]
    g.verify()
    return g


def test_lifetimes_peak_and_breakdown() -> None:
    g = _step()
    plan = plan_memory(g)
    assert "new/optimizer.momentum.w" in g.outputs
    assert plan.lifetimes["x"] == (0, 0) and plan.lifetimes["w"] == (0, 6)
    assert plan.lifetimes["a"] == (0, 3) and plan.lifetimes["loss"] == (2, 6)
    assert plan.live_bytes == [68, 68, 72, 72, 72, 56, 68]
    assert (plan.peak_bytes, plan.peak_node) == (72, 2)
    assert plan.breakdown == {"activations_kept": 16, "gradients": 0, "optimizer_state": 16, "parameters": 16,
                              "data": 4, "workspace": 20}  # workspace: t and loss
    assert plan.kept_for_backward_bytes == 16  # `a`, read by the gradient node
    assert plan.constant_bytes == 4


def test_breakdown_at_a_later_node() -> None:
    g = _step()
    g.replace_node(g.nodes[1], g.nodes[1].replace(inputs=["x"]))  # t = relu(x): x now lives to node 1
    plan = plan_memory(g)
    assert sum(plan.breakdown.values()) == plan.peak_bytes


def _mlp_plan(trainable):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    art = compile(model, (torch.randn(128, 32),), optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
                  trainable=trainable, optimize=False)
    return art.train_graph, plan_memory(art.train_graph)


def test_compiled_steps_full_vs_last_layer() -> None:
    g_full, full = _mlp_plan(None)
    g_last, last = _mlp_plan(["4.*"])
    for g, plan in ((g_full, full), (g_last, last)):
        assert sum(plan.breakdown.values()) == plan.peak_bytes == max(plan.live_bytes)
        assert plan.breakdown["parameters"] > 0 and plan.breakdown["optimizer_state"] > 0
    # training the last layer keeps what its weight gradient reads (the last relu output) and the
    # logits the loss gradient reads; full training also keeps the first relu output (the input x
    # is `data`, alive anyway)
    assert last.kept_for_backward_bytes == (128 * 64 + 128 * 10) * 4
    assert full.kept_for_backward_bytes == (2 * 128 * 64 + 128 * 10) * 4
    assert last.peak_bytes < full.peak_bytes
    # frozen layers are constants: counted as weights, not in the peak
    frozen = (32 * 64 + 64 + 64 * 64 + 64) * 4
    assert last.constant_bytes >= frozen > full.constant_bytes
    assert np.all(np.array(full.live_bytes) >= 0)
