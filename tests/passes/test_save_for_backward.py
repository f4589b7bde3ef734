"""save_small_for_backward: masks and weight-gradient slices move into the forward pass."""
from __future__ import annotations

import numpy as np
import torch

from pockprop.compiler.compile import compile
from pockprop.emit.onnx import to_onnx
from pockprop.autodiff.gradcheck import run_onnx
from pockprop.compiler.scheme import Rule, Scheme
from pockprop.passes import plan_memory
from pockprop.passes.save_for_backward import save_small_for_backward


def _art():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4))
    scheme = Scheme("t", (Rule("2", "weight", 0.25), Rule("4", "full")))
    return compile(model, (torch.randn(4, 8),), optimizer={"name": "sgd", "lr": 0.1}, scheme=scheme,
                   optimize=False)


def test_masks_and_slices_move_to_forward_and_shrink_what_backward_keeps() -> None:
    g = _art().train_graph
    res = save_small_for_backward(g)
    assert res.changed
    moved = [n for n in res.graph.nodes if n.op in ("slice", "range_mask")]
    assert moved and all(n.phase == "forward" for n in moved)
    first_backward = next(i for i, n in enumerate(res.graph.nodes) if n.phase == "backward")
    assert all(res.graph.nodes.index(n) < first_backward for n in moved)
    res.graph.verify()
    # the activation feeding layer 2 (32 wide) is no longer read by backward: only its 8-wide slice is
    before, after = plan_memory(g), plan_memory(res.graph)
    assert after.kept_for_backward_bytes < before.kept_for_backward_bytes
    assert not save_small_for_backward(res.graph).changed


def test_numerics_unchanged() -> None:
    art = _art()
    g = art.train_graph
    rng = np.random.default_rng(0)
    (data,) = [n for n, _ in art.data_inputs]
    feeds = {data: rng.standard_normal((4, 8)).astype(np.float32), "labels": np.array([0, 1, 2, 3]),
             "lr": np.array(0.1, np.float32)}
    feeds.update(art.initial_state())
    before = run_onnx(to_onnx(g), feeds)
    after = run_onnx(to_onnx(save_small_for_backward(g).graph), feeds)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
