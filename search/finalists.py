"""The search's later stages: longer probes for the promising options, greedy joint selection, and the final
decision among every candidate, each fine-tuned with the deployment recipe and its own learning rate.

Short single-option probes rank options cheaply but badly: layers that need more steps or a larger learning
rate look worse than they are, and gains do not add up (options chase the same error, or together move the
model too far). So after the screen (select.py):

- `refine` (successive halving): the best 1/eta of the options are probed again eta times longer (capped at
  the recipe's length), each at every rate of the grid, against the classifier probed the same way; their
  gains are replaced by these. `rungs` rounds, each keeping 1/eta of the previous.
- `greedy` (forward selection, measured together): from the classifier alone, try adding each of the `width`
  best remaining layer options and the `width` best blocks (no layer twice, within the budgets), fine-tune
  every such scheme with the recipe at every rate, keep the best if it beats the current scheme on
  validation, and repeat up to `steps` times. Interactions are measured, not assumed.
- `decide`: the candidates (every preset; each preset over a budget cut to the largest input-channel ratio of
  1/2, 1/4, 1/8 that fits and trimmed to fewer blocks from either end until it fits; the knapsack's
  selection, the greedy selection and the best single option; each in every batch-norm mode asked for) are
  compiled; those over a budget are set aside with the reason; the rest are fine-tuned with the recipe at
  every rate of the grid; the `final_few` best run at their rates on the other cross-validation folds of the
  same samples (contribution.confirm: every sample validated once), and the best mean wins
  (`contribution.rank`: accuracy, then loss; ties go to the earlier candidate, cheapest first).

Every run goes through contribution.probe: the device runtime, the cache, and the device-seconds clock that
`budget_time` bounds; once it is spent no new run starts (the candidates not run say so).
"""
from __future__ import annotations

import glob
import math
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from pockprop.compiler.scheme import Layer, Rule, Scheme, preset_scheme, resolve_scheme
from pockprop.errors import CompileError
from pockprop.search.contribution import (FinetuneConfig, better, compiled, confirm, margin, margin_text,
                                          probe_lrs, rank, score)
from pockprop.search.costs import figures, memory_of
from pockprop.search.options import Option, mode_label, ratio_text, scheme_of
from pockprop.search.result import human_bytes

PRESETS = ("classifier", "bias-only", "sparse", "last-k:1", "last-k:2", "tbft-front", "tbft-middle", "tbft-rear",
           "full")

Run = Callable[..., dict[str, Any]]  # (scheme, config) -> probe_lrs's best on the grid; see runner()


@dataclass
class Finalist:
    """One candidate of the final decision: its scheme (batch-norm mode included), compiled figures, and either
    its recipe run (best learning rate) or why it was not run."""

    name: str
    scheme: Scheme
    figures: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    why: str = ""  # set when it was not run or cannot be returned: over a budget, out of time

    @property
    def label(self) -> str:
        return mode_label(self.name, self.scheme.batchnorm)

    def to_json(self) -> dict[str, Any]:
        from pockprop.search.options import scheme_dict

        r = self.result or {}
        return {"name": self.label, "scheme": scheme_dict(self.scheme), "why": self.why,
                "accuracy": r.get("accuracy"), "loss": r.get("loss"), "lr": r.get("lr"), "grid": r.get("grid"),
                "ms": r.get("ms"), "orders": r.get("orders", 1), "first": r.get("first"), "folds": r.get("folds"),
                "trainable_params": self.figures.get("trainable_params"),
                "training_bytes": self.figures.get("training_bytes"), "peak_bytes": self.figures.get("peak_bytes")}


def longer(config: FinetuneConfig, recipe: FinetuneConfig, factor: float) -> FinetuneConfig:
    """`recipe` run `factor` times as long as `config`'s probes, at most as long as the recipe itself."""
    if config.steps is not None:
        steps = min(math.ceil(config.steps * factor), recipe.steps or math.ceil(config.steps * factor))
        return replace(recipe, steps=steps)
    return replace(recipe, epochs=min(config.epochs * factor, recipe.epochs), steps=None)


