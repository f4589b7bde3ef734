"""Contribution analysis: how much updating one part of the model helps, measured by fine-tuning.

A *probe* compiles a scheme (from the one trace of the model), loads it into the device runtime
(runtime.Trainer: onnxruntime, not PyTorch, so what is measured is what the device will do),
fine-tunes it briefly on `data.x_train` from the pretrained weights, and evaluates it on `data.x_val`.
Every probe of a search uses the same weights, the same batch order (seeded by `config.seed`) and
the same step count, so the differences between probes are the options'. Short runs on a small
validation set are still noisy; `config.repeats` > 1 averages over that many data orders.

Gain of an option = its validation accuracy - the classifier-only baseline's. The solver maximizes
the summed `score`:
  metric "accuracy" (default): score = accuracy gain + loss gain / (10 x n_val)
      the validation loss only breaks ties: a loss gain of one nat is worth a tenth of one
      validation sample, so options whose accuracies are equal are ordered by their loss
  metric "loss": score = baseline loss - loss

Cache: one JSON file per probe in `cache_dir`, named by the sha256 of everything the result depends
on (model structure and weights, the four data arrays, the fine-tuning config, the loss, the input
shape, the scheme's rules) and written atomically (runtime.durable.write_atomic), so an interrupted
search resumes where it stopped and a repeated one runs no probe again.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from pockprop.runtime import data as rdata
from pockprop.artifact.durable import write_atomic
from pockprop.artifact.contract import MANIFEST_FILE, Manifest
from pockprop.artifact.manifest import Bundle
from pockprop.runtime.schedule import Schedule
from pockprop.runtime.trainer import Trainer

from pockprop.compiler.compile import TracedModel, compile_traced
from pockprop.compiler.scheme import Scheme
from pockprop.search.costs import figures, median_ms
from pockprop.search.options import SearchError, scheme_dict

CACHE_VERSION = 2
METRICS = ("accuracy", "loss")
SCHEDULES = ("constant", "cosine")
LABELS_PER_SAMPLE = ("search needs one class label per sample (classification), got labels of shape {shape} per "
                     "sample: per-token labels are not supported by search yet")


@dataclass
class SearchData:
    """Model-ready arrays of one data input (preprocessed as the model expects; float inputs as float32,
    integer ones, such as token ids, as int64) and int64 labels, one per sample.

    The validation part is held out from the *training* data: the search must never see the test set.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    def __post_init__(self) -> None:
        for x, y, what in ((self.x_train, self.y_train, "train"), (self.x_val, self.y_val, "validation")):
            if len(x) != len(y):
                raise SearchError(f"{what} data: {len(x)} samples but {len(y)} labels")
            if len(x) == 0:
                raise SearchError(f"{what} data: no samples")
        if self.x_train.shape[1:] != self.x_val.shape[1:]:
            raise SearchError(f"train samples are {self.x_train.shape[1:]}, validation samples {self.x_val.shape[1:]}")
        _one_per_sample(self.y_train)
        self.x_train, self.x_val = _model_ready(self.x_train), _model_ready(self.x_val)
        self.y_train = np.asarray(self.y_train).astype(np.int64)
        self.y_val = np.asarray(self.y_val).astype(np.int64)

    @classmethod
    def split(cls, x: np.ndarray, y: np.ndarray, val_fraction: float = 0.2, seed: int = 0) -> "SearchData":
        """Stratified seeded hold-out: round(val_fraction x n_c) samples of each class c (at least one of any
        class with two or more samples) go to validation, in a seeded random choice."""
        if not 0.0 < val_fraction < 1.0:
            raise SearchError(f"val_fraction must be in (0, 1), got {val_fraction}")
        x, y = np.asarray(x), np.asarray(y)
        if len(x) != len(y):
            raise SearchError(f"{len(x)} samples but {len(y)} labels")
        _one_per_sample(y)
        rng = np.random.default_rng([seed, 0x5EA4C4])
        val = []
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            k = int(round(val_fraction * len(idx)))
            k = min(max(k, 1 if len(idx) > 1 else 0), len(idx) - 1)
            val.append(rng.permutation(idx)[:k])
        val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
        train_idx = np.setdiff1d(np.arange(len(y)), val_idx)
        return cls(x[train_idx], y[train_idx], x[val_idx], y[val_idx])

    @functools.cached_property
    def _fingerprint(self) -> str:  # computed once: every probe's cache key names its data
        h = hashlib.sha256()
        for a in (self.x_train, self.y_train, self.x_val, self.y_val):
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).data)
        return h.hexdigest()

    def fingerprint(self) -> str:
        """sha256 of the four arrays (dtypes, shapes, bytes)."""
        return self._fingerprint


