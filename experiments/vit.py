"""`make vit`: LoRA and a soft prompt on a small ViT against full fine-tuning, through the device runtime.

The task is experiments/drift.py's feature-level drift of scikit-learn's digits (a writing-style
subpopulation shift: each class's larger style cluster is the source, its other cluster the target),
upsampled to 16x16 and cut into 4x4 patches. A small ViT (`models:vit_tiny` with the kwargs of Config) is
pre-trained in PyTorch on the source images (cached as safetensors under out/vit/); every row is compiled
from those weights and fine-tuned on the target images by runtime.Trainer (onnxruntime), with one recipe
(accuracy.py's `finetune`: AdamW, epochs of shuffled full batches, cosine to 0) and the learning rate chosen
per row on a validation hold-out of the target images (seed 0), then 3 seeds. Rows:

``full``     every weight.
``lora``     `compile(lora=...)`: r=8, alpha=16 on the attention's query and value projections
             (`vit.layers.N.attention.q_proj` / `v_proj` in transformers 5), plus the classifier head trained, as
             peft's `modules_to_save=["classifier"]` does for a classification model.
``prompt:P`` a soft prompt of P tokens after [CLS] (VPT-shallow, compiler/prompt.py), plus the head.
``lora+mlp`` the same adapters also on the MLP's two linear layers (`fc1`, `fc2`); ``lora+mlp:R`` (and
             ``lora:R``) at rank R instead of 8, alpha 2R.

    python -m experiments.vit            # the documented run: out/vit/results.json, docs/accuracy.md's ViT table
    python -m experiments.vit --quick    # a smoke run: tiny model, few steps, out/vit-quick, doc untouched
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace
from typing import Any

# PyTorch's OpenMP threads sleep between ops (see experiments/text.py); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from experiments.accuracy import (_holdout, choose_lr, evaluate, experiment_config, experiment_parser,  # noqa: E402
                                  finetune, pretrained_accuracy, run_and_document)
from experiments.drift import make_task  # noqa: E402

DOC = "docs/accuracy.md"
BEGIN, END = "<!-- vit-results:begin (python -m experiments.vit writes this part) -->", "<!-- vit-results:end -->"
TASK = "feature"
HEAD = "classifier.*"  # the classification head: trained beside the adapters / the prompt (peft's modules_to_save)
# transformers 5's ViT names its layers vit.layers.N.attention.{q,k,v,o}_proj and vit.layers.N.mlp.fc{1,2}
QV = ("q_proj", "v_proj")
MLP = ("fc1", "fc2")


@dataclass
class Config:
    """Every knob; one fine-tuning recipe for every row (only the learning rate is chosen per row)."""

    resolution: int = 16
    patch: int = 4
    hidden: int = 160  # at width 128, q/v adapters of r=8 alone are 2.1 % of a block (32d / 12d^2): over 2 %
    layers: int = 3
    heads: int = 4
    intermediate: int = 640
    pretrain_epochs: int = 40  # PyTorch AdamW, weight decay 0.05, one-cycle lr (10 % warm-up), +-1 px shifts
    pretrain_lr: float = 1e-3
    pretrain_batch: int = 64
    batch: int = 32  # fine-tuning, compiled into the artifacts
    epochs: int = 10  # AdamW without weight decay (the artifact's), cosine to 0
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)  # full
    lora_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # adapters start at B = 0
    prompt_lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    seeds: tuple[int, ...] = (0, 1, 2)
    # lora+mlp:2 and lora+mlp: the change tried after `lora` missed (docs/accuracy.md), within 2 % and beyond
    schemes: tuple[str, ...] = ("full", "lora", "lora+mlp:2", "lora+mlp", "prompt:8")
    r: int = 8  # alpha = 2r: r=8, alpha=16
    val_fraction: float = 0.2
    threads: int | None = 2

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_classes": 10, "image_size": self.resolution, "patch_size": self.patch, "hidden": self.hidden,
                "layers": self.layers, "heads": self.heads, "intermediate": self.intermediate, "channels": 1}

    def key(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k in ("resolution", "patch", "hidden", "layers", "heads",
                                                              "intermediate", "pretrain_epochs", "pretrain_lr",
                                                              "pretrain_batch")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]

    def lrs_of(self, scheme: str) -> tuple[float, ...]:
        return self.lora_lrs if scheme.startswith("lora") else self.prompt_lrs if scheme.startswith("prompt:") \
            else self.lrs


QUICK = Config(hidden=16, layers=1, heads=2, intermediate=32, pretrain_epochs=1, epochs=1, lrs=(1e-3,),
               lora_lrs=(1e-2,), prompt_lrs=(1e-2,), seeds=(0,), schemes=("full", "lora", "prompt:2"), threads=1)


def log(msg: str) -> None:
    print(msg, flush=True)


def build(cfg: Config, state: dict[str, np.ndarray] | None = None) -> Any:
    import torch

    from pockprop.tracing.loader import ModelSpec

    model = ModelSpec("models:vit_tiny", cfg.model_kwargs(), seed=0).build()[0]
    if state is not None:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model.eval()


def pretrain(cfg: Config, x: np.ndarray, y: np.ndarray, path: str) -> dict[str, np.ndarray]:
    """AdamW on the source images with +-1 px random shifts; cached at `path` (safetensors)."""
    from pockprop.artifact import safetensors

    if os.path.exists(path):
        return safetensors.load(path)[0]
    import torch

    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    model = build(cfg).train()
    gen = torch.Generator().manual_seed(0)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    per_epoch = max(len(ty) // cfg.pretrain_batch, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.pretrain_lr, total_steps=cfg.pretrain_epochs * per_epoch,
                                                pct_start=0.1)
    for epoch in range(cfg.pretrain_epochs):
        order, total = torch.randperm(len(ty), generator=gen), 0.0
        for i in range(per_epoch):
            idx = order[i * cfg.pretrain_batch:(i + 1) * cfg.pretrain_batch]
            dy, dx = torch.randint(-1, 2, (2,), generator=gen).tolist()
            loss = torch.nn.functional.cross_entropy(model(torch.roll(tx[idx], (dy, dx), (2, 3))), ty[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        if (epoch + 1) % 10 == 0 or epoch + 1 == cfg.pretrain_epochs:
            log(f"  pre-train epoch {epoch + 1}/{cfg.pretrain_epochs}: loss {total / per_epoch:.4f}")
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    safetensors.save(path, state, {"config": json.dumps(asdict(cfg))})
    log(f"  pre-trained in {time.perf_counter() - t0:.0f}s -> {path}")
    return state


def lora_row(scheme: str, r: int) -> tuple[tuple[str, ...], int]:
    """The targets and rank of a LoRA row: `lora` (q, v), `lora+mlp` (q, v, fc1, fc2), either with `:R` for a
    rank other than `r`; alpha is always 2r (the scale alpha/r stays 2, as r=8, alpha=16)."""
    name, _, rank = scheme.partition(":")
    if name not in ("lora", "lora+mlp") or (rank and not rank.isdigit()):
        raise ValueError(f"unknown LoRA row {scheme!r}: lora[+mlp][:R]")
    return QV + (MLP if name == "lora+mlp" else ()), int(rank) if rank else r


def compile_row(cfg: Config, state: dict[str, np.ndarray], scheme: str, directory: str) -> dict[str, Any]:
    """Compile one row from the pre-trained weights; its directory and trainable share."""
    import torch

    from pockprop.compiler.compile import compile
    from pockprop.compiler.prompt import prompt_scheme

    example = (torch.zeros((cfg.batch, 1, cfg.resolution, cfg.resolution)),)
    how: dict[str, Any] = {}
    if scheme.startswith("lora"):
        targets, r = lora_row(scheme, cfg.r)
        how = {"lora": {"r": r, "alpha": 2 * r, "targets": list(targets)}, "trainable": HEAD}
    elif (tokens := prompt_scheme(scheme)) is not None:
        how = {"prompt": {"tokens": tokens, "init": "random"}, "trainable": HEAD}
    elif scheme != "full":
        how = {"scheme": scheme}
    art = compile(build(cfg, state), example, optimizer={"name": "adamw", "lr": cfg.lrs[0], "weight_decay": 0.0},
                  name="vit_tiny", **how)
    art.save(directory)
    total = sum(art.parameter_count.values())
    return {"dir": directory, "trainable_params": int(art.trainable_count), "tensors": len(art.trainable),
            "model_params": int(total)}


def run(cfg: Config, out: str) -> dict[str, Any]:
    t_run = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    task = make_task(TASK, cfg.resolution, 1)
    val = _holdout(task.target.y, cfg.val_fraction)
    keep = np.setdiff1d(np.arange(len(task.target.y)), val)
    data = SimpleNamespace(x_train=task.target.x[keep], y_train=task.target.y[keep],
                           x_val=task.target.x[val], y_val=task.target.y[val])
    images = {"source": len(task.source), "fine-tune": len(keep), "validation": len(val), "test": len(task.test)}
    log(f"{task.kind} drift at {cfg.resolution}x{cfg.resolution}: {images}")
    state = pretrain(cfg, task.source.x, task.source.y, os.path.join(out, f"pretrained-{cfg.key()}.safetensors"))
    arts = {s: compile_row(cfg, state, s, os.path.join(out, "artifacts", cfg.key(), s.replace(":", "-")))
            for s in dict.fromkeys(("full",) + tuple(cfg.schemes))}
    evals = {"test": (task.test.x, task.test.y), "val": (data.x_val, data.y_val),
             "source": (task.source.x, task.source.y)}
    before = pretrained_accuracy(arts["full"]["dir"], evals, cfg)
    log(f"pre-trained: source {100 * before['source_accuracy']:.1f}%, test {100 * before['test_accuracy']:.1f}%")
    base = arts["full"]["model_params"]  # every row's share is of the model's own weights (no adapter, no prompt)
    rows = []
    for scheme in cfg.schemes:
        arts[scheme]["trainable_percent"] = 100.0 * arts[scheme]["trainable_params"] / base
        lr, grid, best = choose_lr(arts[scheme]["dir"], data, replace(cfg, lrs=cfg.lrs_of(scheme)), cfg.seeds[0])
        log(f"{scheme:9s} lr by validation accuracy: "
            + ", ".join(f"{g['lr']:g}: {100 * g['val_accuracy']:.1f}%" for g in grid) + f" -> {lr:g}")
        runs = []
        for seed in cfg.seeds:
            record, trainer = (best if seed == cfg.seeds[0] else
                               finetune(arts[scheme]["dir"], (data.x_train, data.y_train), cfg, seed, lr))
            evaluate(trainer, record, evals)
            runs.append(record)
            log(f"{scheme:9s} seed {seed}: test {100 * record['test_accuracy']:.1f}%, source "
                f"{100 * record['source_accuracy']:.1f}%, {record['steps']} steps, {record['step_ms']:.1f} ms/step")
        test = 100 * np.array([r["test_accuracy"] for r in runs])
        rows.append({"scheme": scheme, **{k: v for k, v in arts[scheme].items() if k != "dir"}, "lr": lr,
                     "lr_grid": grid, "runs": runs, "test_mean": float(test.mean()),
                     "test_std": float(test.std(ddof=1)) if len(test) > 1 else 0.0,
                     "test_loss": float(np.mean([r["test_loss"] for r in runs])),
                     "source_mean": float(100 * np.mean([r["source_accuracy"] for r in runs])),
                     "step_ms": float(np.median([r["step_ms"] for r in runs]))})
    result = {"config": asdict(cfg), "task": TASK, "images": images, "before": before, "rows": rows,
              "model_params": arts["full"]["model_params"], "seconds": time.perf_counter() - t_run}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    log(f"done in {result['seconds']:.0f}s -> {out}/results.json")
    return result


def target(row: dict[str, Any], full: dict[str, Any], r: int) -> str:
    """The issue's check for a LoRA row: within 1 point of full's test accuracy with <= 2 % trainable (a row
    over 2 % misses whatever its accuracy); the row's rank is named, since the issue asks it of r=8."""
    gap = row["test_mean"] - full["test_mean"]
    met = gap >= -1.0 and row["trainable_percent"] <= 2.0
    rank = lora_row(row["scheme"], r)[1]
    return f"{'met' if met else 'missed'} (r={rank}: {gap:+.1f} points, {row['trainable_percent']:.2f} % trainable)"


