"""The search plot: validation gain vs memory cost, with the knapsack frontier, the budget and the choice.

x: the scheme's memory (MB of the search's memory metric: the classifier baseline plus the option's
cost); y: validation accuracy gain over the classifier baseline, in points. Every probed option is a
point; the frontier is the best summed score reachable at each memory (a step line, from the
solver's Pareto states); the budget is a vertical line; the chosen scheme is a star at its compiled
memory and its estimated gain. Needs matplotlib (`pip install 'pockprop[plot]'`); Agg backend, no display.
"""
from __future__ import annotations

from typing import Any

from pockprop.runtime.plot import pyplot


def plot_search(result: Any, path: str) -> str:
    """Write the PNG to `path`; returns it."""
    plt = pyplot()
    mb = 2.0 ** 20
    base = result.baseline["memory_bytes"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    kinds = {"bias": ("o", "tab:blue"), "weight": ("s", "tab:orange")}
    for kind, (marker, color) in kinds.items():
        pts = [o for o in result.options if o.update == kind]
        if pts:
            ax.scatter([(base + o.memory_bytes) / mb for o in pts], [100 * o.gain for o in pts], marker=marker,
                       color=color, alpha=0.7, s=28, label=f"{kind} options" if kind == "bias" else "weight@r options")
    if result.frontier:
        xs = [(base + c) / mb for c, _ in result.frontier]
        ys = [100 * g for _, g in result.frontier]
        ax.step(xs + [max(xs[-1], result.budget_memory / mb) * 1.05], ys + [ys[-1]], where="post", color="tab:green",
                lw=1.5, label="frontier (best summed score)")
    ax.axvline(result.budget_memory / mb, color="tab:red", ls="--", lw=1.2,
               label=f"budget {result.budget_memory / mb:.3g} MB")
    est = result.estimate
    ax.scatter([est["memory_bytes"] / mb], [100 * est["estimated_gain"]], marker="*", s=220, color="black", zorder=5,
               label=f"chosen ({len(result.chosen)} options)")
    if "gain" in est:
        ax.scatter([est["memory_bytes"] / mb], [100 * est["gain"]], marker="x", s=60, color="black", zorder=5,
                   label="chosen, fine-tuned together")
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_xlabel(f"{result.memory} memory of the scheme (MB)")
    ax.set_ylabel("validation accuracy gain over classifier (points)")
    ax.set_title(f"pockprop search: {result.model}")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
