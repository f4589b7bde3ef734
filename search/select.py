"""search(): contribution analysis, costs, and selection under a memory (and step-time) budget.

1. Trace the model once (pockprop.compiler.compile.trace_model); every scheme below compiles from that trace.
2. Probe the baseline (`classifier`: the head only) and every option (search/options.py) with
   a short fine-tuning run through the device runtime (search/contribution.py).
3. Cost of an option = figures(classifier + option) - figures(classifier) from the compile report
   (search/costs.py): memory bytes of the chosen memory metric, backward MACs, and the
   measured median ms per training step (clamped at 0).
4. Solve the multiple-choice knapsack (search/solver.py): at most one option per layer,
   maximize the summed score with summed memory <= budget - baseline memory (and summed ms <=
   budget_ms - baseline ms).
5. Costs are not exactly additive: backprop to an early layer makes every layer above it compute its
   input gradient, and kept activations can be shared. So the chosen scheme is compiled and its own
   figures checked against the budget; if it is over by X, the solver's budget becomes (the
   selection's estimated cost - X - 1) and it solves again. Each round excludes the previous
   selection, and choosing nothing (the baseline) always fits, so this ends; the returned scheme
   respects the budget by its own compile report (and, for budget_ms, by its own measured step time).
6. With `validate=True` the chosen scheme is fine-tuned like a probe, to report the gain the
   options achieve together (not only the sum of their separate gains). Gains need not add up (two
   options can chase the same error, or together move the model too far): if the selection together
   gains less than the best single option that fits the budget (or less than nothing), that option
   (or the classifier alone) is returned instead, and `fallback` says why. Its figures were measured by
   its own probe, so the result still carries evidence for exactly what it returns.

A budget on trainable parameters (`budget_params`: a count, or a fraction of the model's parameters
when below 1) bounds what a device would send when fleets exchange only the trained tensors; it is an
exact knapsack constraint (trainable counts add up exactly), the solver's second cost, so it cannot be
combined with `budget_ms`.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch

from pockprop.runtime.progress import Progress

from pockprop.compiler.compile import TracedModel, compile_traced, trace_model
from pockprop.search.contribution import FinetuneConfig, ProbeCache, SearchData, model_fingerprint, probe, score
from pockprop.search.costs import difference, figures, memory_of
from pockprop.search.options import SearchError, candidate_layers, enumerate_options, head_of, parse_ratios, scheme_of
from pockprop.search.result import SearchResult, human_bytes
from pockprop.search.solver import frontier, solve


class ProbeProgress(Progress):
    """runtime.progress's bar, counting probes."""

    def line(self, done: int, extra: str) -> str:
        elapsed = time.perf_counter() - self.start
        frac = min(done / self.total, 1.0)
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        return f"{self.label}[{bar}] {done}/{self.total} probes {elapsed:.0f}s {extra}".rstrip()


def sample_shape(input_shape: Sequence[int], data: SearchData) -> tuple[int, ...]:
    """input_shape with or without its batch dimension -> the per-sample shape, checked against the data."""
    shape = tuple(int(d) for d in input_shape)
    want = tuple(data.x_train.shape[1:])
    if len(shape) == len(want) + 1:
        shape = shape[1:]
    if shape != want:
        raise SearchError(f"input shape {tuple(input_shape)} does not match the data's samples {want}")
    return shape


def zeros_input(batch: int, shape: Sequence[int], dtype: Any) -> torch.Tensor:
    """A tracing example: zeros of the input's dtype (only shape and dtype matter; id 0 is a valid token)."""
    return torch.from_numpy(np.zeros((batch, *shape), np.dtype(dtype)))


def prepare(model: torch.nn.Module, input_shape: Sequence[int], data: SearchData, config: FinetuneConfig,
            traced: TracedModel | None, loss: str, cache_dir: str | None) -> tuple[TracedModel, ProbeCache]:
    """The trace (batch = config.batch) and the probe cache keyed by model, data, config and loss."""
    shape = sample_shape(input_shape, data)
    config.total_steps(len(data.x_train))  # fail early on a batch larger than the data
    tm = traced if traced is not None else trace_model(model, (zeros_input(config.batch, shape, data.x_train.dtype),))
    context = {"model": model_fingerprint(model, tm), "data": data.fingerprint(), "config": config.key(),
               "loss": loss, "input": [config.batch, *shape]}
    return tm, ProbeCache(cache_dir, context)