def refine(options: list[Option], head: Layer, mode: str, run: Run, config: FinetuneConfig,
           recipe: FinetuneConfig, n_val: int, metric: str, eta: int = 3, rungs: int = 1,
           time_left: Callable[[], bool] = lambda: True) -> int:
    """Successive halving over the options (module doc); returns the number of options re-probed."""
    pool = sorted((o for o in options if o.gain > 0 or o.loss_gain > 0), key=lambda o: -o.score)
    done, factor = 0, 1.0
    for rung in range(1, rungs + 1):
        factor *= eta
        pool = pool[:math.ceil(len(pool) / eta)]
        if not pool or not time_left():
            break
        cfg = longer(config, recipe, factor)
        ref = run(scheme_of(head, [], "classifier", mode), cfg)
        for o in pool:
            if not time_left():
                break
            r = run(scheme_of(head, [o], o.label, mode), cfg)
            o.accuracy, o.loss, o.lr, o.rung = r["accuracy"], r["loss"], r["lr"], rung
            o.gain, o.loss_gain = r["accuracy"] - ref["accuracy"], ref["loss"] - r["loss"]
            o.score = score(o.gain, o.loss_gain, n_val, metric)
            done += 1
        pool.sort(key=lambda o: -o.score)
        if cfg.epochs >= recipe.epochs and cfg.steps == recipe.steps:
            break
    return done


def greedy(options: list[Option], head: Layer, mode: str, start: dict[str, Any], run: Run, recipe: FinetuneConfig,
           over: Callable[[Scheme], str], metric: str, steps: int = 3, width: int = 4,
           time_left: Callable[[], bool] = lambda: True) -> tuple[list[Option], dict[str, Any], list[dict[str, Any]]]:
    """Forward selection measured together (module doc): (chosen options, their recipe run, every trial)."""
    ranked = sorted((o for o in options if o.score > 0), key=lambda o: -o.score)
    chosen: list[Option] = []
    current, trials = start, []
    for _ in range(steps):
        best: tuple[Option, dict[str, Any]] | None = None
        tried = {"block": 0, "layer": 0}  # up to `width` of each: blocks rank below single layers on short probes
        for o in ranked:
            kind = "block" if o.update == "block" else "layer"
            if not time_left():
                break
            if tried[kind] >= width or any(c.paths & o.paths for c in chosen):
                continue
            scheme = scheme_of(head, chosen + [o], "greedy", mode)
            if over(scheme):
                continue
            tried[kind] += 1
            r = run(scheme, recipe)
            trials.append({"options": [c.label for c in chosen + [o]], "accuracy": r["accuracy"], "loss": r["loss"],
                           "lr": r["lr"]})
            if best is None or better(r, best[1], metric):
                best = (o, r)
        if best is None or not better(best[1], current, metric):
            break
        chosen.append(best[0])
        current = best[1]
    return chosen, current, trials


SCALES = (1 / 2, 1 / 4, 1 / 8)  # a preset over a budget is also tried at these input-channel ratios


def _rule(u: Any, ratio: float | None = None) -> Rule:
    """The rule that makes one resolved layer update (`ratio`: its weight cut to that input-channel ratio)."""
    path = glob.escape(u.layer.path)
    if ratio is not None:
        return Rule(path, "weight", ratio, bias=u.layer.bias is not None)
    if u.weight is not None:
        return Rule(path, "full") if u.weight.is_full else Rule(path, "weight", u.ratio, u.bias)
    return Rule(path, "bias")


def _updates(scheme: Scheme, layers: list[Layer], shapes: dict[str, tuple[int, ...]]) -> list[Any]:
    return [u for u in resolve_scheme(scheme, layers, shapes).updates if u.weight is not None or u.bias]


