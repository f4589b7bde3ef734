"""`make text`: fine-tune a tiny Llama on real text through the device runtime, full vs sparse schemes and LoRA.

The corpus is Python's own reference documentation as the standard library ships it (`pydoc_data.topics`,
the text `help('TOPIC')` shows): no download, no extra package, and a domain shift inside one corpus. The
Language Reference topics (statements, expressions, the data model) pre-train a small Llama-shaped model in
PyTorch (cached as safetensors under out/text/); the Library Reference topics (built-in types and their
methods, the format-string mini-language, pdb) are the new domain, split into fine-tuning, validation and
test windows. Every scheme is compiled from the pre-trained weights (`models:llama_small` with the
experiment's kwargs and --weights, as `pockprop compile` does) and fine-tuned by runtime.Trainer
(onnxruntime), with the learning rate chosen per scheme on the validation windows; the test loss and
perplexity before and after go to out/text/results.json and the tables of docs/accuracy.md.

    python -m experiments.text            # the documented run (8 minutes on a busy 2-core VM)
    python -m experiments.text --quick    # a smoke run: tiny model, few steps, out/text-quick, doc untouched
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

# PyTorch's OpenMP threads sleep between ops, as the runtime's onnxruntime threads do (runtime/session.py):
# on a shared machine, spinning threads make pre-training several times slower. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

# The fine-tuning recipe (epochs of shuffled full batches, cosine to 0) is accuracy.py's: the optimizer is the
# artifact's (AdamW here, compile_schemes).
from experiments.accuracy import experiment_config, experiment_parser, finetune, run_and_document  # noqa: E402

DOC = "docs/accuracy.md"
BEGIN, END = "<!-- text-results:begin (python -m experiments.text writes this part) -->", "<!-- text-results:end -->"
IGNORE = -100  # labels that do not count (HF's convention, the loss's ignore_index)

# pydoc topics from the Library Reference (Doc/library/stdtypes.rst, string.rst, pdb.rst); every other topic
# is from the Language Reference.
LIBRARY = frozenset({"truth", "typesfunctions", "typesmapping", "typesmethods", "typesmodules", "typesseq",
                     "typesseq-mutable", "bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object",
                     "bltin-type-objects", "specialattrs", "string-methods", "formatstrings", "debugger"})
SPLIT_CYCLE = ("train",) * 7 + ("val",) + ("test",) * 2  # window k of a library topic -> SPLIT_CYCLE[k % 10]


@dataclass
class Config:
    """Every knob; one fine-tuning recipe for every scheme (only the learning rate is chosen per scheme)."""

    vocab: int = 512  # byte-level BPE trained on the pre-training text, end-of-text token included
    seq: int = 128
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    pretrain_steps: int = 400  # PyTorch AdamW (0.9, 0.95), weight decay 0.1, 20-step warmup, cosine
    pretrain_batch: int = 8
    pretrain_lr: float = 3e-3
    batch: int = 8  # fine-tuning, compiled into the artifacts
    epochs: int = 3  # over the fine-tuning windows; AdamW, no weight decay, cosine to 0
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    schemes: tuple[str, ...] = ("full", "sparse", "last-k:1", "lora", "prompt:16")  # prompt:P: a soft prompt of P tokens
    # the `lora` row: compile(lora=...) on the attention's q and v projections (docs/peft.md); adapters
    # start at B = 0 and learn from scratch, so their learning-rate grid sits higher than the others'
    lora: tuple[tuple[str, Any], ...] = (("r", 8), ("alpha", 16), ("targets", ("q_proj", "v_proj")))
    lora_lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    prompt_lrs: tuple[float, ...] = (1e-2, 3e-2, 1e-1)  # a prompt alone learns at larger rates (Lester et al.: 0.3)
    threads: int | None = 2  # onnxruntime intra-op threads and PyTorch threads
    max_chars: int | None = None  # the corpus cut to this many characters per domain (smoke runs)

    def model_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab, "hidden": self.hidden, "layers": self.layers, "heads": self.heads,
                "max_positions": self.seq}

    def key(self, corpus_sha: str) -> str:
        d = {k: v for k, v in asdict(self).items()
             if k in ("vocab", "seq", "hidden", "layers", "heads", "pretrain_steps", "pretrain_batch", "pretrain_lr",
                      "max_chars")}
        return hashlib.sha256(json.dumps([d, corpus_sha], sort_keys=True).encode()).hexdigest()[:10]


QUICK = Config(vocab=300, seq=32, hidden=16, layers=2, heads=2, pretrain_steps=10, pretrain_batch=8, batch=4,
               epochs=1, lrs=(3e-3,), lora_lrs=(1e-2,), prompt_lrs=(3e-2,), seeds=(0,), threads=1, max_chars=5_000)


def log(msg: str) -> None:
    print(msg, flush=True)


# -- the corpus ------------------------------------------------------------------------------------

def corpus(max_chars: int | None = None) -> dict[str, dict[str, str]]:
    """{"reference": {topic: text}, "library": {topic: text}}: each topic's paragraphs, every paragraph kept at
    its first occurrence only (topics repeat each other: "if" is part of "compound"), Language Reference
    topics first, so no library paragraph also appears in the pre-training text. Topics in sorted order;
    max_chars cuts each domain after that many characters."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out: dict[str, dict[str, str]] = {"reference": {}, "library": {}}
    for domain in out:
        size = 0
        for name in sorted(topics):
            if (name in LIBRARY) != (domain == "library") or (max_chars and size >= max_chars):
                continue
            keep = []
            for p in (p.strip() for p in re.split(r"\n\s*\n", topics[name])):
                if p and p not in seen:
                    seen.add(p)
                    keep.append(p)
            if keep:
                out[domain][name] = "\n\n".join(keep)
                size += len(out[domain][name])
    return out


