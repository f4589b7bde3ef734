"""Scheme search (`pockprop search`): contribution analysis, costs and selection under a budget.

    result = search(model, (64,), SearchData.split(x, y), budget_memory=2 * 2**20)
    open("scheme.yaml", "w").write(result.yaml())     # for `pockprop compile --scheme scheme.yaml`
    print(result.table()); result.plot("search.png")

    drift = drift_probe(model, (64,), data)           # TBFT: which block to fine-tune, with energy

Modules: options (candidates, options, schemes), contribution (probes through the device runtime, the
cache), costs (memory and MAC figures from the compile report), energy (the energy model), solver
(exact multiple-choice knapsack), select (search), drift (drift_probe), result, plot. docs/search.md.
"""
from pockprop.search.contribution import FinetuneConfig, SearchData
from pockprop.search.drift import DriftResult, drift_probe
from pockprop.search.options import Option, SearchError
from pockprop.search.result import SearchResult
from pockprop.search.select import search
from pockprop.search.solver import brute_force, frontier, solve

__all__ = ["DriftResult", "FinetuneConfig", "Option", "SearchData", "SearchError", "SearchResult", "brute_force",
           "drift_probe", "frontier", "search", "solve"]
