"""Update reordering on a compiled 3-layer MLP: updates move up, numerics and validity are kept,
the planned peak never rises."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pockprop.compiler.compile import compile
from pockprop.emit.onnx import to_onnx
from pockprop.autodiff.gradcheck import run_onnx
from pockprop.ir import Graph
from pockprop.passes import plan_memory, reorder_updates

LAYERS = ["0", "2", "4"]  # the Linear modules, first to last
OPT = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}


def _mlp_step(batch: int, opt: dict = OPT):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    x = torch.randn(batch, 32)
    art = compile(model, (x,), optimizer=opt, optimize=False)
    feeds = {art.data_inputs[0][0]: x.numpy(), "labels": np.arange(batch) % 10, "lr": np.array(0.1, np.float32)}
    feeds |= {s.input: s.initial for s in art.state}
    if "optimizer.step" in art.train_graph.inputs:
        feeds["optimizer.step"] = np.array(0, np.float32)
    return art.train_graph, feeds


@pytest.fixture(scope="module")
def step() -> tuple[Graph, dict]:
    return _mlp_step(batch=256)  # activations outweigh the weights: every update moves up


def _where(g: Graph) -> tuple[dict[str, int], dict[str, int]]:
    """Last optimizer node index per layer, first backward node index per layer."""
    last_update: dict[str, int] = {}
    first_backward: dict[str, int] = {}
    for k, n in enumerate(g.nodes):
        if n.phase == "optimizer":
            layer = n.module.removeprefix("optimizer/").split(".")[0]
            last_update[layer] = k
        elif n.phase == "backward":
            first_backward.setdefault(n.module.split(".")[0], k)
    return last_update, first_backward


def test_updates_come_before_backward_of_earlier_layers(step) -> None:  # type: ignore[no-untyped-def]
    g, _ = step
    res = reorder_updates(g)
    assert res.changed
    res.graph.verify()
    last_update, first_backward = _where(res.graph)
    for i, layer in enumerate(LAYERS):
        for earlier in LAYERS[:i]:
            assert last_update[layer] < first_backward[earlier], (layer, earlier)
    # nothing else moved: non-optimizer nodes keep their relative order
    def rest(gr: Graph) -> list[list[str]]:
        return [n.outputs for n in gr.nodes if n.phase != "optimizer"]

    assert rest(res.graph) == rest(g)
    assert min(_where(g)[0].values()) > max(k for k, n in enumerate(g.nodes) if n.phase == "backward"), \
        "before: all updates after the whole backward pass"
    assert len(g.nodes) == len(res.graph.nodes) and not reorder_updates(res.graph).changed


def test_input_only_update_nodes_sink_to_their_reader(step) -> None:  # type: ignore[no-untyped-def]
    g, _ = step
    out = reorder_updates(g).graph
    produced_by_nodes = {o for n in out.nodes for o in n.outputs}
    first_backward = min(k for k, n in enumerate(out.nodes) if n.phase == "backward")
    sunk = 0
    for k, n in enumerate(out.nodes):
        if n.phase == "optimizer" and not any(i in produced_by_nodes for i in n.inputs):
            # `p * wd`, `buf * mu`: right before the update that reads them, not at the start
            reader = min(j for j, m in enumerate(out.nodes) if n.outputs[0] in m.inputs)
            assert all(m.phase == "optimizer" for m in out.nodes[k:reader]), n
            assert k > first_backward, n
            sunk += 1
    assert sunk == 12, "weight decay and momentum products of 6 tensors"


def test_reorder_keeps_numerics_and_lowers_peak(step) -> None:  # type: ignore[no-untyped-def]
    g, feeds = step
    out = reorder_updates(g).graph
    for a, w in zip(run_onnx(to_onnx(out), feeds), run_onnx(to_onnx(g), feeds)):
        np.testing.assert_array_equal(a, w)
    before, after = plan_memory(g), plan_memory(out)
    assert after.peak_bytes <= before.peak_bytes
    # gradients no longer pile up until the end of the step
    assert _max_gradient_bytes(out) < _max_gradient_bytes(g)


def _max_gradient_bytes(g: Graph) -> int:
    from pockprop.passes.memory_plan import categorize

    plan, cat = plan_memory(g), categorize(g)
    live = [0] * (len(g.nodes) + 1)
    for v, (a, b) in plan.lifetimes.items():
        if cat.get(v) == "gradients":
            for k in range(a, b + 1):
                live[k] += g.types[v].numel * 4
    return max(live)


@pytest.mark.parametrize("batch", [4, 64])
@pytest.mark.parametrize("opt", [OPT, {"name": "sgd", "lr": 0.1}, {"name": "adamw", "lr": 1e-3}],
                         ids=["sgd-momentum-wd", "sgd", "adamw"])
def test_peak_never_rises_when_weights_dominate(opt, batch) -> None:  # type: ignore[no-untyped-def]
    # small batches: the weights outweigh the activations, and updating a large layer early would
    # briefly hold old and new weights while backward values are alive; the guard defers such updates
    g, feeds = _mlp_step(batch=batch, opt=opt)
    out = reorder_updates(g).graph
    out.verify()
    assert plan_memory(out).peak_bytes <= plan_memory(g).peak_bytes
    for a, w in zip(run_onnx(to_onnx(out), feeds), run_onnx(to_onnx(g), feeds)):
        np.testing.assert_array_equal(a, w)
