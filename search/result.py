"""SearchResult: the chosen scheme with the evidence behind it (table, JSON, YAML, plot)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from pockprop.compiler.scheme import Scheme
from pockprop.search.options import Option, scheme_dict


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}B"


def human_macs(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


@dataclass
class SearchResult:
    """What `search` found. Memory figures are bytes of the `memory` metric (search/costs.py)."""

    scheme: Scheme
    options: list[Option]  # every probed option, with gain and costs over the baseline
    chosen: list[Option]
    baseline: dict[str, Any]  # the classifier-only scheme: accuracy, loss, ms, figures
    estimate: dict[str, Any]  # the chosen scheme's own compile-report figures (+ validated accuracy if run)
    budget_memory: int
    budget_ms: float | None = None
    memory: str = "training"
    metric: str = "accuracy"
    frontier: list[tuple[float, float]] = field(default_factory=list)  # (memory cost over baseline, best score)
    probes_run: int = 0  # probes fine-tuned in this call
    probes_cached: int = 0  # probes read from the cache
    rounds: int = 1  # solve/compile rounds until the compiled scheme met the budget
    seconds: float = 0.0
    model: str = ""
    budget_params: int | None = None  # trainable-parameter budget, as a count
    decision: str | None = None  # which final candidate won and why (search step 6); None without validation
    finalists: list[Any] = field(default_factory=list)  # search/finalists.Finalist, every final candidate
    lr: float | None = None  # the learning rate the winner was fine-tuned with (chosen on validation)
    probe_seconds: float = 0.0  # device-seconds of the probes run in this call
    cached_seconds: float = 0.0  # device-seconds the probes read from the cache took when they ran
    budget_time: float | None = None
    stages: dict[str, Any] = field(default_factory=dict)  # what each stage did (counts, greedy trials)

    def yaml(self) -> str:
        """The scheme as YAML for `pockprop compile --scheme` (pockprop.compiler.scheme.scheme_from_dict format)."""
        head = (f"# pockprop search: {self.model}, memory budget {human_bytes(self.budget_memory)} ({self.memory} "
                f"memory){f', {self.budget_ms:g} ms/step' if self.budget_ms else ''}"
                f"{f', {self.budget_params:,} trainable parameters' if self.budget_params is not None else ''}\n"
                f"# compiled {self.memory} memory {human_bytes(self.estimate['memory_bytes'])}, trainable "
                f"{self.estimate.get('trainable_percent', 0.0):.2f}%"
                + (f"; validation accuracy {100 * self.estimate['accuracy']:.1f}% fine-tuned with lr {self.lr:.3g}"
                   if self.lr is not None else "") + "\n")
        return head + yaml.safe_dump(scheme_dict(self.scheme), sort_keys=False)

    def table(self) -> str:
        """Every option (chosen ones marked *), then the chosen scheme's compiled figures."""
        b = self.baseline
        rows = [("", "layer", "option", "val acc", "gain", "Δloss", "memory", "bwd MACs", "ms", "rung")]
        chosen = {o.label for o in self.chosen}
        for o in self.options:
            rows.append(("*" if o.label in chosen else "", o.layer, o.name, f"{100 * o.accuracy:.1f}%",
                         f"{100 * o.gain:+.1f}", f"{o.loss_gain:+.3f}", human_bytes(o.memory_bytes),
                         human_macs(o.backward_macs), f"{o.ms:.2f}", str(o.rung)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"search over {len(self.options)} options ({self.probes_run} probed, {self.probes_cached} from cache); "
                 f"baseline (classifier only): val accuracy {100 * b['accuracy']:.1f}%, loss {b['loss']:.4f}, "
                 f"{self.memory} memory {human_bytes(b['memory_bytes'])}, {b['ms']:.2f} ms/step"]
        lines += ["  " + "  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                  for r in rows]
        e = self.estimate
        budget = (f"budget {human_bytes(self.budget_memory)}" + (f", {self.budget_ms:g} ms" if self.budget_ms else "")
                  + (f", {self.budget_params:,} trainable parameters" if self.budget_params is not None else ""))
        lines.append(f"chosen ({budget}): {', '.join(o.label for o in self.chosen) or 'nothing beyond the classifier'}")
        lines.append(f"  compiled: {self.memory} memory {human_bytes(e['memory_bytes'])} (training "
                     f"{human_bytes(e['training_bytes'])}, extra over classifier {human_bytes(e['extra_bytes'])}, "
                     f"est. peak {human_bytes(e['peak_bytes'])}); trainable {e['trainable_percent']:.2f}%; "
                     f"backward {human_macs(e['backward_macs'])} MACs")
        if not self.finalists:
            lines.append(f"  estimated gain (sum of probes) {100 * e['estimated_gain']:+.1f} points")
        else:
            lines += ["", self.finalists_table(), f"decision: {self.decision}"]
        cost = (f"probes: {self.probes_run} run ({self.probe_seconds:.1f} device-seconds), {self.probes_cached} from "
                f"cache ({self.cached_seconds:.1f} device-seconds when they ran)")
        if self.budget_time is not None:
            cost += f"; time budget {self.budget_time:g} s" + (" (spent: later probes skipped)"
                                                                if self.probe_seconds >= self.budget_time else "")
        lines.append(cost)
        return "\n".join(lines)

    def finalists_table(self) -> str:
        """The final candidates: validation accuracy at their best learning rate, costs, or why not run."""
        rows = [("", "candidate", "val acc", "val loss", "lr", "orders", "trainable", "memory", "")]
        for f in self.finalists:
            r, g = f.result or {}, f.figures
            won = f.result is not None and f.scheme.rules == self.scheme.rules and \
                f.scheme.batchnorm == self.scheme.batchnorm
            rows.append(("*" if won else "", f.label, f"{100 * r['accuracy']:.1f}%" if r else "-",
                         f"{r['loss']:.4f}" if r else "-", f"{r['lr']:.3g}" if r else "-",
                         str(r.get("orders", 1)) if r else "-",
                         f"{g.get('trainable_percent', 0.0):.2f}%",
                         human_bytes(g.get("training_bytes" if self.memory == "training" else "peak_bytes", 0)), f.why))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join(["final candidates (the recipe, each at its best learning rate on validation; the final few as the mean "
                          "of the cross-validation folds):"] +
                         ["  " + "  ".join(c.rjust(w) if 1 < i < 8 else c.ljust(w) for i, (c, w) in
                                           enumerate(zip(r, widths))).rstrip() for r in rows])

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "budget_memory": self.budget_memory, "budget_ms": self.budget_ms,
                "budget_params": self.budget_params, "decision": self.decision, "lr": self.lr,
                "finalists": [f.to_json() for f in self.finalists], "probe_seconds": self.probe_seconds, "cached_seconds": self.cached_seconds,
                "budget_time": self.budget_time, "stages": self.stages,
                "memory": self.memory, "metric": self.metric, "scheme": scheme_dict(self.scheme),
                "chosen": [o.label for o in self.chosen], "options": [o.to_json() for o in self.options],
                "baseline": self.baseline, "estimate": self.estimate,
                "frontier": [{"memory_bytes": c, "score": g} for c, g in self.frontier],
                "probes_run": self.probes_run, "probes_cached": self.probes_cached, "rounds": self.rounds,
                "seconds": self.seconds}

    def plot(self, path: str) -> str:
        """Validation gain vs memory, the frontier, the chosen point and the budget, as a PNG (needs matplotlib)."""
        from pockprop.search.plot import plot_search

        return plot_search(self, path)
