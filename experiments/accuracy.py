"""`make accuracy`: does a sparse update scheme lose accuracy against full backprop on real drift tasks?

For each drift task of experiments/drift.py (input-, feature- and output-level shifts of scikit-learn's
digits): pre-train a zoo CNN on the source setting with PyTorch (cached as safetensors), then, from
those weights, compile every scheme with pockprop and fine-tune it on the shifted setting through the
device runtime (runtime.Trainer: onnxruntime), 3 seeds each, with one recipe for every scheme. The
searched scheme comes from pockprop.search under a memory budget of 1/4 of full's training memory and
a trainable-parameter budget of 10 % of the model (the issue's targets, given to the search as budgets),
and the drift probe's block choice is recorded beside the drift kind. Results go to
out/accuracy/<task>.json and, each task from its own file, to that task's section of docs/accuracy.md.

    python -m experiments.accuracy                 # everything (the documented run)
    python -m experiments.accuracy --task input    # one task: only its own section of the doc changes
    python -m experiments.accuracy --quick         # a smoke run: tiny model, 1 seed, out/accuracy-quick
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from pockprop.artifact import safetensors
from pockprop.runtime.data import batches
from pockprop.runtime.schedule import Schedule

from experiments.drift import EXPECTED_BLOCK, TASKS, DriftTask, make_task

SCHEMES = ("full", "classifier", "bias-only", "last-k:2", "tbft-front", "tbft-middle", "tbft-rear", "searched")
DOC = "docs/accuracy.md"


@dataclass
class Config:
    """Every knob of the experiment; the same fine-tuning recipe applies to every scheme."""

    model: str = "resnet18"
    width: int = 16
    resolution: int = 32
    channels: int = 3
    batch: int = 32
    pretrain_epochs: int = 20  # PyTorch, SGD momentum 0.9, weight decay 5e-4, cosine, +-2 px shifts
    pretrain_lr: float = 0.05
    epochs: int = 10  # fine-tuning: SGD momentum 0.9, cosine from lr to 0 over all steps, no weight decay
    lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3)  # per scheme, chosen on the validation hold-out
    lr: float = 0.01  # compiled into the artifacts, and the search's / probe's fine-tuning lr
    momentum: float = 0.9
    seeds: tuple[int, ...] = (0, 1, 2)
    schemes: tuple[str, ...] = SCHEMES
    modes: tuple[str, ...] = ("frozen", "train")  # every preset row in each batch-norm mode ("train": a +bn row)
    search_batchnorm: str = "both"  # the search's and the drift probe's candidates: frozen, train or both
    val_fraction: float = 0.2  # carved from the target's train images; the search and probe see only it
    budget_fraction: float = 0.25  # the search's memory budget, as a share of full's training memory
    params_fraction: float | None = 0.10  # and its trainable-parameter budget, as a share of the model's
    ratios: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2, 1.0)
    search_epochs: float = 2.0  # the search's screening probes (its final candidates and the drift probe: the recipe)
    search_max_layers: int | None = None  # only the last N candidate layers (tests); None: every layer
    probe: bool = True
    reference: bool = True  # PyTorch's full fine-tuning (BatchNorm train mode) as the last row
    threads: int | None = None  # onnxruntime intra-op threads and PyTorch threads; None: their defaults

    def optimizer(self) -> dict[str, Any]:
        return {"name": "sgd", "lr": self.lr, "momentum": self.momentum}

    def key(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k in ("model", "width", "resolution", "channels", "batch",
                                                          "pretrain_epochs", "pretrain_lr")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


QUICK = Config(width=4, resolution=16, pretrain_epochs=2, epochs=1, seeds=(0,), lrs=(0.01,),
               schemes=("full", "classifier", "searched"), ratios=(1 / 4, 1.0), search_epochs=0.5,
               search_max_layers=4)


def log(msg: str) -> None:
    print(msg, flush=True)


# -- the model ------------------------------------------------------------------------------------

def build(cfg: Config, state: dict[str, np.ndarray] | None = None) -> Any:
    """The zoo model (10 classes), with `state` loaded if given, in eval mode (frozen BatchNorm statistics)."""
    import torch

    from pockprop.tracing.loader import ModelSpec

    width = {"width": cfg.width} if cfg.model.startswith("resnet") else {"width_mult": cfg.width}
    model = ModelSpec(f"models:{cfg.model}", {"num_classes": 10, **width}, seed=0).build()[0]
    if state is not None:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model.eval()


def pretrained_path(task: DriftTask, cfg: Config, out: str) -> str:
    """Where `pretrain` caches its weights: per source setting and config."""
    return os.path.join(out, f"pretrained-{task.source_key}-{cfg.model}-{cfg.key()}.safetensors")


def pretrain(task: DriftTask, cfg: Config, out: str) -> dict[str, np.ndarray]:
    """PyTorch pre-training on the task's source images (BatchNorm in train mode), then the BatchNorm
    statistics recalibrated on the same images; cached (`pretrained_path`) as a safetensors state_dict."""
    path = pretrained_path(task, cfg, out)
    if os.path.exists(path):
        return safetensors.load(path)[0]
    import torch

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = build(cfg).train()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.from_numpy(task.source.x), torch.from_numpy(task.source.y)
    per_epoch = len(y) // cfg.batch
    opt = torch.optim.SGD(model.parameters(), lr=cfg.pretrain_lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.pretrain_epochs * per_epoch)
    for epoch in range(cfg.pretrain_epochs):
        order, total = torch.randperm(len(y), generator=gen), 0.0
        for i in range(per_epoch):
            idx = order[i * cfg.batch:(i + 1) * cfg.batch]
            dy, dx = torch.randint(-2, 3, (2,), generator=gen).tolist()  # small translations
            loss = torch.nn.functional.cross_entropy(model(torch.roll(x[idx], (dy, dx), (2, 3))), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        log(f"  pre-train {task.source_key} epoch {epoch + 1}/{cfg.pretrain_epochs}: loss {total / per_epoch:.4f}")
    calibrate_batchnorm(model, task.source.x)
    torch.set_num_threads(threads)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    os.makedirs(out, exist_ok=True)
    safetensors.save(path, state, {"config": json.dumps(asdict(cfg)), "source": task.source_key})
    log(f"  pre-trained in {time.perf_counter() - t0:.0f}s -> {path}")
    return state


def calibrate_batchnorm(model: Any, x: np.ndarray, batch: int = 64) -> None:
    """Set BatchNorm running statistics from data (cumulative average), leaving weights untouched: pockprop
    fine-tunes with frozen statistics, so they must describe the data, not the last training batches."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(torch.from_numpy(x[i:i + batch]))
    model.eval()