def sha256_of(texts: dict[str, dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()


def tokenizer(texts: dict[str, str], vocab: int, path: str) -> Any:
    """A byte-level BPE of `vocab` ids (id 0: <|endoftext|>) trained on `texts` with the tokenizers package;
    cached at `path` (tokenizer.json, what a device loads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if os.path.exists(path):
        return Tokenizer.from_file(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([texts[k] for k in sorted(texts)], trainer)
    tok.save(path)
    return tok


def encode(tok: Any, text: str) -> np.ndarray:
    """Token ids of `text` followed by <|endoftext|> (id 0)."""
    return np.array(tok.encode(text).ids + [0], np.int64)


def windows(ids: np.ndarray, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Next-token windows of one document: x = ids[k*seq:(k+1)*seq], y = the ids one further; the last
    window is padded (x with <|endoftext|>, y with IGNORE), so every token is predicted exactly once."""
    n = max(1, math.ceil((len(ids) - 1) / seq))
    x = np.zeros((n, seq), np.int64)
    y = np.full((n, seq), IGNORE, np.int64)
    for k in range(n):
        chunk = ids[k * seq:(k + 1) * seq + 1]
        x[k, :len(chunk) - 1], y[k, :len(chunk) - 1] = chunk[:-1], chunk[1:]
    return x, y


def datasets(texts: dict[str, dict[str, str]], tok: Any, seq: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The pre-training stream, and the (x, y) windows of every split. Library topics: window k of a topic goes to
    SPLIT_CYCLE[k % 10] (70 % fine-tuning, 10 % validation, 20 % test, spread over every topic). Reference
    topics: the last 10 % of the stream is held out (`source`, to see what fine-tuning forgets)."""
    stream = np.concatenate([encode(tok, texts["reference"][k]) for k in sorted(texts["reference"])])
    cut = int(0.9 * len(stream))
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "val": [], "test": []}
    for name in sorted(texts["library"]):
        x, y = windows(encode(tok, texts["library"][name]), seq)
        for k in range(len(x)):
            parts[SPLIT_CYCLE[k % len(SPLIT_CYCLE)]].append((x[k], y[k]))
    out = {s: (np.stack([a for a, _ in v]), np.stack([b for _, b in v])) for s, v in parts.items()}
    out["source"] = windows(stream[cut:], seq)
    return stream[:cut], out


# -- pre-training (PyTorch) --------------------------------------------------------------------------

def build(cfg: Config, weights: str | None = None) -> Any:
    from pockprop.tracing.loader import ModelSpec

    return ModelSpec("models:llama_small", cfg.model_kwargs(), seed=0, weights=weights).build()[0].eval()


def pretrain(cfg: Config, stream: np.ndarray, path: str) -> None:
    """AdamW on random windows of the pre-training stream; the weights saved as safetensors at `path`."""
    import torch

    from pockprop.artifact import safetensors

    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = build(cfg).train()
    gen = torch.Generator().manual_seed(0)
    data = torch.from_numpy(stream)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = min(20, cfg.pretrain_steps // 5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / max(warm, 1), 0.5 * (1 + math.cos(
        math.pi * min(s / cfg.pretrain_steps, 1.0)))))
    running = None
    for step in range(cfg.pretrain_steps):
        start = torch.randint(0, len(data) - cfg.seq - 1, (cfg.pretrain_batch,), generator=gen)
        w = torch.stack([data[s:s + cfg.seq + 1] for s in start.tolist()])
        logits = model(w[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % 50 == 0 or step + 1 == cfg.pretrain_steps:
            log(f"  pre-train step {step + 1}/{cfg.pretrain_steps}: loss {running:.3f}")
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    safetensors.save(path, state, {"config": json.dumps(asdict(cfg))})
    log(f"  pre-trained in {time.perf_counter() - t0:.0f}s -> {path}")


# -- fine-tuning (the device runtime) -----------------------------------------------------------------

def compile_schemes(cfg: Config, weights: str, out: str) -> dict[str, dict[str, Any]]:
    """Every scheme compiled from the pre-trained weights, traced once (a prompt row: traced with its prompt);
    directory and cost of each."""
    import torch

    from pockprop.compiler.compile import compile_traced, trace_model
    from pockprop.compiler.prompt import prompt_scheme
    from pockprop.tracing.loader import ModelSpec

    spec = ModelSpec("models:llama_small", cfg.model_kwargs(), seed=0, weights=weights)
    traced = trace_model(build(cfg, weights), (torch.zeros((cfg.batch, cfg.seq), dtype=torch.int64),))
    opt = {"name": "adamw", "lr": cfg.lrs[0], "weight_decay": 0.0}
    arts = {}
    example = (torch.zeros((cfg.batch, cfg.seq), dtype=torch.int64),)
    for scheme in dict.fromkeys(("full",) + tuple(cfg.schemes)):
        tokens = prompt_scheme(scheme)  # prompt:P: P trained embeddings before the text, nothing else
        if tokens is not None:  # the prompt's parameter, initialised from token embeddings, and nothing else
            tm = trace_model(build(cfg, weights), example, prompt={"tokens": tokens, "init": "vocab"})
            art = compile_traced(tm, optimizer=opt, name="llama_small")
        else:
            how = {"lora": dict(cfg.lora)} if scheme == "lora" else {"scheme": scheme}
            art = compile_traced(traced, optimizer=opt, name="llama_small", **how)
        art.source = spec.source() if tokens is None else None  # the prompt is not in the model spec
        directory = art.save(os.path.join(out, scheme.replace(":", "-")))
        total = sum(art.parameter_count.values())
        arts[scheme] = {"dir": directory, "trainable_params": int(art.trainable_count),
                        "trainable_percent": 100.0 * art.trainable_count / total, "tensors": len(art.trainable)}
    return arts


def heldout(trainer: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Mean next-token cross-entropy (nats) over the counted labels of (x, y), from the device's predictions."""
    total, count = 0.0, 0
    for i in range(0, len(x), 64):
        logits = trainer.predict(x[i:i + 64]).astype(np.float64)
        yy = y[i:i + 64].reshape(-1)
        keep = yy != IGNORE
        z = logits.reshape(-1, logits.shape[-1])[keep]
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        total -= float(logp[np.arange(len(z)), yy[keep]].sum())
        count += int(keep.sum())
    return total / count


def run(cfg: Config, out: str) -> dict[str, Any]:
    t_run = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    texts = corpus(cfg.max_chars)
    sha = sha256_of(texts)
    key = cfg.key(sha)
    tok = tokenizer(texts["reference"], cfg.vocab, os.path.join(out, f"tokenizer-{key}.json"))
    stream, data = datasets(texts, tok, cfg.seq)
    chars = {d: sum(map(len, t.values())) for d, t in texts.items()}
    counts = {s: int((data[s][1] != IGNORE).sum()) for s in ("train", "val", "test", "source")}
    counts["pretrain"] = len(stream)
    log(f"corpus: pydoc_data.topics of Python {sys.version.split()[0]} (sha256 {sha[:12]}): reference "
        f"{len(texts['reference'])} topics, {chars['reference']:,} characters; library {len(texts['library'])} "
        f"topics, {chars['library']:,} characters; tokens {counts}")
    weights = os.path.join(out, f"pretrained-{key}.safetensors")
    if not os.path.exists(weights):
        pretrain(cfg, stream, weights)
    np.savez(os.path.join(out, "finetune-train.npz"), x=data["train"][0], y=data["train"][1])
    np.savez(os.path.join(out, "finetune-test.npz"), x=data["test"][0], y=data["test"][1])
    arts = compile_schemes(cfg, weights, os.path.join(out, "artifacts", key))

    from pockprop.runtime.trainer import Trainer

    base = Trainer.load(arts["full"]["dir"], threads=cfg.threads)
    before = {s: heldout(base, *data[s]) for s in ("test", "val", "source")}
    log(f"pre-trained: test loss {before['test']:.4f} (perplexity {math.exp(before['test']):.2f}), source held-out "
        f"{before['source']:.4f}")
    rows = []
    for scheme in cfg.schemes:
        grid, best = [], None
        lrs = cfg.lora_lrs if scheme == "lora" else cfg.prompt_lrs if scheme.startswith("prompt:") else cfg.lrs
        for lr in lrs:  # seed cfg.seeds[0]; the lowest validation loss wins
            record, trainer = finetune(arts[scheme]["dir"], data["train"], cfg, cfg.seeds[0], lr)
            record["val_loss"] = heldout(trainer, *data["val"])
            grid.append(record)
            if best is None or record["val_loss"] < best[0]["val_loss"]:
                best = (record, trainer)
        assert best is not None
        lr = best[0]["lr"]
        log(f"{scheme:9s} lr by validation loss: " + ", ".join(f"{g['lr']:g}: {g['val_loss']:.4f}" for g in grid)
            + f" -> {lr:g}")
        runs = []
        for seed in cfg.seeds:
            record, trainer = (best if seed == cfg.seeds[0] else
                               finetune(arts[scheme]["dir"], data["train"], cfg, seed, lr))
            record["test_loss"] = heldout(trainer, *data["test"])
            record["source_loss"] = heldout(trainer, *data["source"])
            runs.append(record)
            log(f"{scheme:9s} seed {seed}: test loss {record['test_loss']:.4f} (perplexity "
                f"{math.exp(record['test_loss']):.2f}), source {record['source_loss']:.4f}, {record['steps']} steps, "
                f"{record['step_ms']:.1f} ms/step")
        test = np.array([r["test_loss"] for r in runs])
        rows.append({"scheme": scheme, **{k: v for k, v in arts[scheme].items() if k != "dir"}, "lr": lr,
                     "lr_grid": grid, "runs": runs, "test_mean": float(test.mean()),
                     "test_std": float(test.std(ddof=1)) if len(test) > 1 else 0.0,
                     "source_mean": float(np.mean([r["source_loss"] for r in runs])),
                     "step_ms": float(np.median([r["step_ms"] for r in runs]))})
    result = {"config": asdict(cfg), "python": sys.version.split()[0], "corpus_sha256": sha, "characters": chars,
              "topics": {d: sorted(t) for d, t in texts.items()}, "tokens": counts, "windows":
              {s: len(data[s][0]) for s in ("train", "val", "test", "source")}, "before": before, "rows": rows,
              "seconds": time.perf_counter() - t_run}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    log(f"done in {result['seconds']:.0f}s -> {out}/results.json")
    return result


def markdown(r: dict[str, Any]) -> str:
    """The results table of docs/accuracy.md's text section, from results.json."""
    c, b = r["config"], r["before"]
    lines = [f"Python {r['python']}'s `pydoc_data.topics` (sha256 `{r['corpus_sha256'][:12]}`): pre-training "
             f"{r['characters']['reference']:,} characters of {len(r['topics']['reference'])} Language Reference "
             f"topics ({r['tokens']['pretrain']:,} tokens); fine-tuning {r['tokens']['train']:,} / validation "
             f"{r['tokens']['val']:,} / test {r['tokens']['test']:,} tokens of {len(r['topics']['library'])} "
             f"Library Reference topics ({r['characters']['library']:,} characters). Model: `llama_small` "
             f"{c['layers']} layers, width {c['hidden']}, {c['heads']} heads, vocabulary {c['vocab']}, windows of "
             f"{c['seq']} tokens; {len(c['seeds'])} seeds; {r['seconds']:.0f} s in all.", "",
             "| scheme | test loss (mean ± std) | test perplexity | vs full | source held-out loss | lr "
             "| trainable % | tensors | step ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| pre-trained, no fine-tuning | {b['test']:.4f} | {math.exp(b['test']):.2f} | | {b['source']:.4f} "
             "| | 0 | | |"]
    full = next((row for row in r["rows"] if row["scheme"] == "full"), None)
    for row in r["rows"]:
        delta = f"{row['test_mean'] - full['test_mean']:+.4f}" if full and row is not full else ""
        lines.append(f"| {row['scheme']} | {row['test_mean']:.4f} ± {row['test_std']:.4f} | "
                     f"{math.exp(row['test_mean']):.2f} | {delta} | {row['source_mean']:.4f} | {row['lr']:g} | "
                     f"{row['trainable_percent']:.2f} | {row['tensors']} | {row['step_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = experiment_parser("python -m experiments.text", __doc__.splitlines()[0], "text", DOC,
                          "tiny model, few steps", "full,sparse,last-k:1,lora")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    cfg = experiment_config(QUICK if args.quick else Config(), args)
    if args.threads:
        cfg = replace(cfg, threads=args.threads)
    out = args.out or ("out/text-quick" if args.quick else "out/text")
    run_and_document(args, out, lambda: run(cfg, out), markdown, DOC, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