def scaled(scheme: Scheme, ratio: float, layers: list[Layer], shapes: dict[str, tuple[int, ...]],
           head: Layer) -> Scheme | None:
    """`scheme` with every whole conv/linear weight but the head's cut to the first `ratio` of its input
    channels (bias kept; other updates as they were): a preset brought down to a budget, as a user would
    by hand. None when it has no such weight."""
    rules, cut = [], False
    for u in _updates(scheme, layers, shapes):
        l = u.layer
        cuts = (u.weight is not None and u.weight.is_full and l.op in ("conv2d", "linear") and len(l.shape) >= 2
                and l.path != head.path)
        cut |= cuts
        rules.append(_rule(u, ratio if cuts else None))
    return Scheme(f"{scheme.name}@{ratio_text(ratio)}", tuple(rules), scheme.batchnorm) if cut else None


def trimmed(scheme: Scheme, over: Callable[[Scheme], str], layers: list[Layer], shapes: dict[str, tuple[int, ...]],
            head: Layer) -> list[Scheme]:
    """`scheme` brought down to the budgets by training fewer of its blocks, as a user would by hand: its first
    blocks dropped until it fits (backprop then stops later: fewer kept activations), and its last blocks
    dropped until it fits (fewer parameters); the head's block always stays. Each is named by the blocks it
    keeps, e.g. tbft-front[layer1.0..layer2.0]; none when nothing short of the head alone fits."""
    updates = _updates(scheme, layers, shapes)
    kept = [u for u in updates if u.layer.block == head.block]
    blocks = list(dict.fromkeys(u.layer.block for u in updates if u.layer.block != head.block))
    out: list[Scheme] = []
    for spans in ([(i, len(blocks)) for i in range(1, len(blocks))], [(0, j) for j in range(len(blocks) - 1, 0, -1)]):
        for lo, hi in spans:
            keep = set(blocks[lo:hi])
            name = f"{scheme.name}[{blocks[lo]}{'..' + blocks[hi - 1] if hi - lo > 1 else ''}]"
            small = Scheme(name, tuple(_rule(u) for u in updates if u.layer.block in keep) +
                           tuple(_rule(u) for u in kept), scheme.batchnorm)
            if not over(small):
                out.append(small)
                break
    return out


def fitted(cands: list[tuple[str, Scheme]], over: Callable[[Scheme], str], layers: list[Layer],
           shapes: dict[str, tuple[int, ...]], head: Layer) -> list[tuple[str, Scheme]]:
    """Each preset among `cands` that is over a budget brought down to fit: at the largest ratio of SCALES that
    fits, if any, and trimmed to fewer blocks from either end (`trimmed`)."""
    out = []
    for name, s in cands:
        if name in PRESETS and name not in ("classifier", "bias-only") and over(s):
            for r in SCALES:
                small = scaled(s, r, layers, shapes, head)
                if small is not None and not over(small):
                    out.append((small.name, small))
                    break
            out += [(t.name, t) for t in trimmed(s, over, layers, shapes, head)]
    return out


def candidates(layers: list[Layer], modes: Sequence[str], searched: dict[str, Scheme]) -> list[tuple[str, Scheme]]:
    """(name, scheme) of every preset the model has and every searched scheme, in each mode; cheapest kinds
    first (ties in the decision go to the earlier)."""
    out: list[tuple[str, Scheme]] = []
    for mode in modes:
        for name in PRESETS:
            try:
                out.append((name, preset_scheme(name, layers, mode)))
            except CompileError:  # a model with fewer blocks than the preset needs
                continue
        out += [(name, replace(s, batchnorm=mode)) for name, s in searched.items()]
    return out


def unique(cands: list[tuple[str, Scheme]]) -> list[tuple[str, Scheme]]:
    """The first of candidates with the same rules and mode: a searched scheme equal to a preset runs once."""
    seen, out = set(), []
    for name, s in cands:
        key = (tuple(sorted(s.rules, key=repr)), s.batchnorm)
        if key not in seen:
            seen.add(key)
            out.append((name, s))
    return out


