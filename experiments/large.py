"""A Llama-shaped model of a given size, compiled with the transformer `sparse` preset and trained on the runtime.

    python -m experiments.large --params 1e9 [--out out/large] [--optimizer sgd] [--steps 3]

Random weights (`transformers.LlamaConfig` + `LlamaForCausalLM`, never a download), random token ids.
Two fresh processes, so each peak RSS (VmHWM) is that phase's alone:
  compile  build the model, trace it (torch.export), drop the torch model, compile, save the artifact
  train    Trainer.load the saved directory, take `--steps` steps on one fixed batch, then export the
           inference model (`<out>-export.onnx`, with `.data` beside it above the external-data threshold)
and one line of JSON per phase (seconds per stage, artifact size, peak RSS, ms per step), then a summary.

The shape follows `--params`: hidden 2048 (32 heads, FFN 5504) from 5e8 parameters up, 1024 (16 heads, FFN
2752) from 1.5e8, 512 (8 heads, FFN 1376) below, vocabulary 32000, untied head; the number of layers is
what lands nearest to `--params`. Or give the shape (--hidden, --layers, ...) directly. docs/benchmarks.md
("Large models") has the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from pockprop.bench.worker import vmhwm_kb

SHAPES = ((5e8, 2048, 32, 5504), (1.5e8, 1024, 16, 2752), (0.0, 512, 8, 1376))  # (from params, hidden, heads, FFN)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (VmHWM, as the bench workers read it), in MiB."""
    kb = vmhwm_kb()
    if kb is None:
        raise SystemExit("peak RSS: neither /proc/self/status nor getrusage is available here")
    return kb / 1024


def llama_params(hidden: int, layers: int, ffn: int, vocab: int) -> int:
    """Parameters of an untied Llama with full multi-head attention: embedding and head, per layer four
    attention projections, three FFN projections and two norms, and the final norm."""
    return 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden) + hidden


def shape(args: argparse.Namespace) -> dict[str, int]:
    """The model's shape: given outright, or derived from --params (see the module docstring)."""
    _, hidden, heads, ffn = next(s for s in SHAPES if args.params >= s[0])
    hidden, heads, ffn = args.hidden or hidden, args.heads or heads, args.intermediate or ffn
    per_layer = llama_params(hidden, 1, ffn, args.vocab) - llama_params(hidden, 0, ffn, args.vocab)
    layers = args.layers or max(1, round((args.params - llama_params(hidden, 0, ffn, args.vocab)) / per_layer))
    return {"hidden": hidden, "layers": layers, "heads": heads, "intermediate": ffn, "vocab": args.vocab,
            "seq": args.seq, "batch": args.batch, "params": llama_params(hidden, layers, ffn, args.vocab)}


def compile_phase(s: dict[str, int], out: str, optimizer: str) -> dict[str, Any]:
    import gc

    import torch
    import transformers

    from pockprop.compiler.compile import compile_traced, trace_model

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    cfg = transformers.LlamaConfig(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                   num_key_value_heads=s["heads"], intermediate_size=s["intermediate"],
                                   vocab_size=s["vocab"], max_position_embeddings=s["seq"], use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == s["params"], "llama_params disagrees with transformers"
    times["build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    traced = trace_model(model, (torch.randint(0, s["vocab"], (s["batch"], s["seq"])),))
    times["trace_s"] = time.perf_counter() - t0
    rss_traced = peak_rss_mb()
    del model  # the trace holds its own copy of the weights
    gc.collect()
    t0 = time.perf_counter()
    art = compile_traced(traced, scheme="sparse", optimizer=optimizer, name="llama")
    times["compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    art.save(out)
    times["save_s"] = time.perf_counter() - t0
    files = {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))}
    return {"phase": "compile", **times, "peak_rss_trace_mb": rss_traced, "peak_rss_mb": peak_rss_mb(),
            "artifact_mb": sum(files.values()) / 2 ** 20, "files_mb": {f: n / 2 ** 20 for f, n in files.items()},
            "trainable": art.trainable_count}


def train_phase(s: dict[str, int], out: str, steps: int, threads: int | None) -> dict[str, Any]:
    import numpy as np

    from pockprop.runtime.trainer import Trainer

    t0 = time.perf_counter()
    trainer = Trainer.load(out, threads=threads)
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mb()
    rng = np.random.default_rng(0)
    x = rng.integers(0, s["vocab"], (s["batch"], s["seq"]))
    y = rng.integers(0, s["vocab"], (s["batch"], s["seq"]))
    losses, ms = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(trainer.step(x, y))
        ms.append((time.perf_counter() - t0) * 1e3)
    rss_trained = peak_rss_mb()
    t0 = time.perf_counter()
    model = trainer.export_inference(out.rstrip("/") + "-export.onnx")
    export_s = time.perf_counter() - t0
    exported = [model] + [model + ".data"] * os.path.exists(model + ".data")
    return {"phase": "train", "load_s": load_s, "peak_rss_load_mb": rss_loaded, "peak_rss_train_mb": rss_trained,
            "losses": losses, "ms_per_step": ms, "export_s": export_s, "peak_rss_mb": peak_rss_mb(),
            "export_mb": sum(os.path.getsize(f) for f in exported) / 2 ** 20, "export_files": len(exported)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, default=1e9, help="target parameter count (default 1e9)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    p.add_argument("--out", default="out/large")
    p.add_argument("--phase", choices=("compile", "train"), help=argparse.SUPPRESS)  # one phase, in this process
    args = p.parse_args(argv)
    s = shape(args)
    if args.phase == "compile":
        print(json.dumps(compile_phase(s, args.out, args.optimizer)), flush=True)
        return 0
    if args.phase == "train":
        print(json.dumps(train_phase(s, args.out, args.steps, args.threads)), flush=True)
        return 0

    print(f"Llama-shaped: {s}", flush=True)
    results = {}
    for phase in ("compile", "train"):
        cmd = [sys.executable, "-m", "experiments.large", *(argv if argv is not None else sys.argv[1:]), "--phase", phase]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stderr, file=sys.stderr)
            return run.returncode
        results[phase] = json.loads(run.stdout.strip().splitlines()[-1])
        print(json.dumps(results[phase]), flush=True)
    c, t = results["compile"], results["train"]
    print(f"{s['params'] / 1e6:.0f} M parameters ({s['layers']} layers, hidden {s['hidden']}), {c['trainable'] / 1e6:.1f} M "
          f"trained (sparse, {args.optimizer}); compile {c['build_s']:.0f} s build + {c['trace_s']:.0f} s trace + "
          f"{c['compile_s']:.0f} s compile + {c['save_s']:.0f} s save, peak RSS {c['peak_rss_mb'] / 1024:.2f} GiB; "
          f"artifact {c['artifact_mb'] / 1024:.2f} GiB; load {t['load_s']:.1f} s, training peak RSS "
          f"{t['peak_rss_train_mb'] / 1024:.2f} GiB, {', '.join(f'{v:.0f}' for v in t['ms_per_step'])} ms per step; "
          f"export {t['export_s']:.0f} s, {t['export_mb'] / 1024:.2f} GiB in {t['export_files']} files, "
          f"peak RSS with it {t['peak_rss_mb'] / 1024:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