# -- compile, fine-tune, measure ------------------------------------------------------------------

def training_bytes(art: Any, summary: dict[str, Any]) -> int:
    """What training adds to inference (pockprop.search.costs' definition): the trainable tensors, their
    gradients, the optimizer state and the activations kept for backward."""
    params, optim = art.state_bytes()
    return int(2 * params + optim + summary["kept_bytes"])


def label(scheme: str, mode: str) -> str:
    """A row's name: the scheme, with " +bn" when batch norm trains in train mode (pockprop.search's naming)."""
    from pockprop.search.options import mode_label

    return mode_label(scheme, mode)


def compile_scheme(state: dict[str, np.ndarray], scheme: Any, cfg: Config, directory: str,
                   batchnorm: str | None = None) -> dict[str, Any]:
    """Compile the pretrained model with `scheme` (a preset in `batchnorm` mode), save it to `directory`; its
    cost figures."""
    import torch

    from pockprop.compiler.compile import compile
    from pockprop.compiler.report import summarize

    shape = (cfg.batch, cfg.channels, cfg.resolution, cfg.resolution)
    art = compile(build(cfg, state), (torch.zeros(shape),), optimizer=cfg.optimizer(), scheme=scheme, name=cfg.model,
                  batchnorm=batchnorm)
    art.save(directory)
    s = summarize(art)
    return {"dir": directory, "trainable_percent": float(s["trainable_percent"]),
            "trainable_params": int(s["trainable_params"]), "training_bytes": training_bytes(art, s),
            "peak_bytes": int(s["peak_bytes"]), "backward_macs": int(s["backward_macs"]),
            "scheme_table": art.scheme.table() if art.scheme is not None else ""}


