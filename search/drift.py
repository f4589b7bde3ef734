"""Drift probe (TBFT): which third of the model to fine-tune for the drift at hand.

TBFT (block-wise fine-tuning under drift) fine-tunes the front blocks for input-level drift (new
sensor, lighting, noise), the middle for feature-level drift and the rear for output-level drift
(new label mapping, class priors). `drift_probe` does not guess the kind of drift: it compiles the
presets tbft-front / tbft-middle / tbft-rear (compiler/scheme.py; each with the head) and the
classifier baseline from one trace, fine-tunes each through the device runtime with the same data order
(search/contribution.py) and the deployment recipe (`recipe`; default: the probe config 5 times as long,
cosine) at every rate of a small grid, keeping each scheme's best rate on validation (a short probe at one
rate favours the rear: earlier blocks need more steps and larger rates before their change pays off), then
runs each block at its rate on the other cross-validation folds of the same samples (contribution.confirm:
`orders` of them, None for all, so that every sample is validated once) and scores it by the mean (one
split and batch order is a noisy judge on a small validation set), in
each batch-norm mode asked for ("both", the default: frozen and train, every block scored against the frozen
classifier), and picks the block with the best score over the classifier, the same score `search` maximizes (metric "accuracy": the accuracy gain, the validation
loss breaking ties; or "loss"); remaining ties go to the lower energy per step, then the earlier
preset in front/middle/rear order. Each scheme's energy per training step is estimated from its MACs and bytes
moved (search/energy.py, constants documented there).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from pockprop.search.contribution import FinetuneConfig, SearchData, confirm, margin, margin_text, probe_lrs, score
from pockprop.search.energy import E_BYTE, E_MAC, SOURCE
from pockprop.search.options import mode_label
from pockprop.search.result import human_bytes, human_macs
from pockprop.search.select import ProbeProgress, modes_of, prepare, recipe_of

BLOCKS = ("front", "middle", "rear")
SCHEMES = ("classifier",) + tuple(f"tbft-{b}" for b in BLOCKS)


@dataclass
class DriftResult:
    block: str  # "front" | "middle" | "rear"
    gains: dict[str, float]  # tbft-* scheme -> validation accuracy gain over the classifier
    accuracy: dict[str, float]  # every probed scheme (classifier included) -> validation accuracy
    energy: dict[str, dict[str, Any]]  # scheme -> {"joules", "mac_joules", "memory_joules", "macs", "bytes"} per step
    loss: dict[str, float] = field(default_factory=dict)
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)  # scheme -> compile-report figures
    ms: dict[str, float] = field(default_factory=dict)  # scheme -> measured median ms per step
    probes_run: int = 0
    probes_cached: int = 0
    seconds: float = 0.0
    batchnorm: str = "frozen"  # the chosen block's batch-norm mode
    lr: dict[str, float] = field(default_factory=dict)  # scheme -> the learning rate chosen on validation
    probe_seconds: float = 0.0  # device-seconds of the probes run in this call
    cached_seconds: float = 0.0  # device-seconds the probes read from the cache took when they ran
    margin: str = ""  # the chosen block against the next one, fold by fold (contribution.margin_text)

    @property
    def scheme(self) -> str:
        return f"tbft-{self.block}"

    @property
    def chosen(self) -> str:
        """The chosen key of the dicts: the preset, with " +bn" in train mode."""
        return mode_label(self.scheme, self.batchnorm)

    def table(self) -> str:
        rows = [("scheme", "val acc", "gain", "val loss", "lr", "trainable", "bwd MACs", "bytes moved", "energy/step",
                 "ms")]
        for s in self.accuracy:
            f, e = self.figures.get(s, {}), self.energy[s]
            rows.append((s + (" *" if s == self.chosen else ""), f"{100 * self.accuracy[s]:.1f}%",
                         f"{100 * self.gains[s]:+.1f}" if s in self.gains else "-", f"{self.loss.get(s, 0.0):.4f}",
                         f"{self.lr[s]:.3g}" if s in self.lr else "-",
                         f"{f.get('trainable_percent', 0.0):.1f}%", human_macs(f.get("backward_macs", 0)),
                         human_bytes(e["bytes"]), f"{e['joules'] * 1e3:.3f} mJ", f"{self.ms.get(s, 0.0):.2f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"drift probe ({self.probes_run} probed in {self.probe_seconds:.1f} device-seconds, "
                 f"{self.probes_cached} from cache): fine-tune the {self.block} block ({self.chosen})"
                 + (f"; {self.margin}" if self.margin else "")]
        lines += ["  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                  for r in rows]
        lines.append(f"  energy = MACs x {E_MAC * 1e12:.1f} pJ + bytes moved x {E_BYTE * 1e12:.0f} pJ ({SOURCE})")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"block": self.block, "scheme": self.scheme, "batchnorm": self.batchnorm, "lr": self.lr,
                "probe_seconds": self.probe_seconds, "cached_seconds": self.cached_seconds, "margin": self.margin,
                "gains": self.gains, "accuracy": self.accuracy,
                "loss": self.loss, "energy": self.energy, "figures": self.figures, "ms": self.ms,
                "constants": {"e_mac_joules": E_MAC, "e_byte_joules": E_BYTE, "source": SOURCE},
                "probes_run": self.probes_run, "probes_cached": self.probes_cached, "seconds": self.seconds}


def drift_probe(model: torch.nn.Module, input_shape: Sequence[int], data: SearchData, *,
                config: FinetuneConfig | None = None, progress: bool = True, cache_dir: str | None = None,
                loss: str = "cross_entropy", preprocess: dict[str, Any] | None = None,
                traced: Any = None, metric: str = "accuracy", recipe: FinetuneConfig | None = None,
                lrs: Sequence[float] | None = None, batchnorm: str = "both",
                budget_time: float | None = None, orders: int | None = None) -> DriftResult:
    """Probe tbft-front/middle/rear against the classifier and choose the block (module docstring)."""
    t0 = time.perf_counter()
    config = config or FinetuneConfig()
    score(0.0, 0.0, 1, metric)  # validates the metric
    tm, cache = prepare(model, input_shape, data, config, traced, loss, cache_dir, budget_time)
    modes = modes_of(batchnorm, tm)
    recipe, grid = recipe_of(config, recipe, lrs)
    bar = ProbeProgress(len(SCHEMES) * len(modes), "drift ", enabled=progress)
    results: dict[str, dict[str, Any]] = {}
    for m, mode in enumerate(modes):
        for i, s in enumerate(SCHEMES):
            bar.update(m * len(SCHEMES) + i, f"{s} ({mode} batch norm)", force=i == 0)
            kw = dict(loss=loss, preprocess=preprocess, what=s, batchnorm=mode)
            r = probe_lrs(tm, s, data, recipe, grid, cache, metric=metric, **kw)
            if cache.time_left:  # each scheme's standing from the folds
                r = confirm(tm, s, data, recipe, r, orders, cache, **kw)
            results[mode_label(s, mode)] = r
    bar.update(bar.total, "done")
    bar.close()
    acc = {s: r["accuracy"] for s, r in results.items()}
    base = {mode: results[mode_label("classifier", mode)] for mode in modes}
    blocks = [mode_label(s, mode) for mode in modes for s in SCHEMES[1:]]
    mode_of = {mode_label(s, mode): mode for mode in modes for s in SCHEMES}
    gains = {s: acc[s] - base[mode_of[s]]["accuracy"] for s in blocks}
    energy = {s: r["figures"]["energy"] for s, r in results.items()}
    # every block against the same reference (the first mode's classifier), so that modes compare
    ref = base[modes[0]]
    scores = {s: score(acc[s] - ref["accuracy"], ref["loss"] - results[s]["loss"], len(data.y_val), metric)
              for s in blocks}
    order = sorted(blocks, key=lambda s: (scores[s], -energy[s]["joules"], -blocks.index(s)), reverse=True)
    best = order[0]
    close = margin_text(order[1], margin(results[best], results[order[1]])) \
        if len(order) > 1 and metric == "accuracy" else ""  # the margin is in accuracy points
    return DriftResult(best.split(" ")[0].removeprefix("tbft-"), gains, acc, energy,
                       {s: r["loss"] for s, r in results.items()},
                       {s: {k: v for k, v in r["figures"].items() if k != "energy"} for s, r in results.items()},
                       {s: r["ms"] for s, r in results.items()}, cache.runs, cache.hits, time.perf_counter() - t0,
                       batchnorm=mode_of[best], lr={s: r["lr"] for s, r in results.items()},
                       probe_seconds=cache.seconds, cached_seconds=cache.saved, margin=close)