def markdown(r: dict[str, Any]) -> str:
    c, b, n = r["config"], r["before"], r["images"]
    lines = [f"{n['source']} pre-training / {n['fine-tune']} fine-tuning (+{n['validation']} validation) / "
             f"{n['test']} test images at {c['resolution']}x{c['resolution']}. Model: `vit_tiny`, patches "
             f"{c['patch']}x{c['patch']}, {c['layers']} layers, width {c['hidden']}, {c['heads']} heads, MLP "
             f"{c['intermediate']} ({r['model_params']:,} parameters); {c['epochs']} epochs, batch {c['batch']}; "
             f"{len(c['seeds'])} seeds; {r['seconds']:.0f} s in all.", "",
             "| row | test acc. % (mean ± std) | vs full | test loss | source acc. % | lr | trainable % | tensors "
             "| step ms | LoRA target |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
             f"| pre-trained, no fine-tuning | {100 * b['test_accuracy']:.1f} | | | {100 * b['source_accuracy']:.1f} "
             "| | 0 | | | |"]
    full = next((row for row in r["rows"] if row["scheme"] == "full"), None)
    for row in r["rows"]:
        delta = f"{row['test_mean'] - full['test_mean']:+.1f}" if full and row is not full else ""
        check = target(row, full, c["r"]) if full and row["scheme"].startswith("lora") else ""
        lines.append(f"| {row['scheme']} | {row['test_mean']:.1f} ± {row['test_std']:.1f} | {delta} | "
                     f"{row['test_loss']:.4f} | {row['source_mean']:.1f} | {row['lr']:g} | "
                     f"{row['trainable_percent']:.2f} | {row['tensors']} | {row['step_ms']:.1f} | {check} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = experiment_parser("python -m experiments.vit", __doc__.splitlines()[0], "vit", DOC,
                          "tiny model, few steps", "full,lora,lora+mlp:2,lora+mlp,prompt:8")
    args = p.parse_args(argv)
    cfg = experiment_config(QUICK if args.quick else Config(), args)
    out = args.out or ("out/vit-quick" if args.quick else "out/vit")
    run_and_document(args, out, lambda: run(cfg, out), markdown, DOC, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