def decide(cands: list[tuple[str, Scheme]], figures_of: Callable[[Scheme], dict[str, Any]],
           over: Callable[[dict[str, Any]], str], run: Run, recipe: FinetuneConfig, metric: str,
           budget_ms: float | None = None, time_left: Callable[[], bool] = lambda: True, final_few: int = 4,
           orders: int | None = None) -> tuple[Finalist | None, list[Finalist]]:
    """Compile every candidate (`figures_of`: its compiled figures), set aside those over a budget, run the rest
    with the recipe at every rate, and run the `final_few` best at their rates on `orders` more
    cross-validation folds (None: all; contribution.confirm): the best mean on validation wins, and every
    finalist is returned (module doc)."""
    finalists = [Finalist(name, s) for name, s in cands]
    for f in finalists:
        f.figures = figures_of(f.scheme)
        f.why = over(f.figures)
    runnable = sorted((f for f in finalists if not f.why), key=lambda f: f.figures["training_bytes"])
    ran: list[Finalist] = []
    for f in runnable:
        if not time_left() and f.name != "classifier":
            f.why = "not run: the time budget was spent"
            continue
        f.result = run(f.scheme, recipe)
        if budget_ms is not None and f.result["ms"] > budget_ms:
            f.why = f"over the step-time budget ({f.result['ms']:.2f} ms > {budget_ms:g} ms)"
            continue
        ran.append(f)
    if not ran:
        return None, finalists
    top = sorted(ran, key=lambda f: rank(f.result, metric), reverse=True)[:final_few]  # stable: cheaper first
    confirmed = []
    for f in top:
        if orders != 0 and time_left():
            assert f.result is not None
            f.result = run(f.scheme, recipe, orders=orders, first=f.result)
            confirmed.append(f)
    pool = confirmed or top[:1]
    return max(pool, key=lambda f: rank(f.result, metric)), finalists


@dataclass(frozen=True)
class Budgets:
    """What a returned scheme must fit: memory (of the `metric`, search/costs.py), trainable parameters, and
    (checked on its run) ms per step."""

    memory: int
    metric: str = "training"
    params: int | None = None
    ms: float | None = None

    def over(self, fig: dict[str, Any]) -> str:
        """Why a compiled scheme's figures do not fit, or ""."""
        used = memory_of(fig, self.metric)
        if used > self.memory:
            return f"over the memory budget ({human_bytes(used)} > {human_bytes(self.memory)})"
        if self.params is not None and fig["trainable_params"] > self.params:
            return f"over the parameter budget ({fig['trainable_params']:,} > {self.params:,})"
        return ""

    def over_option(self, o: Option, base: dict[str, Any]) -> bool:
        """Whether the classifier plus option `o` is over the memory or parameter budget, by their costs."""
        return (memory_of(base, self.metric) + o.memory_bytes > self.memory
                or (self.params is not None and base["trainable_params"] + o.params > self.params))


@dataclass
class Final:
    """What the stages after the knapsack found: the winner, every candidate, the options behind the winner
    (none for a preset), the classifier's recipe run, the greedy trials, and the decision in words."""

    best: Finalist
    finalists: list[Finalist]
    chosen: list[Option]
    start: dict[str, Any]
    trials: list[dict[str, Any]]
    decision: str


