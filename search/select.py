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
6. With `validate=True` (search/finalists.py): whole blocks are screened beside the layer options;
   before the knapsack, the best third of them is probed again three times longer at every rate of a small
   grid (successive halving, `rungs` rounds), replacing their screen gains; after it, a greedy forward
   selection measures options and blocks together with the recipe, and the final decision fine-tunes every
   candidate that fits the budgets (each preset, each preset over a budget cut to a channel ratio that
   fits or trimmed to fewer blocks, the knapsack's selection, the greedy selection, the best single option,
   in each batch-norm mode) with the recipe at every rate of the grid, confirms the best few on the other
   cross-validation folds of the same samples and returns the best mean, with its learning rate; `decision`
   says which and why, `finalists` holds every candidate's figures and result. Gains need not add up, and
   the options' probes are short: only the joint, recipe-length runs decide.
7. `budget_time` bounds the device-seconds spent fine-tuning probes (cache hits cost none): once spent,
   no new probe starts and every stage goes on with what was measured.

A budget on trainable parameters (`budget_params`: a count, or a fraction of the model's parameters
when below 1) bounds what a device would send when fleets exchange only the trained tensors; it is an
exact knapsack constraint (trainable counts add up exactly), the solver's second cost, so it cannot be
combined with `budget_ms`.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch

from pockprop.runtime.progress import Progress

from pockprop.compiler.compile import TracedModel, compile_traced, trace_model
from pockprop.compiler import batchnorm as bn_modes
from pockprop.search.contribution import FinetuneConfig, ProbeCache, SearchData, model_fingerprint, probe, score
from pockprop.search.finalists import Budgets, art_compiler, finish, refine, runner
from pockprop.search.costs import difference, figures, memory_of
from pockprop.search.options import (SearchError, block_options, candidate_layers, enumerate_options, head_of,
                                     parse_ratios, scheme_of)
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


BATCHNORM_CHOICES = ("frozen", "train", "both")


def prepare(model: torch.nn.Module, input_shape: Sequence[int], data: SearchData, config: FinetuneConfig,
            traced: TracedModel | None, loss: str, cache_dir: str | None,
            budget_time: float | None = None) -> tuple[TracedModel, ProbeCache]:
    """The trace (batch = config.batch) and the probe cache keyed by model, data, config and loss."""
    shape = sample_shape(input_shape, data)
    config.total_steps(len(data.x_train))  # fail early on a batch larger than the data
    tm = traced if traced is not None else trace_model(model, (zeros_input(config.batch, shape, data.x_train.dtype),))
    context = {"model": model_fingerprint(model, tm), "data": data.fingerprint(), "loss": loss,
               "input": [config.batch, *shape]}
    return tm, ProbeCache(cache_dir, context, budget_time)


def recipe_of(config: FinetuneConfig, recipe: FinetuneConfig | None,
              lrs: Sequence[float] | None) -> tuple[FinetuneConfig, tuple[float, ...]]:
    """The final runs' recipe (default: the probes' config, 5 times as long, cosine) and learning-rate grid
    (default: config's lr / 3, x 1, x 3)."""
    recipe = recipe or replace(config, epochs=5 * config.epochs, steps=None if config.steps is None
                               else 5 * config.steps, schedule="cosine")
    grid = tuple(float(v) for v in lrs) if lrs else (config.lr / 3, config.lr, 3 * config.lr)
    if not all(v > 0 for v in grid):
        raise SearchError(f"learning rates must be positive, got {', '.join(f'{v:g}' for v in grid)}")
    return recipe, grid


def modes_of(batchnorm: str, tm: TracedModel) -> tuple[str, ...]:
    """The batch-norm modes the candidates are tried in: "frozen", "train" or "both" (a model without batch
    norm has one mode)."""
    if batchnorm not in BATCHNORM_CHOICES:
        raise SearchError(f"batchnorm {batchnorm!r}: use one of {', '.join(BATCHNORM_CHOICES)}")
    if not bn_modes.statistics(tm.traced.graph):
        return ("frozen",)
    return ("frozen", "train") if batchnorm == "both" else (batchnorm,)


