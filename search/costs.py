"""What a compiled scheme costs, from its compile report (compiler/report.py) and its training graph.

Memory. The search's default memory figure is the **training memory**: what training adds on top of
running inference, estimated from the optimized training graph as

    training_bytes = trainable bytes            (the updated parameters or slices, fp32)
                   + gradient bytes             (one gradient per trainable tensor, the same size)
                   + optimizer state bytes      (SGD momentum: 1x, AdamW: 2x the trainable bytes)
                   + kept activation bytes      (activations the backward pass reads; passes/memory_plan.py)

It grows with every option (it is nearly additive over layers), which makes it a good knapsack cost;
the classifier head's share is in it, so the budget bounds the whole scheme. `memory="peak"` uses the
memory planner's estimated peak of the training step instead (peak_bytes: everything live at the
worst moment, weights-as-constants excluded); the peak is dominated by the forward pass and moves
little and non-additively with small options, so it is the stricter but noisier choice.

MACs come from the same report (forward and backward totals). `bytes_moved` is the traffic model of
search/energy.py. All figures are per training step at the compiled batch size.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pockprop.passes.base import nbytes

from pockprop.compiler.artifact import Artifact
from pockprop.compiler.report import summarize
from pockprop.search.energy import bytes_moved, energy

MEMORY_METRICS = ("training", "peak")


def figures(art: Artifact) -> dict[str, Any]:
    """One compiled scheme's costs (JSON-able numbers)."""
    s = summarize(art)
    params, optim = art.state_bytes()
    g = art.train_graph
    assert g is not None
    moved = bytes_moved(g)
    macs = int(s["forward_macs"] + s["backward_macs"])
    return {
        "trainable_params": int(s["trainable_params"]),
        "total_params": int(s["total_params"]),
        "trainable_percent": float(s["trainable_percent"]),
        "param_bytes": params,
        "gradient_bytes": params,
        "optimizer_bytes": optim,
        "kept_bytes": int(s["kept_bytes"]),
        "training_bytes": int(2 * params + optim + s["kept_bytes"]),
        "peak_bytes": int(s["peak_bytes"]),
        "forward_macs": int(s["forward_macs"]),
        "backward_macs": int(s["backward_macs"]),
        "bytes_moved": int(moved),
        "energy": energy(macs, moved),
        "input_bytes": int(sum(nbytes(t) for _, t in art.data_inputs)),
    }


def memory_of(fig: dict[str, Any], memory: str) -> int:
    """The figure the memory budget bounds: training_bytes or peak_bytes."""
    if memory not in MEMORY_METRICS:
        raise ValueError(f"memory metric {memory!r}: use one of {', '.join(MEMORY_METRICS)}")
    return int(fig["training_bytes" if memory == "training" else "peak_bytes"])


def difference(fig: dict[str, Any], base: dict[str, Any], memory: str) -> dict[str, float]:
    """An option's cost over the baseline; negative differences (the peak can fall) count as 0."""
    return {"memory_bytes": float(max(0, memory_of(fig, memory) - memory_of(base, memory))),
            "backward_macs": int(max(0, fig["backward_macs"] - base["backward_macs"]))}


def median_ms(times: list[float], skip: int = 2) -> float:
    """Median step time in ms, skipping the first `skip` steps (session warm-up) when there are more."""
    t = times[skip:] if len(times) > skip + 2 else times
    return float(np.median(t) * 1e3) if t else 0.0