def finetune(art_dir: str, train: tuple[np.ndarray, np.ndarray], cfg: Config, seed: int, lr: float) -> tuple[dict[str, Any], Any]:
    """The one fine-tuning recipe: cfg.epochs epochs of full shuffled batches (order seeded by `seed`), the
    artifact's optimizer (here SGD momentum; text.py's: AdamW), cosine lr from `lr` to 0 over all steps.
    Returns the run's record and its Trainer."""
    from pockprop.runtime.trainer import Trainer

    trainer = Trainer.load(art_dir, threads=cfg.threads)
    x, y = train
    total = cfg.epochs * (len(y) // cfg.batch)
    trainer.schedule = Schedule("cosine", lr, total_steps=max(total, 1))
    times, losses = [], []
    for epoch in range(cfg.epochs):
        for bx, by in batches(x, y, cfg.batch, seed=seed * 1000 + epoch):
            t0 = time.perf_counter()
            loss = trainer.step(bx, by)
            times.append(time.perf_counter() - t0)
            if loss is not None:
                losses.append(loss)
    return {"seed": seed, "lr": lr, "steps": trainer.steps, "rejected": trainer.rejected,
            "train_loss": float(np.mean(losses[-10:])) if losses else float("nan"),
            "step_ms": float(np.median(times[2:] if len(times) > 4 else times) * 1e3) if times else 0.0}, trainer


def evaluate(trainer: Any, record: dict[str, Any], evals: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Accuracy and loss on each named split into `record` (Trainer.evaluate's figures, from one prediction
    pass); for "test" also which images were right ("test_correct", one "0"/"1" per image): paired_gap
    compares two rows image by image."""
    from pockprop.runtime.trainer import metrics

    for name, (x, y) in evals.items():
        pred, y = trainer.predict(x), np.asarray(y)
        m = metrics(trainer.manifest.loss, pred, y)
        record[f"{name}_accuracy"], record[f"{name}_loss"] = float(m["accuracy"]), float(m["loss"])
        if name == "test":
            record["test_correct"] = "".join("1" if c else "0" for c in pred.argmax(1) == y)
    return record


def paired_gap(a: list[dict[str, Any]], b: list[dict[str, Any]], boots: int = 10_000,
               seed: int = 0) -> tuple[float, float, float] | None:
    """Row a's test accuracy minus row b's in points, and its 95 % interval over test images: each image's
    correctness is averaged over the seeds in each row, and the images are resampled (a paired bootstrap:
    both rows are judged on the same resampled images). The interval is what the test set's size alone
    allows one to say about the gap; None when a run lacks its per-image record."""
    if not a or not b or any("test_correct" not in r for r in a + b):
        return None
    d = (_per_image(a) - _per_image(b)) * 100
    if len(d) == 0:
        return None
    means = d[_resamples(len(d), boots, seed)].mean(axis=1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _per_image(runs: list[dict[str, Any]]) -> np.ndarray:
    """Each test image's correctness averaged over the runs (seeds) of a row."""
    return np.mean([[c == "1" for c in r["test_correct"]] for r in runs], axis=0)


def _resamples(n: int, boots: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(boots, n))


def chance_within(s: list[dict[str, Any]], others: list[list[dict[str, Any]]], points: float = 1.0,
                  boots: int = 10_000, seed: int = 0) -> float | None:
    """How often row s is within `points` of the best of `others` on test sets resampled from this one (the
    images drawn with replacement, every row judged on the same draw): the best of many rows on one test set is
    the luckiest as much as the best, and this says how often the target would be met on another test set of
    the same size. None when a run lacks its per-image record."""
    runs = [s] + others
    if not others or any("test_correct" not in r for rs in runs for r in rs):
        return None
    per = np.stack([_per_image(rs) for rs in runs]) * 100  # rows x images
    idx = _resamples(per.shape[1], boots, seed)
    acc = np.stack([p[idx].mean(axis=1) for p in per])  # rows x resamples
    return float(np.mean(acc[0] >= acc[1:].max(axis=0) - points))


def gap_text(g: tuple[float, float, float] | None) -> str:
    """A paired_gap in words, e.g. "95 % interval over the test images -2.6 … -0.2"."""
    return f"95 % interval over the test images {g[1]:+.1f} … {g[2]:+.1f}" if g else ""


def choose_lr(art_dir: str, data: Any, cfg: Config, seed: int) -> tuple[float, list[dict[str, Any]], Any]:
    """The scheme's learning rate from cfg.lrs: the best validation accuracy after the seed's run (ties:
    the lower validation loss). The test set is not looked at. Returns the lr, every grid run, and the
    chosen run's (record, trainer), which is the seed's run of the results."""
    grid, best = [], None
    for lr in cfg.lrs:
        record, trainer = finetune(art_dir, (data.x_train, data.y_train), cfg, seed, lr)
        evaluate(trainer, record, {"val": (data.x_val, data.y_val)})
        grid.append(record)
        if best is None or (record["val_accuracy"], -record["val_loss"]) > (best[0]["val_accuracy"], -best[0]["val_loss"]):
            best = (record, trainer)
    assert best is not None
    return best[0]["lr"], grid, best


def pretrained_accuracy(art_dir: str, evals: dict[str, tuple[np.ndarray, np.ndarray]], cfg: Config) -> dict[str, float]:
    from pockprop.runtime.trainer import Trainer

    trainer = Trainer.load(art_dir, threads=cfg.threads)
    return {f"{n}_accuracy": float(trainer.evaluate(x, y)["accuracy"]) for n, (x, y) in evals.items()}


def _search_api() -> Any:
    try:
        from pockprop import search as search_api

        search_api.SearchData, search_api.search, search_api.drift_probe, search_api.FinetuneConfig  # noqa: B018
        return search_api
    except (ImportError, AttributeError) as ex:
        log(f"  pockprop.search is not available ({ex}): no searched scheme, no drift probe")
        return None


# -- one task -------------------------------------------------------------------------------------

def run_task(name: str, cfg: Config, out: str) -> dict[str, Any]:
    t_task = time.perf_counter()
    task0 = make_task(name, cfg.resolution, cfg.channels, seed=cfg.seeds[0])
    log(f"[{name}] {task0.kind} drift: {len(task0.source)} source (pre-training), {len(task0.target)} target "
        f"(fine-tuning, {cfg.val_fraction:.0%} of it held out for validation), {len(task0.test)} test images")
    state = pretrain(task0, cfg, out)
    test = (task0.test.x, task0.test.y)
    shape = (cfg.batch, cfg.channels, cfg.resolution, cfg.resolution)
    api = _search_api() if ("searched" in cfg.schemes or cfg.probe) else None

    def data_of(task: DriftTask) -> Any:
        if api is not None:
            return api.SearchData.split(task.target.x, task.target.y, val_fraction=cfg.val_fraction, seed=0)
        from types import SimpleNamespace  # the same stratified hold-out, without pockprop.search

        val = _holdout(task.target.y, cfg.val_fraction)
        keep = np.setdiff1d(np.arange(len(task.target.y)), val)
        return SimpleNamespace(x_train=task.target.x[keep], y_train=task.target.y[keep],
                               x_val=task.target.x[val], y_val=task.target.y[val])

    datas = {seed: data_of(make_task(name, cfg.resolution, cfg.channels, seed=seed) if name == "input" else task0)
             for seed in cfg.seeds}
    d0 = datas[cfg.seeds[0]]
    arts = os.path.join(out, "artifacts", f"{task0.source_key}-{cfg.key()}")
    costs: dict[str, dict[str, Any]] = {}
    for scheme in [s for s in cfg.schemes if s != "searched"] or ["full"]:
        for mode in cfg.modes:
            costs[label(scheme, mode)] = compile_scheme(state, scheme, cfg, os.path.join(
                arts, label(scheme, mode).replace(":", "-").replace(" +", "-")), mode)
    if "full" not in costs:
        costs["full"] = compile_scheme(state, "full", cfg, os.path.join(arts, "full"))
    full = costs["full"]
    result: dict[str, Any] = {"task": name, "kind": task0.kind, "config": asdict(cfg), "notes": task0.notes,
                              "images": {"source": len(task0.source), "target": len(task0.target),
                                         "fine-tune": len(d0.y_train), "validation": len(d0.y_val),
                                         "test": len(task0.test)}}
    result["pretrained"] = pretrained_accuracy(full["dir"], {"test": test, "val": (d0.x_val, d0.y_val),
                                                             "source": (task0.source.x, task0.source.y)}, cfg)
    log(f"[{name}] pre-trained model: source {100 * result['pretrained']['source_accuracy']:.1f}%, shifted test "
        f"{100 * result['pretrained']['test_accuracy']:.1f}%")
    fcfg = recipe = None
    if api is not None:
        fcfg = api.FinetuneConfig(batch=cfg.batch, epochs=cfg.search_epochs, optimizer=cfg.optimizer(), seed=0,
                                  threads=cfg.threads)
        recipe = replace(fcfg, epochs=cfg.epochs, schedule="cosine")  # finetune()'s recipe
    if api is not None and "searched" in cfg.schemes:
        budget = int(cfg.budget_fraction * full["training_bytes"])
        log(f"[{name}] search: memory budget {budget / 2**20:.3f} MiB (= {cfg.budget_fraction:g} x full's training "
            f"memory {full['training_bytes'] / 2**20:.3f} MiB), trainable parameters <= {cfg.params_fraction} of the "
            f"model's, ratios {[round(r, 4) for r in cfg.ratios]}")
        t0 = time.perf_counter()
        res = api.search(build(cfg, state), shape, d0, budget_memory=budget, ratios=cfg.ratios, config=fcfg,
                         cache_dir=os.path.join(out, "search-cache", name), progress=True,
                         max_layers=cfg.search_max_layers, budget_params=cfg.params_fraction,
                         batchnorm=cfg.search_batchnorm, recipe=recipe, lrs=cfg.lrs)
        log(res.table())
        result["search"] = {"budget_bytes": budget, "budget_params": res.budget_params, "decision": res.decision,
                            "seconds": time.perf_counter() - t0, "probe_seconds": res.probe_seconds,
                            "probes": res.probes_run, "yaml": res.yaml(), "finalists": res.finalists_table(),
                            "result": _jsonable(res.to_json())}
        costs["searched"] = compile_scheme(state, res.scheme, cfg, os.path.join(arts, f"searched-{name}"))
    if api is not None and cfg.probe:
        t0 = time.perf_counter()
        dr = api.drift_probe(build(cfg, state), shape, d0, config=fcfg, progress=True,
                             cache_dir=os.path.join(out, "search-cache", name), recipe=recipe, lrs=cfg.lrs,
                             batchnorm=cfg.search_batchnorm)
        log(dr.table())
        result["probe"] = {"block": dr.block, "batchnorm": dr.batchnorm, "expected": EXPECTED_BLOCK[name],
                           "match": dr.block == EXPECTED_BLOCK[name], "seconds": time.perf_counter() - t0,
                           "probe_seconds": dr.probe_seconds, "result": _jsonable(dr.to_json())}
        log(f"[{name}] drift probe picks {dr.block} (a {task0.kind} drift suggests {EXPECTED_BLOCK[name]})")

    rows = []
    order = [label(s, m) for s in cfg.schemes if s != "searched" for m in cfg.modes] + ["searched"]
    for scheme in [s for s in order if s in costs]:
        art_dir, first = costs[scheme]["dir"], cfg.seeds[0]
        lr, grid, chosen = choose_lr(art_dir, datas[first], cfg, first)
        log(f"[{name}] {scheme:12s} lr by validation (seed {first}): "
            + ", ".join(f"{g['lr']:g}: {100 * g['val_accuracy']:.1f}%" for g in grid) + f" -> {lr:g}")
        runs = []
        for seed in cfg.seeds:
            d = datas[seed]
            record, trainer = chosen if seed == first else finetune(art_dir, (d.x_train, d.y_train), cfg, seed, lr)
            r = evaluate(trainer, record, {"test": test, "val": (d.x_val, d.y_val)})
            runs.append(r)
            log(f"[{name}] {scheme:12s} seed {seed}: test {100 * r['test_accuracy']:.1f}%  val "
                f"{100 * r['val_accuracy']:.1f}%  loss {r['train_loss']:.3f}  {r['step_ms']:.1f} ms/step")
        c = {k: v for k, v in costs[scheme].items() if k != "dir"}
        acc = np.array([r["test_accuracy"] for r in runs]) * 100
        val = np.array([r["val_accuracy"] for r in runs]) * 100
        rows.append({"scheme": scheme, **c, "lr": lr, "lr_grid": grid, "runs": runs,
                     "test_mean": float(acc.mean()), "test_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                     "val_mean": float(val.mean()),
                     "step_ms": float(np.median([r["step_ms"] for r in runs])),
                     "memory_ratio": c["training_bytes"] / full["training_bytes"],
                     "peak_ratio": c["peak_bytes"] / full["peak_bytes"]})
    result["rows"] = rows
    if "probe" in result:  # the block that is actually best: the best tbft row on test, in the probe's mode
        tbft = [r for r in rows if r["scheme"] in [label(f"tbft-{b}", result["probe"]["batchnorm"])
                                                   for b in ("front", "middle", "rear")]]
        if tbft:
            top = max(tbft, key=lambda r: r["test_mean"])
            result["probe"]["best"] = top["scheme"]
            result["probe"]["picks_best"] = top["scheme"].split(" ")[0] == f"tbft-{result['probe']['block']}"
    if cfg.reference:
        result["reference"] = reference_row(name, cfg, out)
    result["seconds"] = time.perf_counter() - t_task
    path = os.path.join(out, f"{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    log(f"[{name}] done in {result['seconds']:.0f}s -> {path}")
    return result


def reference_row(task: str, cfg: Config, out: str) -> dict[str, Any]:
    """PyTorch's full fine-tuning with BatchNorm in train mode for `task`, with this config's recipe and grid
    (experiments/reference.py; run unless out/<...>/reference.json holds it)."""
    from experiments import reference

    row = reference.ensure(task, cfg, out)["rows"]["torch-bn-train"]
    return {"test_mean": row["mean"], "test_std": row["std"], "lr": row["lr"]}


def _holdout(y: np.ndarray, fraction: float) -> np.ndarray:
    """Stratified seeded validation indices (the rule of pockprop.search.SearchData.split)."""
    rng = np.random.default_rng([0, 0x5EA4C4])
    val = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = min(max(int(round(fraction * len(idx))), 1 if len(idx) > 1 else 0), len(idx) - 1)
        val.append(rng.permutation(idx)[:k])
    return np.sort(np.concatenate(val))


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# -- the report -----------------------------------------------------------------------------------

def markdown(results: dict[str, dict[str, Any]]) -> str:
    """Every task's section of docs/accuracy.md, in task order (out/<...>/results.md holds this)."""
    return "\n".join(task_markdown(t, results[t]) for t in TASKS if t in results)


def task_markdown(name: str, r: dict[str, Any]) -> str:
    """One task's section of docs/accuracy.md from its JSON record: its table, the searched scheme, the
    drift probe's pick and the targets. A task's section depends on nothing but its own record, so running
    one task rewrites only its own section."""
    mb = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    rows = {row["scheme"]: row for row in r["rows"]}
    full = rows.get("full")
    n = r["images"]
    lines = [f"### {name}: {r['kind']} drift", "",
             f"{n['source']} pre-training / {n['fine-tune']} fine-tuning (+{n['validation']} validation) / "
             f"{n['test']} test images; {len(r['config']['seeds'])} seeds; {r['seconds']:.0f} s.", "",
             "| scheme | test acc. % (mean ± std) | vs full | val. acc. % | lr | trainable % "
             "| training memory MiB (/ full) | est. peak MiB (/ full) | step ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| pre-trained, no fine-tuning | {100 * r['pretrained']['test_accuracy']:.1f} | | "
             f"{100 * r['pretrained']['val_accuracy']:.1f} | | 0 | | | |"]
    searched_bn = r.get("search", {}).get("result", {}).get("scheme", {}).get("batchnorm") == "train"
    for s, row in rows.items():
        delta = f"{row['test_mean'] - full['test_mean']:+.1f}" if full and s != "full" else ""
        s = label(s, "train") if s == "searched" and searched_bn else s
        lines.append(f"| {s} | {row['test_mean']:.1f} ± {row['test_std']:.1f} | {delta} | {row['val_mean']:.1f} | "
                     f"{row.get('lr', '')} | {row['trainable_percent']:.2f} | {mb(row['training_bytes'])} ({row['memory_ratio']:.3f}) | "
                     f"{mb(row['peak_bytes'])} ({row['peak_ratio']:.3f}) | {row['step_ms']:.1f} |")
    ref = r.get("reference")
    if ref:
        delta = f"{ref['test_mean'] - full['test_mean']:+.1f}" if full else ""
        lines.append(f"| full, PyTorch, BN train mode (experiments/reference.py) | {ref['test_mean']:.1f} ± "
                     f"{ref['test_std']:.1f} | {delta} | | {ref['lr']} | 100.00 | | | |")
    if "search" in r:
        sr = r["search"]
        bp = sr.get("budget_params")
        lines += ["", f"Searched scheme (budget {mb(sr['budget_bytes'])} MiB of training memory"
                  + (f" and {bp:,} trainable parameters" if bp else "")
                  + f"; search took {sr['seconds']:.0f} s, of which {sr.get('probe_seconds', 0):.0f} device-seconds "
                    f"fine-tuning {sr.get('probes', 0)} probes" + cold(sr.get("result", {}).get("cached_seconds")) + "):",
                  ""]
        if sr.get("finalists"):
            lines += ["```text", sr["finalists"].rstrip(), f"decision: {sr['decision']}", "```", ""]
        lines += ["```yaml", sr["yaml"].rstrip(), "```"]
    if "probe" in r:
        p = r["probe"]
        res = p["result"]
        acc = ", ".join(f"{k} {100 * v:.1f}%" for k, v in res.get("accuracy", {}).items())
        gap = ""
        if "best" in p:
            mode = p.get("batchnorm", "frozen")
            by = {row["scheme"]: row for row in r["rows"]}
            pick, top = by[label(f"tbft-{p['block']}", mode)], by[p["best"]]
            # the pick minus the best, seed by seed (paired: the same seed and test images), or who ties with it
            d = np.array([a["test_accuracy"] - b["test_accuracy"] for a, b in zip(pick["runs"], top["runs"])]) * 100
            ties = [k for k in (label(f"tbft-{b}", mode) for b in ("front", "middle", "rear"))
                    if k in by and by[k] is not top and abs(by[k]["test_mean"] - top["test_mean"]) < 1e-9]
            g = paired_gap(pick["runs"], top["runs"])
            apart = "" if g is None else "; the test set cannot tell them apart" if g[1] <= 0 <= g[2] \
                else "; the test set resolves it"
            gap = (f", by {-d.mean():.1f} points (seed by seed {', '.join(f'{v:+.1f}' for v in d)}"
                   + (f"; the pick minus the best: {gap_text(g)}{apart}" if g else "") + ")"
                   if not p["picks_best"] else f" (tied with {', '.join(ties)})" if ties else "")
        best = (f"; the best tbft row on test in that mode is {p['best']}: "
                f"{'picks the best' if p['picks_best'] else 'NOT the best'}{gap}") if "best" in p else ""
        lines += ["", f"Drift probe ({p.get('probe_seconds', 0):.0f} device-seconds{cold(res.get('cached_seconds'))}): "
                  f"picks **{p['block']}**"
                  f"{' with BN train mode' if p.get('batchnorm') == 'train' else ''} (the TBFT block for {r['kind']} "
                  f"drift is {p['expected']}: {'match' if p['match'] else 'no match'}{best}); validation accuracy "
                  f"with the recipe: {acc}" + (f"; on validation the pick is {res['margin']}" if res.get("margin") else "")
                  + "."]
    lines += ["", "Targets: " + target_line(rows, ref), ""]
    return "\n".join(lines)


def cold(cached: float | None) -> str:
    """What the probes read from the cache took when they ran, if any: a warm run's device-seconds alone
    understate a cold one."""
    return f"; {cached:.0f} more device-seconds of probes came from the cache (what they took when they ran)" \
        if cached else ""


def target_line(rows: dict[str, dict[str, Any]], reference: dict[str, Any] | None = None) -> str:
    """The targets for one task's rows: the searched scheme within 1 point of every other row (each preset in
    each mode, both full rows, PyTorch's reference) and within the budgets; met or missed, with the numbers."""
    s, f = rows.get("searched"), rows.get("full")
    if not (s and f):
        return "no searched scheme in this run"
    others = {k: v["test_mean"] for k, v in rows.items() if k != "searched"}
    if reference:
        others["PyTorch full, BN train"] = reference["test_mean"]
    top = max(others, key=lambda k: others[k])
    gap = s["test_mean"] - others[top]
    g = paired_gap(s["runs"], rows[top]["runs"]) if top in rows else None
    resolved = "" if g is None else "; the test set cannot tell whether it is within 1 point" \
        if g[1] <= -1.0 <= g[2] else "; the test set resolves it"
    chance = chance_within(s["runs"], [v["runs"] for k, v in rows.items() if k != "searched"])
    if chance is not None:
        resolved += f"; within 1 point of the best other row on {100 * chance:.0f} % of resampled test sets"
    checks = [(f"within 1 point of the best other row ({top}, {others[top]:.1f})", gap >= -1.0,
               f"{gap:+.1f} points" + (f", {gap_text(g)}{resolved}" if g else "")),
              ("≤ 10 % of the weights trained", s["trainable_percent"] <= 10.0, f"{s['trainable_percent']:.2f} %"),
              ("≤ 1/4 of full's training memory", s["memory_ratio"] <= 0.25, f"{s['memory_ratio']:.3f} x full")]
    return "; ".join(f"{what}: **{'met' if ok else 'MISSED'}** ({num})" for what, ok, num in checks)


def markers(task: str) -> tuple[str, str]:
    """The begin and end markers of one task's section in docs/accuracy.md."""
    return (f"<!-- accuracy-results:{task}:begin (make accuracy ARGS='--task {task}' writes this part) -->",
            f"<!-- accuracy-results:{task}:end -->")


def update_doc(path: str, text: str, begin: str, end: str) -> bool:
    """Replace what lies between the markers `begin` and `end` of `path` with `text`; False if the doc has
    no such markers."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        doc = f.read()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(doc):
        return False
    with open(path, "w") as f:
        f.write(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", doc))
    return True


def experiment_parser(prog: str, description: str, name: str, doc: str, quick: str,
                      schemes: str) -> argparse.ArgumentParser:
    """The options every experiment shares: --quick, --schemes, --seeds, --epochs, --tables-only, --out, --doc
    (`name`: the folder under out/; `quick`: what a smoke run is; `schemes`: the default list, in words)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--quick", action="store_true", help=f"a smoke run: {quick}, out/{name}-quick")
    p.add_argument("--schemes", help=f"comma-separated schemes (default: {schemes})")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--epochs", type=int)
    p.add_argument("--tables-only", action="store_true", help="run nothing: rebuild the tables from the results")
    p.add_argument("--out", help=f"output folder (default out/{name}, --quick: out/{name}-quick)")
    p.add_argument("--doc", help=f"markdown file to write the tables into (default {doc}; never with --quick)")
    return p


def experiment_config(cfg: Any, args: argparse.Namespace) -> Any:
    """`cfg` (a dataclass with schemes, seeds, epochs) with what --schemes, --seeds and --epochs override."""
    if args.schemes:
        cfg = replace(cfg, schemes=tuple(s.strip() for s in args.schemes.split(",") if s.strip()))
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.epochs:
        cfg = replace(cfg, epochs=args.epochs)
    return cfg


def run_and_document(args: argparse.Namespace, out: str, run: Any, markdown: Any, doc: str, begin: str,
                     end: str) -> dict[str, Any]:
    """The tail of a one-table experiment's main: `run()` (or, with --tables-only, out/results.json), its
    `markdown(result)` written between `begin` and `end` of the doc (--doc, else `doc`; never with --quick),
    or printed when there is no doc to write. Returns the result."""
    if args.tables_only:
        with open(os.path.join(out, "results.json")) as f:
            result = json.load(f)
    else:
        result = run()
    text = markdown(result)
    path = args.doc or (None if args.quick else doc)
    if path and update_doc(path, text, begin, end):
        log(f"table written into {path}")
    else:
        log(text)
    return result


def main(argv: list[str] | None = None) -> int:
    p = experiment_parser("python -m experiments.accuracy", __doc__.splitlines()[0], "accuracy", DOC,
                          "tiny model, 1 seed, 1 epoch", "all; 'searched' runs the search")
    p.add_argument("--task", action="append", choices=TASKS, help="run only this task (repeatable; default all)")
    p.add_argument("--no-probe", action="store_true")
    args = p.parse_args(argv)
    cfg = experiment_config(QUICK if args.quick else Config(), args)
    if args.no_probe:
        cfg = replace(cfg, probe=False)
    out = args.out or ("out/accuracy-quick" if args.quick else "out/accuracy")
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    for name in [] if args.tables_only else args.task or TASKS:
        run_task(name, cfg, out)
    results = {}
    for name in TASKS:
        path = os.path.join(out, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[name] = json.load(f)
    text = markdown(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    doc = args.doc or (None if args.quick else DOC)
    # each task's own section only: a task that did not run here keeps what the doc says of it
    written = [t for t in results if doc and update_doc(doc, task_markdown(t, results[t]), *markers(t))]
    if written:
        log(f"tables of {', '.join(written)} written into {doc}")
    if set(written) != set(results):
        log(text)
    log(f"total {time.perf_counter() - t0:.0f}s; results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