def search(model: torch.nn.Module, input_shape: Sequence[int], data: SearchData, *, budget_memory: int,
           budget_ms: float | None = None, ratios: Sequence[float] | str = (1 / 8, 1 / 4, 1 / 2, 1),
           config: FinetuneConfig | None = None, cache_dir: str | None = None, progress: bool = True,
           preprocess: dict[str, Any] | None = None, candidates: str | Sequence[str] | None = None,
           max_layers: int | None = None, metric: str = "accuracy", memory: str = "training",
           loss: str = "cross_entropy", weight_with_bias: bool = True, validate: bool = True,
           name: str | None = None, traced: TracedModel | None = None, max_rounds: int = 32,
           budget_params: float | None = None) -> SearchResult:
    """Choose an update scheme for `model` that fits `budget_memory` bytes (see the module docstring).

    input_shape: the model input, with or without the batch dimension (the batch is config.batch).
    data: model-ready train and validation arrays. memory: "training" or "peak" (search/costs.py).
    metric: "accuracy" (loss breaks ties) or "loss". candidates: fnmatch patterns limiting the layers;
    max_layers: only the last N candidate layers. preprocess: recorded in the probes' artifacts only
    (the data is model-ready already). traced: a TracedModel of `model` to reuse (batch config.batch).
    """
    t0 = time.perf_counter()
    config = config or FinetuneConfig()
    if not budget_memory > 0:
        raise SearchError(f"the memory budget must be positive, got {budget_memory}")
    if budget_ms is not None and not budget_ms > 0:
        raise SearchError(f"the step-time budget must be positive, got {budget_ms} ms")
    if budget_params is not None and not budget_params > 0:
        raise SearchError(f"the trainable-parameter budget must be positive, got {budget_params}")
    if budget_params is not None and budget_ms is not None:
        raise SearchError("give a step-time budget or a trainable-parameter budget, not both")
    score(0.0, 0.0, 1, metric)  # validates the metric
    memory_of({"training_bytes": 0, "peak_bytes": 0}, memory)
    ratio_values = parse_ratios(ratios)
    tm, cache = prepare(model, input_shape, data, config, traced, loss, cache_dir)
    layers = tm.layers
    head = head_of(layers)
    options = enumerate_options(candidate_layers(layers, candidates, max_layers), ratio_values, weight_with_bias)
    bar = ProbeProgress(len(options) + 1 + int(validate), "search ", enabled=progress)
    run = lambda scheme, what: probe(tm, scheme, data, config, cache, loss=loss, preprocess=preprocess, what=what)  # noqa: E731

    bar.update(0, "classifier baseline", force=True)
    base = run(scheme_of(head, [], "classifier"), "baseline")
    base_fig = base["figures"]
    base_mem = memory_of(base_fig, memory)
    if base_mem > budget_memory:
        raise SearchError(f"the classifier-only baseline alone needs {human_bytes(base_mem)} of {memory} memory, "
                          f"over the budget of {human_bytes(budget_memory)}; raise the budget")
    if budget_ms is not None and base["ms"] > budget_ms:
        raise SearchError(f"the classifier-only baseline alone takes {base['ms']:.2f} ms per step, over the budget "
                          f"of {budget_ms:g} ms")
    max_params = None
    if budget_params is not None:
        total = base_fig["total_params"]
        max_params = int(budget_params * total) if budget_params < 1 else int(budget_params)
        if base_fig["trainable_params"] > max_params:
            raise SearchError(f"the classifier-only baseline alone trains {base_fig['trainable_params']:,} parameters, "
                              f"over the budget of {max_params:,} ({100 * max_params / total:.2f}% of {total:,})")
    n_val = len(data.y_val)
    for i, o in enumerate(options):
        bar.update(i + 1, o.label)
        r = run(scheme_of(head, [o]), o.label)
        o.accuracy, o.loss, o.cached = r["accuracy"], r["loss"], r["cached"]
        o.gain, o.loss_gain = r["accuracy"] - base["accuracy"], base["loss"] - r["loss"]
        o.score = score(o.gain, o.loss_gain, n_val, metric)
        cost = difference(r["figures"], base_fig, memory)
        o.memory_bytes, o.backward_macs = cost["memory_bytes"], int(cost["backward_macs"])
        o.ms = max(0.0, r["ms"] - base["ms"])
        o.params = int(r["figures"]["trainable_params"] - base_fig["trainable_params"])

    mem_cap = float(budget_memory - base_mem)
    ms_cap = None if budget_ms is None else float(budget_ms - base["ms"])
    params_cap = None if max_params is None else float(max_params - base_fig["trainable_params"])
    cost2 = (lambda o: o.ms) if ms_cap is not None else (lambda o: o.params) if params_cap is not None else None
    rounds = 0
    while True:
        rounds += 1
        chosen = solve(options, mem_cap, ms_cap if ms_cap is not None else params_cap, cost2=cost2)
        scheme = scheme_of(head, chosen, name or f"search-{human_bytes(budget_memory)}")
        art = compile_traced(tm, loss=loss, optimizer=config.optimizer, scheme=scheme, preprocess=preprocess)
        fig = figures(art)
        over = memory_of(fig, memory) - budget_memory
        together = None
        over_ms = 0.0
        if ms_cap is not None and chosen:
            together = run(scheme, "chosen")
            over_ms = together["ms"] - budget_ms  # type: ignore[operator]
        if (over <= 0 and over_ms <= 0) or not chosen:
            break
        if rounds >= max_rounds:  # the baseline always fits
            chosen, scheme = [], scheme_of(head, [], scheme.name)
            fig, together = base_fig, None
            break
        if over > 0:
            mem_cap = min(mem_cap, sum(o.memory_bytes for o in chosen)) - over - 1
        if over_ms > 0:
            ms_cap = min(ms_cap, sum(o.ms for o in chosen)) - over_ms - 1e-6  # type: ignore[type-var]

    def estimate_of(fig: dict[str, Any], chosen: list[Any]) -> dict[str, Any]:
        return dict(fig) | {
            "memory_bytes": memory_of(fig, memory), "extra_bytes": fig["training_bytes"] - base_fig["training_bytes"],
            "estimated_gain": sum(o.gain for o in chosen), "estimated_score": sum(o.score for o in chosen),
            "estimated_memory_bytes": base_mem + sum(o.memory_bytes for o in chosen)}

    estimate = estimate_of(fig, chosen)
    fallback = None
    if validate:
        bar.update(len(options) + 1, "chosen scheme together")
        together = together or (run(scheme, "chosen") if chosen else base)
        gain = together["accuracy"] - base["accuracy"]
        fits = [o for o in options if base_mem + o.memory_bytes <= budget_memory and o.gain > 0
                and (ms_cap is None or o.ms <= ms_cap) and (params_cap is None or o.params <= params_cap)]
        single = max(fits, key=lambda o: (o.gain, -o.memory_bytes), default=None)
        if len(chosen) > 1 and single is not None and single.gain > gain:
            fallback = (f"the {len(chosen)} options together gained {100 * gain:+.1f} points, less than "
                        f"{single.label} alone ({100 * single.gain:+.1f}); returning that option")
            chosen, scheme = [single], scheme_of(head, [single], scheme.name)
        elif chosen and gain < 0 and (single is None or single.gain <= 0):
            fallback = (f"the chosen options together lost {100 * -gain:.1f} points against the classifier alone; "
                        f"returning the classifier alone")
            chosen, scheme = [], scheme_of(head, [], scheme.name)
        if fallback is not None:
            art = compile_traced(tm, loss=loss, optimizer=config.optimizer, scheme=scheme, preprocess=preprocess)
            fig = figures(art)
            together = run(scheme, "chosen") if chosen else base
            gain = together["accuracy"] - base["accuracy"]
            estimate = estimate_of(fig, chosen)
        estimate |= {"accuracy": together["accuracy"], "loss": together["loss"], "ms": together["ms"], "gain": gain}
    bar.update(bar.total, "done")
    bar.close()
    front = [(c, g) for c, g, _ in frontier(options)]
    baseline = {"accuracy": base["accuracy"], "loss": base["loss"], "ms": base["ms"], "memory_bytes": base_mem,
                "figures": base_fig}
    return SearchResult(scheme, options, chosen, baseline, estimate, int(budget_memory), budget_ms, memory, metric,
                        front, cache.runs, cache.hits, rounds, time.perf_counter() - t0,
                        name or type(model).__name__, budget_params=max_params, fallback=fallback)