def _one_per_sample(y: Any) -> None:
    if np.ndim(y) != 1:
        raise SearchError(LABELS_PER_SAMPLE.format(shape=list(np.shape(y)[1:])))


def _model_ready(x: np.ndarray) -> np.ndarray:
    """Float inputs as float32, integer inputs as int64 (the runtime casts to the graph's dtype), bools as is."""
    x = np.asarray(x)
    return np.ascontiguousarray(x, np.int64 if x.dtype.kind in "iu" else bool if x.dtype.kind == "b" else np.float32)


def _default_optimizer() -> dict[str, Any]:
    return {"name": "sgd", "lr": 0.01, "momentum": 0.9}


@dataclass
class FinetuneConfig:
    """How a probe trains: `steps` steps if given, else `epochs` (a float) x the full batches of an epoch, at
    optimizer["lr"], constant or (schedule "cosine") decayed to 0 over the run."""

    batch: int = 32
    epochs: float = 2.0
    steps: int | None = None
    optimizer: dict[str, Any] = field(default_factory=_default_optimizer)
    seed: int = 0
    threads: int | None = None  # onnxruntime intra-op threads (not part of the cache key)
    repeats: int = 1  # probes averaged over this many data orders (seeds seed, seed+1, ...)
    schedule: str = "constant"  # or "cosine"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise SearchError(f"schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")

    @property
    def lr(self) -> float:
        return float(self.optimizer.get("lr", 0.01))

    def with_lr(self, lr: float) -> "FinetuneConfig":
        return replace(self, optimizer=dict(self.optimizer) | {"lr": float(lr)})

    def total_steps(self, n_train: int) -> int:
        per_epoch = n_train // self.batch
        if per_epoch < 1:
            raise SearchError(f"{n_train} training samples make no full batch of {self.batch}; lower the batch")
        if self.steps is not None:
            if self.steps < 1:
                raise SearchError(f"steps must be >= 1, got {self.steps}")
            return int(self.steps)
        if not self.epochs > 0:
            raise SearchError(f"epochs must be > 0, got {self.epochs}")
        return max(1, int(round(self.epochs * per_epoch)))

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("threads")
        return d


def trainer_of(art: Any, threads: int | None = None) -> Trainer:
    """A runtime Trainer on an artifact held in memory (the same bytes `Artifact.save` would write)."""
    files = art.files()
    raw = files.pop(MANIFEST_FILE)
    return Trainer(Bundle("<search probe>", Manifest.loads(raw, "<search probe>"), files, raw), art.initial_state(),
                   threads)


def finetune(trainer: Trainer, data: SearchData, config: FinetuneConfig, seed: int) -> dict[str, Any]:
    """Train `config.total_steps` steps in seeded epoch orders, then evaluate on the validation data."""
    total = config.total_steps(len(data.x_train))
    trainer.schedule = Schedule(config.schedule, config.lr, total_steps=total if config.schedule == "cosine" else 0)
    start = time.perf_counter()
    times: list[float] = []
    losses: list[float] = []
    epoch = 0
    while len(times) < total:
        order = rdata.epoch_order(len(data.x_train), seed, 0, epoch)
        for idx in rdata.batch_indices(order, trainer.batch_size):
            if len(times) >= total:
                break
            t0 = time.perf_counter()
            loss = trainer.step(data.x_train[idx], data.y_train[idx])
            times.append(time.perf_counter() - t0)
            if loss is not None:
                losses.append(loss)
        epoch += 1
    m = trainer.evaluate(data.x_val, data.y_val)
    return {"accuracy": float(m.get("accuracy", 0.0)), "loss": float(m["loss"]), "steps": total,
            "rejected": trainer.rejected, "train_loss": float(np.mean(losses[-10:])) if losses else float("nan"),
            "ms": median_ms(times), "seconds": time.perf_counter() - start}


