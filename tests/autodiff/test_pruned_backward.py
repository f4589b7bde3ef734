"""The emitted graph of a partly frozen model holds no gradient work below the earliest trainable layer.

Asserted on the graph (node names carry module path and phase), not on timing.
"""
from __future__ import annotations

import pytest

from pockprop.compiler.compile import compile
from tests.compiler.zoo_cases import CASES, IDS, ZooCase, batch, build


def _module_order(model) -> list[str]:  # type: ignore[no-untyped-def]
    return [n for n, _ in model.named_modules() if n]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_no_backward_below_earliest_trainable_layer(case: ZooCase) -> None:
    model = build(case)
    x, y = batch(case, 0)
    art = compile(model, (x,), labels=y, optimizer={"name": "sgd", "lr": 0.1}, trainable=list(case.partial))
    order = _module_order(model)
    first = order.index(case.earliest)
    below = {m for m in order[:first] if not case.earliest.startswith(m + ".")}  # exclude its ancestors

    backward = [n.name for n in art.train_model.graph.node if "/backward/" in n.name]
    assert backward, "a partly frozen model still has a backward graph"
    offending = [n for n in backward if n.split("/backward/")[0] in below]
    assert not offending, f"gradient nodes below {case.earliest}: {offending[:5]}"
    # ...and the earliest trainable layer computes no input gradient: no backward node of that layer
    # reads its weight (dx = g W needs W; dW and db need only the activation and the cotangent).
    layer = _first_layer(model, case.earliest)
    weight = f"{layer}.weight"
    assert art.train_graph is not None
    readers = [n for n in art.train_graph.nodes if n.phase == "backward" and weight in n.inputs]
    assert not readers, f"input gradient of the earliest trainable layer {layer}: {readers}"


def _first_layer(model, prefix: str) -> str:  # type: ignore[no-untyped-def]
    import torch

    for name, m in model.named_modules():
        if (name == prefix or name.startswith(prefix + ".")) and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            return name
    raise AssertionError(f"no conv/linear under {prefix}")