def finish(options: list[Option], head: Layer, layers: list[Layer], shapes: dict[str, tuple[int, ...]],
           modes: Sequence[str], knapsack: list[Option], knapsack_scheme: Scheme, single: Option | None, run: Run,
           art_of: Callable[[Scheme], Any], budgets: Budgets, recipe: FinetuneConfig, metric: str, steps: int,
           width: int, time_left: Callable[[], bool], knapsack_figures: dict[str, Any] | None = None) -> Final:
    """Greedy selection, then the decision among the presets, the knapsack's selection, the greedy selection
    and the best single option (`single`), each in every mode (module doc). knapsack_figures: the compiled
    figures of `knapsack_scheme`, if the caller has them (it is not compiled again)."""
    mode = modes[-1]
    start = run(scheme_of(head, [], "classifier", mode), recipe)
    known: dict[tuple[Any, ...], dict[str, Any]] = {}
    if knapsack_figures is not None:
        known[(knapsack_scheme.rules, knapsack_scheme.batchnorm)] = knapsack_figures

    def figures_of(sc: Scheme) -> dict[str, Any]:  # each scheme compiled once: budget checks and decide share it
        key = (sc.rules, sc.batchnorm)
        if key not in known:
            known[key] = figures(art_of(sc))
        return known[key]

    over = lambda sc: budgets.over(figures_of(sc))  # noqa: E731
    picked, _, trials = greedy(options, head, mode, start, run, recipe, over, metric, steps, width, time_left)
    searched = {"searched": knapsack_scheme} if knapsack else {}
    if picked:
        searched["greedy"] = scheme_of(head, picked, "greedy", mode)
    if single is not None:
        searched["best option"] = scheme_of(head, [single], "best option", mode)
    cands = candidates(layers, modes, searched)
    cands = unique(cands + fitted(unique(cands), over, layers, shapes, head))
    best, finalists = decide(cands, figures_of, budgets.over, run, recipe, metric, budgets.ms, time_left)
    assert best is not None and best.result is not None  # the classifier fits (search checks it) and always runs
    sources = {"searched": knapsack, "greedy": picked, "best option": [single] if single else []}
    r = best.result
    runner = max((f for f in finalists if f is not best and f.result and f.result.get("folds")),
                 key=lambda f: rank(f.result, metric), default=None)  # the next of the confirmed few
    close = margin_text(runner.label, margin(r, runner.result)) \
        if runner is not None and metric == "accuracy" else ""  # the margin is in accuracy points
    decision = (f"{best.label} is the best of {sum(f.result is not None for f in finalists)} candidates fine-tuned "
                f"with the recipe on validation ({100 * r['accuracy']:.1f}% at lr {r['lr']:.3g}"
                + (f", the mean of {r['orders']} cross-validation folds" if r.get("orders", 1) > 1 else "")
                + (f"; {close}" if close else "") + "); "
                f"{sum(bool(f.why) for f in finalists)} set aside (over a budget or out of time)")
    return Final(best, finalists, sources.get(best.name, []), start, trials, decision)


def art_compiler(tm: Any, config: FinetuneConfig, cache: Any, loss: str,
                 preprocess: dict[str, Any] | None) -> Callable[[Scheme], Any]:
    return lambda scheme: compiled(tm, scheme, config, cache, loss, preprocess)


def runner(tm: Any, data: Any, cache: Any, lrs: Sequence[float], metric: str, loss: str,
           preprocess: dict[str, Any] | None, progress: bool = False) -> Run:
    """probe_lrs bound to the search's trace, data and cache; with `progress`, one line per run on stderr."""
    def run(scheme: Scheme, cfg: FinetuneConfig, orders: int | None = 0,
            first: dict[str, Any] | None = None) -> dict[str, Any]:
        """The best on the grid; with `orders` other than 0, `first` (that run) confirmed on that many more
        cross-validation folds (None: all of them)."""
        before = cache.seconds
        kw = dict(loss=loss, preprocess=preprocess, what=scheme.name)
        if orders != 0:
            assert first is not None
            r = confirm(tm, scheme, data, cfg, first, orders, cache, **kw)
        else:
            r = probe_lrs(tm, scheme, data, cfg, lrs, cache, metric=metric, **kw)
        if progress:
            length = f"{cfg.steps} steps" if cfg.steps is not None else f"{cfg.epochs:g} epochs"
            folds = f", mean of {r.get('orders', 1)} folds" if orders != 0 else ""
            print(f"search: {mode_label(scheme.name, scheme.batchnorm)} ({len(scheme.rules)} rules, "
                  f"{length}{folds}): val accuracy "
                  f"{100 * r['accuracy']:.1f}% at lr {r['lr']:.3g} [{cache.seconds - before:.1f}s, "
                  f"{cache.seconds:.0f}s in all]", file=sys.stderr, flush=True)
        return r
    return run
