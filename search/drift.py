"""Drift probe (TBFT): which third of the model to fine-tune for the drift at hand.

TBFT (block-wise fine-tuning under drift) fine-tunes the front blocks for input-level drift (new
sensor, lighting, noise), the middle for feature-level drift and the rear for output-level drift
(new label mapping, class priors). `drift_probe` does not guess the kind of drift: it compiles the
presets tbft-front / tbft-middle / tbft-rear (compiler/scheme.py; each with the head) and the
classifier baseline from one trace, fine-tunes each briefly through the device runtime with the same
data order (search/contribution.py), and picks the block with the best score over the
classifier, the same score `search` maximizes (metric "accuracy": the accuracy gain, the validation
loss breaking ties; or "loss"); remaining ties go to the lower energy per step, then the earlier
preset in front/middle/rear order. Each scheme's energy per training step is estimated from its MACs and bytes
moved (search/energy.py, constants documented there).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from pockprop.search.contribution import FinetuneConfig, SearchData, probe, score
from pockprop.search.energy import E_BYTE, E_MAC, SOURCE
from pockprop.search.result import human_bytes, human_macs
from pockprop.search.select import ProbeProgress, prepare

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

    @property
    def scheme(self) -> str:
        return f"tbft-{self.block}"

    def table(self) -> str:
        rows = [("scheme", "val acc", "gain", "val loss", "trainable", "bwd MACs", "bytes moved", "energy/step", "ms")]
        for s in SCHEMES:
            f, e = self.figures.get(s, {}), self.energy[s]
            rows.append((s + (" *" if s == self.scheme else ""), f"{100 * self.accuracy[s]:.1f}%",
                         "-" if s == "classifier" else f"{100 * self.gains[s]:+.1f}", f"{self.loss.get(s, 0.0):.4f}",
                         f"{f.get('trainable_percent', 0.0):.1f}%", human_macs(f.get("backward_macs", 0)),
                         human_bytes(e["bytes"]), f"{e['joules'] * 1e3:.3f} mJ", f"{self.ms.get(s, 0.0):.2f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"drift probe ({self.probes_run} probed, {self.probes_cached} from cache): fine-tune the {self.block} "
                 f"block ({self.scheme})"]
        lines += ["  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                  for r in rows]
        lines.append(f"  energy = MACs x {E_MAC * 1e12:.1f} pJ + bytes moved x {E_BYTE * 1e12:.0f} pJ ({SOURCE})")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"block": self.block, "scheme": self.scheme, "gains": self.gains, "accuracy": self.accuracy,
                "loss": self.loss, "energy": self.energy, "figures": self.figures, "ms": self.ms,
                "constants": {"e_mac_joules": E_MAC, "e_byte_joules": E_BYTE, "source": SOURCE},
                "probes_run": self.probes_run, "probes_cached": self.probes_cached, "seconds": self.seconds}


def drift_probe(model: torch.nn.Module, input_shape: Sequence[int], data: SearchData, *,
                config: FinetuneConfig | None = None, progress: bool = True, cache_dir: str | None = None,
                loss: str = "cross_entropy", preprocess: dict[str, Any] | None = None,
                traced: Any = None, metric: str = "accuracy") -> DriftResult:
    """Probe tbft-front/middle/rear against the classifier and choose the block (module docstring)."""
    t0 = time.perf_counter()
    config = config or FinetuneConfig()
    score(0.0, 0.0, 1, metric)  # validates the metric
    tm, cache = prepare(model, input_shape, data, config, traced, loss, cache_dir)
    bar = ProbeProgress(len(SCHEMES), "drift ", enabled=progress)
    results: dict[str, dict[str, Any]] = {}
    for i, s in enumerate(SCHEMES):
        bar.update(i, s, force=i == 0)
        results[s] = probe(tm, s, data, config, cache, loss=loss, preprocess=preprocess, what=s)
    bar.update(len(SCHEMES), "done")
    bar.close()
    acc = {s: r["accuracy"] for s, r in results.items()}
    gains = {s: acc[s] - acc["classifier"] for s in SCHEMES[1:]}
    energy = {s: r["figures"]["energy"] for s, r in results.items()}
    base = results["classifier"]
    scores = {s: score(gains[s], base["loss"] - results[s]["loss"], len(data.y_val), metric) for s in SCHEMES[1:]}
    best = max(SCHEMES[1:], key=lambda s: (scores[s], -energy[s]["joules"], -SCHEMES.index(s)))
    return DriftResult(best.removeprefix("tbft-"), gains, acc, energy, {s: r["loss"] for s, r in results.items()},
                       {s: {k: v for k, v in r["figures"].items() if k != "energy"} for s, r in results.items()},
                       {s: r["ms"] for s, r in results.items()}, cache.runs, cache.hits, time.perf_counter() - t0)