def model_fingerprint(model: Any, tm: TracedModel) -> str:
    """sha256 of the traced structure (ops, shapes, module paths) and every weight and buffer."""
    h = hashlib.sha256(type(model).__name__.encode())
    g = tm.traced.graph
    for n in g.nodes:
        h.update(f"{n.op}|{n.module}|{[g.types[o].shape for o in n.outputs if o]}|{sorted(n.attrs)}".encode())
    for name, t in sorted(model.state_dict().items()):
        a = t.detach().cpu().contiguous().numpy()
        h.update(f"{name}{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class ProbeCache:
    """Probe results on disk, one JSON file per probe (see the module docstring); None = no cache. It also
    counts the device-seconds of the probes run (cache hits cost none) against `budget_time`, if given."""

    def __init__(self, directory: str | None, context: dict[str, Any], budget_time: float | None = None) -> None:
        self.directory, self.context, self.budget_time = directory, context, budget_time
        self.hits = self.runs = 0
        self.seconds = 0.0  # fine-tuning and evaluation wall time of the probes run in this call
        self.saved = 0.0  # the same of the probes read from the cache (what they cost when they ran)
        self._compiled: tuple[str, Any] | None = None  # the last artifact: a learning-rate grid compiles once
        if directory:
            os.makedirs(directory, exist_ok=True)

    def key(self, scheme: Scheme, kind: str, config: FinetuneConfig, data: SearchData | None = None) -> str:
        rules = {k: v for k, v in scheme_dict(scheme).items() if k != "name"}
        doc = {"v": CACHE_VERSION, "kind": kind, "scheme": rules, "config": config.key()} | self.context
        if data is not None and data.fingerprint() != self.context.get("data"):  # another split (confirm)
            doc["split"] = data.fingerprint()
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    @property
    def time_left(self) -> bool:
        """False once the probes run have spent `budget_time` device-seconds."""
        return self.budget_time is None or self.seconds < self.budget_time

    def get(self, key: str) -> dict[str, Any] | None:
        if not self.directory:
            return None
        path = os.path.join(self.directory, f"{key[:40]}.json")
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return None
        return doc.get("result") if doc.get("key") == key else None

    def put(self, key: str, result: dict[str, Any], what: str) -> None:
        if self.directory:
            doc = {"key": key, "what": what, "result": result}
            write_atomic(os.path.join(self.directory, f"{key[:40]}.json"), (json.dumps(doc, indent=1) + "\n").encode())


def compiled(tm: TracedModel, scheme: Scheme | str, config: FinetuneConfig, cache: ProbeCache, loss: str,
             preprocess: dict[str, Any] | None, batchnorm: str | None = None) -> Any:
    """The artifact of `scheme` (the last one is kept: probes at several learning rates compile once; the rate
    each runs at is the schedule's, not the compiled one)."""
    spec = scheme if isinstance(scheme, Scheme) else Scheme(scheme, (), batchnorm or "frozen")
    opt = {k: v for k, v in config.optimizer.items() if k != "lr"}
    key = json.dumps([scheme if isinstance(scheme, str) else None, scheme_dict(spec), opt, loss], sort_keys=True)
    if cache._compiled is None or cache._compiled[0] != key:
        art = compile_traced(tm, loss=loss, optimizer=config.optimizer, scheme=scheme, preprocess=preprocess,
                             batchnorm=batchnorm if isinstance(scheme, str) else None)
        cache._compiled = (key, art)
    return cache._compiled[1]


def probe(tm: TracedModel, scheme: Scheme | str, data: SearchData, config: FinetuneConfig, cache: ProbeCache, *,
          loss: str = "cross_entropy", preprocess: dict[str, Any] | None = None, what: str = "",
          batchnorm: str | None = None) -> dict[str, Any]:
    """Compile `scheme` (a preset name: in `batchnorm` mode), fine-tune it (config.repeats times) and evaluate
    it: {"accuracy", "loss", "ms", "seconds", "figures", "cached"}; from the cache when it holds this probe."""
    spec = scheme if isinstance(scheme, Scheme) else Scheme(scheme, (), batchnorm or "frozen")
    key = cache.key(spec, "probe" if isinstance(scheme, Scheme) else f"preset:{scheme}", config, data)
    hit = cache.get(key)
    if hit is not None:
        cache.hits += 1
        cache.saved += float(hit.get("seconds", 0.0))
        return hit | {"cached": True}
    art = compiled(tm, scheme, config, cache, loss, preprocess, batchnorm)
    runs = []
    for r in range(max(1, config.repeats)):
        trainer = trainer_of(art, config.threads)
        runs.append(finetune(trainer, data, config, config.seed + r))
    result = {"accuracy": float(np.mean([r["accuracy"] for r in runs])), "loss": float(np.mean([r["loss"] for r in runs])),
              "ms": float(np.median([r["ms"] for r in runs])), "steps": runs[0]["steps"],
              "rejected": int(sum(r["rejected"] for r in runs)), "train_loss": float(np.mean([r["train_loss"] for r in runs])),
              "seconds": float(sum(r["seconds"] for r in runs)), "lr": config.lr, "figures": figures(art)}
    cache.runs += 1
    cache.seconds += result["seconds"]
    cache.put(key, result, what)
    return result | {"cached": False}


def rank(r: dict[str, Any], metric: str = "accuracy") -> tuple[float, ...]:
    """A probe result's standing on validation, larger is better: accuracy, then loss (metric "loss": loss)."""
    return (-r["loss"],) if metric == "loss" else (r["accuracy"], -r["loss"])


def better(a: dict[str, Any], b: dict[str, Any] | None, metric: str = "accuracy") -> bool:
    """Whether probe result `a` beats `b` on validation (`rank`)."""
    return b is None or rank(a, metric) > rank(b, metric)


MAX_FOLDS = 5  # a smaller validation fraction makes larger folds, not more runs


def folds_of(data: SearchData) -> int:
    """How many cross-validation folds `fold` makes: the pool over the validation part's size (20 % -> 5),
    from 2 to MAX_FOLDS."""
    return min(MAX_FOLDS, max(2, int(round((len(data.y_train) + len(data.y_val)) / len(data.y_val)))))


def fold(data: SearchData, k: int) -> SearchData:
    """Cross-validation fold k (1 .. folds_of(data) - 1): the training samples, dealt in class order and a fixed
    seeded order within each class into folds - 1 parts (stratified, sizes within one), give part k - 1 as the
    validation set, and the original validation samples train. With fold 0 (`data` itself) every sample is
    validated exactly once, so the mean over all folds judges a scheme on the whole pool, not one small hold-out."""
    parts = folds_of(data) - 1
    if not 1 <= k <= parts:
        raise SearchError(f"fold {k}: the data makes folds 1 to {parts} beside the validation split")
    rng = np.random.default_rng([0x5EA4C4, 1 << 40])  # never a user's split seed
    order = np.concatenate([rng.permutation(np.flatnonzero(data.y_train == c)) for c in np.unique(data.y_train)])
    val = np.sort(order[k - 1::parts])
    train = np.setdiff1d(np.arange(len(data.y_train)), val)
    return SearchData(np.concatenate([data.x_train[train], data.x_val]),
                      np.concatenate([data.y_train[train], data.y_val]), data.x_train[val], data.y_train[val])


def confirm(tm: TracedModel, scheme: Scheme | str, data: SearchData, config: FinetuneConfig, result: dict[str, Any],
            orders: int | None, cache: ProbeCache, **kw: Any) -> dict[str, Any]:
    """`result` (a run at config's seed on `data`'s validation split) averaged with `orders` more runs at its
    learning rate, each on another cross-validation fold (`fold`; None: every fold, so that every sample is
    validated once) and another batch order: one lucky split or order does not decide (validation sets are
    small, and the best of many noisy runs is often the luckiest)."""
    orders = folds_of(data) - 1 if orders is None else min(orders, folds_of(data) - 1)
    if orders < 1:
        return result
    runs = [result] + [probe(tm, scheme, fold(data, k), replace(config.with_lr(result["lr"]), seed=config.seed + k),
                             cache, **kw) for k in range(1, orders + 1)]
    folds = [r["accuracy"] for r in runs]
    return result | {"accuracy": sum(folds) / len(runs), "loss": sum(r["loss"] for r in runs) / len(runs),
                     "orders": len(runs), "first": {"accuracy": result["accuracy"], "loss": result["loss"]},
                     "folds": folds}


def margin(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float] | None:
    """How far `a` is ahead of `b` fold by fold (both confirmed on the same folds): the mean of the paired
    accuracy differences and its standard error; None when they were not run on the same folds."""
    fa, fb = a.get("folds"), b.get("folds")
    if not fa or not fb or len(fa) != len(fb) or len(fa) < 2:
        return None
    d = np.array(fa) - np.array(fb)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def margin_text(name: str, m: tuple[float, float] | None) -> str:
    """`margin` in words: points ahead of `name`, and whether that is more than twice its standard error."""
    if m is None:
        return ""
    mean, se = m
    clear = abs(mean) > 2 * se
    return (f"{100 * mean:+.1f} ± {100 * se:.1f} points over {name} fold by fold"
            + ("" if clear else ": within the folds' noise, a tie in all but name"))


def probe_lrs(tm: TracedModel, scheme: Scheme | str, data: SearchData, config: FinetuneConfig, lrs: Sequence[float],
              cache: ProbeCache, *, metric: str = "accuracy", **kw: Any) -> dict[str, Any]:
    """`probe` at each learning rate of `lrs` (config's otherwise); the best on validation (`better`; ties: the
    earlier rate), with "grid": {lr: accuracy} of every rate tried. Stops early when the time budget is spent
    (at least one rate runs)."""
    best, grid = None, {}
    for lr in lrs or (config.lr,):
        if best is not None and not cache.time_left:
            break
        r = probe(tm, scheme, data, config.with_lr(lr), cache, **kw)
        grid[f"{lr:g}"] = r["accuracy"]
        if better(r, best, metric):
            best = r
    assert best is not None
    return best | {"grid": grid}


def score(gain: float, loss_gain: float, n_val: int, metric: str) -> float:
    """What the solver maximizes for one option (see the module docstring)."""
    if metric == "accuracy":
        return gain + loss_gain / (10.0 * max(n_val, 1))
    if metric == "loss":
        return loss_gain
    raise SearchError(f"metric {metric!r}: use one of {', '.join(METRICS)}")
