"""Scheme search (`pockprop search`): contribution analysis, costs and selection under a budget.

    result = search(model, (64,), SearchData.split(x, y), budget_memory=2 * 2**20)
    open("scheme.yaml", "w").write(result.yaml())     # for `pockprop compile --scheme scheme.yaml`
    print(result.table()); result.plot("search.png")

    drift = drift_probe(model, (64,), data)           # TBFT: which block to fine-tune, with energy

Modules: options (candidates, options, schemes), contribution (probes through the device runtime, the
cache, the device-seconds clock), costs (memory and MAC figures from the compile report), energy (the energy
model), solver (exact multiple-choice knapsack), select (search), finalists (successive halving, greedy
selection, the final decision among presets and searched sets), drift (drift_probe), result, plot.
docs/search.md.
"""
from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use (PEP 562): `pockprop.search.cli` builds its parser without importing torch.
_LAZY = {"FinetuneConfig": "contribution", "SearchData": "contribution", "DriftResult": "drift", "drift_probe": "drift",
         "Option": "options", "SearchError": "options", "SearchResult": "result", "search": "select",
         "brute_force": "solver", "frontier": "solver", "solve": "solver"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