def search(model: torch.nn.Module, input_shape: Sequence[int], data: SearchData, *, budget_memory: int,
           budget_ms: float | None = None, ratios: Sequence[float] | str = (1 / 8, 1 / 4, 1 / 2, 1),
           config: FinetuneConfig | None = None, cache_dir: str | None = None, progress: bool = True,
           preprocess: dict[str, Any] | None = None, candidates: str | Sequence[str] | None = None,
           max_layers: int | None = None, metric: str = "accuracy", memory: str = "training",
           loss: str = "cross_entropy", weight_with_bias: bool = True, validate: bool = True,
           name: str | None = None, traced: TracedModel | None = None, max_rounds: int = 32,
           budget_params: float | None = None, batchnorm: str = "both", recipe: FinetuneConfig | None = None,
           lrs: Sequence[float] | None = None, rungs: int = 1, eta: int = 3, greedy_steps: int = 3,
           greedy_width: int = 4, budget_time: float | None = None) -> SearchResult:
    """Choose an update scheme for `model` that fits `budget_memory` bytes (see the module docstring).

    input_shape: the model input, with or without the batch dimension (the batch is config.batch).
    data: model-ready train and validation arrays. memory: "training" or "peak" (search/costs.py).
    metric: "accuracy" (loss breaks ties) or "loss". candidates: fnmatch patterns limiting the layers;
    max_layers: only the last N candidate layers. preprocess: recorded in the probes' artifacts only
    (the data is model-ready already). traced: a TracedModel of `model` to reuse (batch config.batch).
    validate=False stops after the knapsack (no refinement, greedy selection or final decision).
    batchnorm: the candidates' batch-norm mode, "frozen", "train" or "both" (the default: each candidate in
    each mode, the options screened in train mode). recipe: how the final candidates are fine-tuned (default: the probes' config, 5 times
    as long, cosine); lrs: the learning-rate grid of the longer runs (default: config's lr / 3, x 1, x 3).
    rungs, eta: successive halving; greedy_steps, greedy_width: forward selection (search/finalists.py).
    budget_time: device-seconds of probing; once spent, no new probe starts (the screen's first probe and
    the classifier's final run always run).
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
    if budget_time is not None and not budget_time > 0:
        raise SearchError(f"the time budget must be positive, got {budget_time} s")
    score(0.0, 0.0, 1, metric)  # validates the metric
    memory_of({"training_bytes": 0, "peak_bytes": 0}, memory)
    ratio_values = parse_ratios(ratios)
    tm, cache = prepare(model, input_shape, data, config, traced, loss, cache_dir, budget_time)
    modes = modes_of(batchnorm, tm)
    mode = modes[-1]  # the screen's: train mode when it is among the modes
    recipe, grid = recipe_of(config, recipe, lrs)
    layers = tm.layers
    head = head_of(layers)
    cands = candidate_layers(layers, candidates, max_layers)
    options = enumerate_options(cands, ratio_values, weight_with_bias)
    if validate:  # whole blocks, for the greedy selection (the knapsack takes one layer per option)
        options += [b for b in block_options(layers, cands) if len(b.members) > 1]
    bar = ProbeProgress(len(options) + 1, "search ", enabled=progress)
    run = lambda scheme, what: probe(tm, scheme, data, config, cache, loss=loss, preprocess=preprocess, what=what)  # noqa: E731

    bar.update(0, "classifier baseline", force=True)
    base = run(scheme_of(head, [], "classifier", mode), "baseline")
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
    screened = []
    for i, o in enumerate(options):
        if not cache.time_left:
            break
        bar.update(i + 1, o.label)
        r = run(scheme_of(head, [o], "search", mode), o.label)
        o.accuracy, o.loss, o.cached, o.lr = r["accuracy"], r["loss"], r["cached"], config.lr
        o.gain, o.loss_gain = r["accuracy"] - base["accuracy"], base["loss"] - r["loss"]
        o.score = score(o.gain, o.loss_gain, n_val, metric)
        cost = difference(r["figures"], base_fig, memory)
        o.memory_bytes, o.backward_macs = cost["memory_bytes"], int(cost["backward_macs"])
        o.ms = max(0.0, r["ms"] - base["ms"])
        o.params = int(r["figures"]["trainable_params"] - base_fig["trainable_params"])
        screened.append(o)
    options = screened  # with a time budget, the options it left unprobed are not candidates
    bar.update(len(options) + 1, "screened", force=True)
    bar.close()
    run_lrs = runner(tm, data, cache, grid, metric, loss, preprocess, progress)
    refined = refine(options, head, mode, run_lrs, config, recipe, n_val, metric, eta, rungs,
                     lambda: cache.time_left) if validate else 0

    layer_options = [o for o in options if o.update != "block"]
    mem_cap = float(budget_memory - base_mem)
    ms_cap = None if budget_ms is None else float(budget_ms - base["ms"])
    params_cap = None if max_params is None else float(max_params - base_fig["trainable_params"])
    cost2 = (lambda o: o.ms) if ms_cap is not None else (lambda o: o.params) if params_cap is not None else None
    rounds = 0
    while True:
        rounds += 1
        chosen = solve(layer_options, mem_cap, ms_cap if ms_cap is not None else params_cap, cost2=cost2)
        scheme = scheme_of(head, chosen, name or f"search-{human_bytes(budget_memory)}", mode)
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
            chosen, scheme = [], scheme_of(head, [], scheme.name, mode)
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
    stages: dict[str, Any] = {"screened": len(options), "refined": refined, "rounds": rounds}
    final = None
    if validate:
        budgets = Budgets(budget_memory, memory, max_params, budget_ms)
        single = max((o for o in options if o.score > 0 and not budgets.over_option(o, base_fig)),
                     key=lambda o: o.score, default=None)
        final = finish(options, head, layers, tm.shapes, modes, chosen, scheme, single, run_lrs,
                       art_compiler(tm, config, cache, loss, preprocess), budgets, recipe, metric, greedy_steps,
                       greedy_width, lambda: cache.time_left, knapsack_figures=fig)
        stages["greedy"] = final.trials
        chosen, fig = final.chosen, final.best.figures
        scheme = replace(final.best.scheme, name=name or f"search-{human_bytes(budget_memory)}")
        r = final.best.result
        estimate = estimate_of(fig, chosen) | {"accuracy": r["accuracy"], "loss": r["loss"], "ms": r["ms"],
                                               "gain": r["accuracy"] - final.start["accuracy"], "lr": r["lr"]}
    front = [(c, g) for c, g, _ in frontier(layer_options)]
    baseline = {"accuracy": base["accuracy"], "loss": base["loss"], "ms": base["ms"], "memory_bytes": base_mem,
                "figures": base_fig}
    return SearchResult(scheme, options, chosen, baseline, estimate, int(budget_memory), budget_ms, memory, metric,
                        front, cache.runs, cache.hits, rounds, time.perf_counter() - t0,
                        name or type(model).__name__, budget_params=max_params,
                        decision=final.decision if final else None, finalists=final.finalists if final else [],
                        lr=estimate.get("lr"), probe_seconds=cache.seconds, cached_seconds=cache.saved,
                        budget_time=budget_time, stages=stages)
