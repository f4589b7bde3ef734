"""`pockprop bench`: one training step of a pockprop artifact beside its peers, each in its own process.

Method (docs/benchmarks.md): the parent compiles the artifacts, starts one worker process per configuration
(bench/worker.py), lets every worker build and warm up, then drives interleaved rounds A B C ... A B C:
each round asks every worker in turn for `steps` steps and takes the median step time of that round. It
reports per configuration the median over rounds, and the median over rounds of the per-round ratio to a
baseline (the same round's time of the baseline worker), so slow drift of a shared machine cancels out.
Beside wall time, each round records the CPU time of the worker process per step (every thread): with idle
threads sleeping rather than spinning (the default; --spin) it counts the work done, which other load on a
shared machine disturbs far less than wall time. Extra training memory = the worker's peak RSS (VmHWM)
minus the peak RSS of the forward-only worker of the same runtime.

Several schemes (--scheme a,b) are compiled from one trace and measured in the same rounds; a model that
takes token ids (a zoo model whose builder says so, or --seq-len) gets random ids in its vocabulary, its
tokens per second, and the transformer targets (TOKEN_TARGETS).

The onnxruntime-training rows run under another interpreter (--peers-python: a venv with
onnxruntime-training, which conflicts with onnxruntime; `make peers` builds one). Every worker gets the
folder holding the `pockprop` package first on its path, so the peers' interpreter imports this
pockprop's runtime (numpy + onnxruntime only) beside its own onnxruntime. The ExecuTorch rows run under a third
(--et-python, .venv-et: executorch needs numpy >= 2, onnxruntime-training numpy < 2); bench/peers.py finds
both interpreters, bench/executorch_peer.py builds the ExecuTorch programs in its worker.
"""
from __future__ import annotations

import json
import math
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import pockprop
from pockprop.errors import UsageError
from pockprop.args import MAX_INPUT_ELEMENTS
from pockprop.bench.peers import PEERS_ENV, et_python, et_status, et_train_skip, peers_python, peers_status

# The folder that holds the pockprop package: the repository in a checkout (pockprop/__init__ then maps
# the stage folders in), site-packages in an install.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pockprop.__file__)))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
REPLY_TIMEOUT_S = 900.0
LORA = "lora"  # --lora's artifact and rows (pockprop-lora, torch+peft) and its targets


@dataclass
class Config:
    name: str
    kind: str
    what: str
    spec: dict[str, Any]
    python: str = sys.executable
    memory_baseline: str | None = None  # forward-only config of the same runtime
    skip: str | None = None
    proc: subprocess.Popen | None = None
    rounds: list[float] = field(default_factory=list)
    cpu_rounds: list[float] = field(default_factory=list)  # the same rounds' CPU time per step, all threads
    build_s: float | None = None
    info: dict[str, Any] | None = None  # what the worker reports of its build (the ExecuTorch rows: export, check)
    vmhwm_kb: int | None = None


def input_shape(default: tuple[int, ...] | None, batch: int, resolution: int, seq_len: int | None = None,
                tokens: bool = False) -> list[int]:
    """The bench input: the default shape at `batch`; token ids (`tokens`) are (batch, seq_len or the default's
    length), an image's height and width are `resolution`."""
    if tokens:
        if seq_len is None and (default is None or len(default) != 2):
            raise UsageError("the model has no default sequence length; pass --seq-len")
        shape = [batch, seq_len or default[1]]  # type: ignore[index]
    elif default is None:
        raise UsageError("the model has no default input shape")
    else:
        shape = [batch, *default[1:]]
        if len(shape) == 4:
            shape[2] = shape[3] = resolution
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        flags = f"--batch {batch}" + (f" --seq-len {shape[1]}" if tokens else
                                      f" --resolution {resolution}" if len(shape) == 4 else "")
        raise UsageError(f"{flags}: an input of {shape} has more than {MAX_INPUT_ELEMENTS:,} elements")
    return shape


def vocabulary(model: Any) -> int:
    """How many token ids the model's input embedding takes (transformers' get_input_embeddings(), else the
    first nn.Embedding); UsageError when it has none."""
    import torch.nn as nn

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb = emb if isinstance(emb, nn.Embedding) else next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None:
        raise UsageError("--seq-len: the model has no nn.Embedding to take token ids")
    return int(emb.num_embeddings)


def schemes_of(text: str) -> list[str]:
    """--scheme's comma-separated schemes, in order, without repeats; `full` is always compiled besides."""
    out = []
    for s in (p.strip() for p in text.split(",")):
        if not s:
            raise UsageError(f"--scheme {text!r}: an empty scheme name")
        if s not in out:
            out.append(s)
    return out


def lowering_variants(text: str | None) -> dict[str, Any]:
    """--lowerings' choices by row label: 'default' (each op's default lowering), 'cost' (the cost model), or a
    target profile (a path, a shipped name, or 'machine': the one shipped for this machine; its label is the file's
    name without .json)."""
    from pockprop.compiler.lowering_cost import cost_model_lowering
    from pockprop.compiler.target import chooser_for, load_target_profile
    from pockprop.passes.lowerings import default_lowering

    out: dict[str, Any] = {}
    for item in [t.strip() for t in (text or "").split(",") if t.strip()]:
        if item == "default":
            out[item] = default_lowering
        elif item == "cost":
            out[item] = cost_model_lowering
        else:
            profile = load_target_profile("default" if item == "machine" else item)
            out[os.path.basename(item).removesuffix(".json")] = chooser_for(profile)
    return out


def _prepare(args: Any, workdir: str) -> tuple[list[Config], dict[str, Any]]:
    """Compile the artifacts and the peers' forward model; return the configurations."""
    import dataclasses

    import onnx
    import torch

    from pockprop.compiler.compile import compile_traced, trace_model
    from pockprop.compiler.prompt import PROMPT, prompt_scheme
    from pockprop.tracing.loader import spec_of

    spec = spec_of(args)
    if ":" not in spec.spec:  # a zoo NAME
        spec = dataclasses.replace(spec, spec=f"models:{spec.spec}")
    tokens = args.seq_len is not None or spec.input_dtype() == "int64"
    if args.num_classes is None and not tokens:  # the image models' 10-class heads (docs/benchmarks.md)
        spec = dataclasses.replace(spec, kwargs={**spec.kwargs, "num_classes": 10})
    model, default = spec.build()
    model.eval()
    shape = input_shape(default, args.batch, args.resolution, args.seq_len, tokens)
    vocab = vocabulary(model) if tokens else None
    x = torch.randint(0, vocab, shape) if vocab else torch.randn(*shape)
    with torch.no_grad():
        out_shape = list(model(x).shape)
    num_classes, label_shape = out_shape[-1], out_shape[:-1]
    opt: dict[str, Any] = {"name": args.optimizer}
    if args.lr is not None:
        opt["lr"] = args.lr
    schemes = schemes_of(args.scheme)
    t0 = time.perf_counter()
    traced = trace_model(model, (x,))
    prompts = {s: prompt_scheme(s) for s in schemes if prompt_scheme(s)}  # prompt:P rows: the prompt alone trains
    arts = {s: compile_traced(traced, optimizer=opt, scheme=s) if s not in prompts else
            compile_traced(trace_model(model, (x,), prompt={"tokens": prompts[s]}), optimizer=opt)
            for s in dict.fromkeys(schemes + ["full"])}
    compile_s = time.perf_counter() - t0
    variants = lowering_variants(getattr(args, "lowerings", None))
    for label, choose in variants.items():  # the same schemes, other lowerings: rows pockprop-SCHEME@LABEL
        arts |= {f"{s}@{label}": compile_traced(traced, optimizer=opt, scheme=s, choose_lowering=choose)
                 for s in dict.fromkeys(schemes + ["full"]) if s not in prompts}
    lora = getattr(args, "lora", None)
    if lora is not None:  # not a scheme: its artifact and rows come beside the schemes' (LORA)
        arts[LORA] = compile_traced(traced, optimizer=opt, lora=lora)
    dirs = {s: art.save(os.path.join(workdir, "artifact-" + s.replace(":", "-").replace(os.sep, "_")))
            for s, art in arts.items()}
    full = arts["full"]
    optimizer = full.optimizer
    optimizer = {k: v for k, v in (optimizer.__dict__ if hasattr(optimizer, "__dict__") else dict(optimizer)).items()
                 if k in ("name", "lr", "momentum", "weight_decay", "nesterov", "betas", "eps")}
    params = list(full.parameter_count)

    # The deployed forward model: pockprop's full infer.onnx (torch names, BatchNorm in inference mode) with
    # every parameter a plain initializer instead of an overridable graph input, so onnxruntime folds
    # BatchNorm into the convs and pre-packs the weights, as it would for the model shipped for inference.
    # It is the floor (`ort-infer`) for every scheme, and the peers' forward model (generate_artifacts needs
    # the parameters as initializers too).
    fwd = onnx.ModelProto()
    fwd.CopyFrom(full.infer_model)
    inits = {i.name for i in fwd.graph.initializer}
    keep = [i for i in fwd.graph.input if i.name not in inits]
    del fwd.graph.input[:]
    fwd.graph.input.extend(keep)
    fwd.ir_version = min(fwd.ir_version, 9)  # onnx 1.16 in the peers' venv
    peers_onnx = os.path.join(workdir, "forward-constant.onnx")
    onnx.save(fwd, peers_onnx)

    base = {"root": ROOT, "threads": args.threads, "spin": args.spin, "input_shape": shape, "num_classes": num_classes,
            "label_shape": label_shape, "vocab": vocab, "seed": 0, "model": dataclasses.asdict(spec),
            "optimizer": optimizer}
    cfgs = [Config("ort-infer", "ort-infer", "onnxruntime forward only, all weights constant: the floor",
                   {**base, "onnx": peers_onnx})]
    for s in dict.fromkeys(schemes + ["full"]):
        cfgs.append(Config(f"pockprop-{s}", "pockprop", f"pockprop artifact, scheme {s}, runtime.Trainer",
                           {**base, "artifact": dirs[s]}, memory_baseline="ort-infer"))
    for label in variants:
        for s in [s for s in dict.fromkeys(schemes + ["full"]) if s not in prompts]:
            cfgs.append(Config(f"pockprop-{s}@{label}", "pockprop", f"pockprop artifact, scheme {s}, lowerings: "
                               f"{label}, runtime.Trainer", {**base, "artifact": dirs[f"{s}@{label}"]},
                               memory_baseline="ort-infer"))
    cfgs.append(Config("torch-infer", "torch-infer", "PyTorch eager forward only (no_grad)", dict(base)))
    cfgs.append(Config("torch-full", "torch-train", "PyTorch eager, full backprop", {**base, "trainable": None},
                       memory_baseline="torch-infer"))
    for s in schemes:
        if s in prompts:  # the same soft prompt (compiler/prompt.py's wrapper) as the only trainable tensor
            cfgs.append(Config(f"torch-{s}", "torch-train", f"PyTorch eager, a soft prompt of {prompts[s]} tokens "
                               "trained alone", {**base, "trainable": [PROMPT], "prompt": prompts[s]},
                               memory_baseline="torch-infer"))
        elif s != "full":
            cfgs.append(Config(f"torch-{s}", "torch-train", f"PyTorch eager, whole tensors scheme {s} touches "
                               f"({len(arts[s].trainable)} tensors)", {**base, "trainable": list(arts[s].trainable)},
                               memory_baseline="torch-infer"))
    peer_skip = None if args.peers else "disabled (--no-peers)"
    python = peers_python(args.peers_python)
    peer_skip = peer_skip or peers_status(python)
    peer_train_skip = None
    if optimizer["name"] == "sgd" and (optimizer.get("momentum") or optimizer.get("weight_decay")):
        peer_train_skip = "onnxruntime-training's SGD has no momentum / weight decay"
    elif len(out_shape) != 2:
        peer_train_skip = (f"onnxruntime-training's CrossEntropyLoss takes (N, C) logits; this model's are "
                           f"{out_shape} (classes last)")
    pbase = {**base, "onnx": peers_onnx, "parameters": params}
    cfgs.append(Config("ortt-infer", "ortt-infer", "onnxruntime-training 1.19.2 InferenceSession, forward only",
                       dict(pbase), python=python, skip=peer_skip))
    plain = [s for s in schemes if s not in prompts]  # the peers train the forward model: it has no prompt
    for s in dict.fromkeys(["full"] + plain):
        what = "every tensor trainable" if s == "full" else f"whole tensors scheme {s} touches"
        cfgs.append(Config(f"ortt-{s}", "ortt-train", f"onnxruntime-training 1.19.2, {what}",
                           {**pbase, "trainable": None if s == "full" else list(arts[s].trainable),
                            "workdir": os.path.join(workdir, "ortt-" + s.replace(":", "-").replace(os.sep, "_"))},
                           python=python, memory_baseline="ortt-infer", skip=peer_skip or peer_train_skip))
    # The same pockprop artifact stepped by the peer venv's onnxruntime (1.19.2): the device runtime needs only
    # numpy and onnxruntime, so this row compares pockprop with onnxruntime-training on one onnxruntime build
    # (the main venv's newer onnxruntime runs the same convolutions at a different speed).
    for s in schemes:
        cfgs.append(Config(f"pockprop-{s}@peer-ort", "pockprop-peer-ort",
                           f"the pockprop-{s} artifact on the peers' onnxruntime 1.19.2 (runtime.Trainer)",
                           {**base, "artifact": dirs[s]}, python=python, memory_baseline="ortt-infer",
                           skip=peer_skip))
    if lora is not None:
        cfgs += _lora_configs(base, arts[LORA], dirs[LORA], lora)
    cfgs += _et_configs(args, base, arts, plain, optimizer)
    for c in cfgs:
        c.spec["kind"] = c.kind
    meta = {"input_shape": shape, "input": "token ids" if tokens else "float32", "vocabulary": vocab,
            "tokens_per_step": math.prod(shape) if tokens else None, "output_shape": out_shape,
            "num_classes": num_classes, "optimizer": optimizer, "compile_s": compile_s, "schemes": schemes,
            "parameters": len(params), "full_trainable_count": full.trainable_count,
            "scheme_tensors": {s: len(arts[s].trainable) for s in schemes},
            "scheme_trainable_count": {s: arts[s].trainable_count for s in schemes},
            "lora": None if lora is None else {"r": lora.r, "alpha": lora.alpha, "targets": list(lora.targets),
                                               "trainable_count": arts[LORA].trainable_count}}
    return cfgs, meta


def _lora_configs(base: dict[str, Any], art: Any, directory: str, lora: Any) -> list[Config]:
    """--lora's rows: pockprop's LoRA artifact, and PyTorch eager with peft's LoRA on the same layers (the
    peft config of the same r, alpha and targets, dropout 0), in the main interpreter."""
    import importlib.util

    skip = None if importlib.util.find_spec("peft") else "peft is not installed (pip install peft)"
    what = f"r={lora.r}, alpha={lora.alpha:g} on {','.join(lora.targets)}: {len(art.trainable)} tensors"
    return [Config(f"pockprop-{LORA}", "pockprop", f"pockprop artifact, LoRA {what}, runtime.Trainer",
                   {**base, "artifact": directory}, memory_baseline="ort-infer"),
            Config("torch+peft", "torch-train", f"PyTorch eager + peft LoRA {what}",
                   {**base, "lora": {"r": lora.r, "lora_alpha": lora.alpha, "target_modules": list(lora.targets)}},
                   memory_baseline="torch-infer", skip=skip)]


def _et_configs(args: Any, base: dict[str, Any], arts: dict[str, Any], schemes: list[str],
                optimizer: dict[str, Any]) -> list[Config]:
    """ExecuTorch's rows (bench/executorch_peer.py), under its own venv's interpreter: forward only, then
    training with every tensor, then each scheme's whole tensors trainable and the rest frozen."""
    python = et_python(getattr(args, "et_python", None))
    skip = None if args.peers else "disabled (--no-peers)"
    skip = skip or (None if getattr(args, "et", True) else "disabled (--no-et)") or et_status(python)
    cfgs = [Config("et-infer", "et-infer", "ExecuTorch 1.5.1 forward-only .pte (same kernels as et-full)",
                   dict(base), python=python, skip=skip)]
    for s in dict.fromkeys(["full"] + schemes):
        what = "every tensor trainable" if s == "full" else f"whole tensors scheme {s} touches"
        cfgs.append(Config(f"et-{s}", "et-train", f"ExecuTorch 1.5.1 training .pte + its SGD, {what}",
                           {**base, "trainable": None if s == "full" else list(arts[s].trainable)},
                           python=python, memory_baseline="et-infer", skip=skip or et_train_skip(optimizer)))
    return cfgs


def _ask(c: Config, msg: dict[str, Any] | None) -> dict[str, Any]:
    assert c.proc is not None and c.proc.stdin is not None and c.proc.stdout is not None
    if msg is not None:
        c.proc.stdin.write(json.dumps(msg) + "\n")
        c.proc.stdin.flush()
    ready, _, _ = select.select([c.proc.stdout], [], [], REPLY_TIMEOUT_S)
    line = c.proc.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"worker exited or timed out (rc {c.proc.poll()})")
    return json.loads(line)


def _skip(c: Config, reason: str) -> None:
    c.skip = reason
    if c.proc is not None:
        try:
            c.proc.kill()
            c.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001
            pass
        c.proc = None


def run(args: Any, log=print) -> dict[str, Any]:
    """Run the benchmark described by `args` (the bench subcommand's namespace); return the result dict."""
    own_tmp = None
    workdir = args.workdir
    if not workdir:
        own_tmp = tempfile.TemporaryDirectory(prefix="pockprop-bench-")
        workdir = own_tmp.name
    os.makedirs(workdir, exist_ok=True)
    try:
        log(f"compiling {args.model} (schemes {', '.join(dict.fromkeys(schemes_of(args.scheme) + ['full']))}) ...")
        cfgs, meta = _prepare(args, workdir)
        wanted = set(args.configs) if args.configs else None
        for c in cfgs:
            if wanted is not None and c.name not in wanted and c.kind not in wanted:
                c.skip = c.skip or "not selected (--configs)"
        live = [c for c in cfgs if c.skip is None]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "PYTHONPATH": ROOT}
        if not args.spin:  # PyTorch's OpenMP threads sleep between ops too, as onnxruntime's do (worker.py)
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        for c in live:  # build in parallel; peak RSS is per process
            c.proc = subprocess.Popen([c.python, WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=None if args.verbose else subprocess.DEVNULL, text=True, env=env,
                                      cwd=ROOT)
            c.proc.stdin.write(json.dumps(c.spec) + "\n")
            c.proc.stdin.flush()
        for c in live:
            try:
                r = _ask(c, None)
            except Exception as ex:  # noqa: BLE001
                r = {"error": str(ex)}
            if "error" in r:
                _skip(c, f"build failed: {r['error']}")
            else:
                c.build_s, c.info = r.get("build_s"), r.get("info")
        live = [c for c in live if c.skip is None]
        log(f"{len(live)} workers ready; warmup {args.warmup} x {args.steps} steps, {args.rounds} interleaved rounds")

        def one_round(record: bool) -> None:
            for c in list(live):
                if c.skip is not None:
                    continue
                try:
                    r = _ask(c, {"cmd": "run", "steps": args.steps})
                except Exception as ex:  # noqa: BLE001
                    r = {"error": str(ex)}
                if "error" in r or "times" not in r:
                    _skip(c, f"step failed: {r.get('error', r)}")
                elif record:
                    c.rounds.append(statistics.median(r["times"]))
                    if r.get("cpu"):
                        c.cpu_rounds.append(statistics.median(r["cpu"]))
        for _ in range(args.warmup):
            one_round(False)
        for k in range(args.rounds):
            one_round(True)
            if args.rounds > 1:
                log(f"round {k + 1}/{args.rounds}")
        for c in live:
            if c.skip is None:
                try:
                    c.vmhwm_kb = _ask(c, {"cmd": "stop"}).get("vmhwm_kb")
                    c.proc.wait(timeout=30)
                except Exception as ex:  # noqa: BLE001
                    _skip(c, f"stop failed: {ex}")
        return _result(args, cfgs, meta)
    finally:
        for c in cfgs if "cfgs" in locals() else []:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.kill()
        if own_tmp is not None:
            own_tmp.cleanup()


def _ratio(c: Config, base: Config | None, inverse: bool = False) -> float | None:
    """Median over rounds of c's round time / base's (inverse: base's / c's, a speed-up)."""
    if base is None or base.skip is not None or c.skip is not None or not c.rounds:
        return None
    pairs = [(b / a if inverse else a / b) for a, b in zip(c.rounds, base.rounds) if a > 0 and b > 0]
    return statistics.median(pairs) if pairs else None


# The targets per scheme: (row, baseline row, what is compared, the bound). "time": the median of
# per-round time ratios must be at most the bound; "extra memory": the ratio of extra training memory, at
# most the bound; "tokens/s": the median of per-round speed-ups (baseline time / row time), at least it.
TARGETS = {
    "sparse": [("pockprop-sparse", "torch-full", "time", 1 / 8), ("pockprop-sparse", "torch-sparse", "time", 1 / 2),
               ("pockprop-sparse", "ortt-sparse", "time", 1 / 3), ("pockprop-sparse", "ort-infer", "time", 1.5),
               ("pockprop-sparse", "pockprop-full", "extra memory", 1 / 5),
               # the same two comparisons on one onnxruntime build (1.19.2): not the rows, shown beside them
               ("pockprop-sparse@peer-ort", "ortt-sparse", "time", 1 / 3),
               ("pockprop-sparse@peer-ort", "ortt-infer", "time", 1.5)],
    "bias-only": [("pockprop-bias-only", "torch-full", "time", 1 / 3)],
    "lora": [("pockprop-lora", "torch+peft", "time", 1 / 1.5)],
}
# Models that take token ids (transformers): the issue sets these for the Llama-shaped model's `sparse`; they
# are printed for any model of token ids (BERT's compare against the same bar).
TOKEN_TARGETS = {
    "sparse": [("pockprop-sparse", "torch-full", "tokens/s", 4.0), ("pockprop-sparse", "torch-sparse", "tokens/s", 2.0),
               ("pockprop-sparse", "pockprop-full", "extra memory", 1 / 4)],
    "lora": [("pockprop-lora", "torch+peft", "tokens/s", 1.5)],
}


def targets(rows: list[dict[str, Any]], cfgs: dict[str, Config], schemes: str | list[str],
            tokens: bool = False) -> list[dict[str, Any]]:
    """Each target of `schemes` with its measured ratio and whether it is met (None: a row is missing)."""
    by_row = {r["name"]: r for r in rows}
    table = TOKEN_TARGETS if tokens else TARGETS
    out = []
    for scheme in [schemes] if isinstance(schemes, str) else schemes:
        rows_of = table.get(scheme, [])
        if tokens and scheme.startswith("prompt:"):  # issue 13: >= 1.5x PyTorch with the same prompt trainable
            rows_of = [(f"pockprop-{scheme}", f"torch-{scheme}", "tokens/s", 1.5)]
        for row, base, what, limit in rows_of:
            a, b = by_row.get(row, {}), by_row.get(base, {})
            ratio = None
            if what in ("time", "tokens/s") and row in cfgs and base in cfgs:
                ratio = _ratio(cfgs[row], cfgs[base], inverse=what == "tokens/s")
            elif what == "extra memory" and a.get("extra_train_mb") and b.get("extra_train_mb"):
                ratio = a["extra_train_mb"] / b["extra_train_mb"]
            at_least = what == "tokens/s"
            out.append({"row": row, "baseline": base, "what": what, "limit": limit, "at_least": at_least,
                        "ratio": ratio,
                        "met": None if ratio is None else (ratio >= limit if at_least else ratio <= limit)})
    return out


def lowering_targets(cfgs: dict[str, Config]) -> list[dict[str, Any]]:
    """With --lowerings default,...: each other choice's row is never slower than the same scheme with each
    op's default lowering (issue 16: a tuned profile never slower than the lowering it replaces)."""
    out = []
    for name, c in cfgs.items():
        row, _, label = name.partition("@")
        base = cfgs.get(f"{row}@default")
        if c.kind != "pockprop" or not label or label == "default" or base is None:
            continue
        ratio = _ratio(c, base)
        out.append({"row": name, "baseline": base.name, "what": "time", "limit": 1.0, "at_least": False,
                    "ratio": ratio, "met": None if ratio is None else ratio <= 1.0})
    return out


def _result(args: Any, cfgs: list[Config], meta: dict[str, Any]) -> dict[str, Any]:
    by = {c.name: c for c in cfgs}
    tokens = meta.get("tokens_per_step")
    rows = []
    for c in cfgs:
        row: dict[str, Any] = {"name": c.name, "what": c.what, "kind": c.kind}
        if c.skip is not None:
            row.update(status="skipped", reason=c.skip)
        else:
            mb = by.get(c.memory_baseline) if c.memory_baseline else None
            extra = (c.vmhwm_kb - mb.vmhwm_kb) / 1024 if (mb and mb.skip is None and c.vmhwm_kb is not None
                                                             and mb.vmhwm_kb is not None) else None
            median_s = statistics.median(c.rounds)
            row.update(status="ok", median_ms=1000 * median_s, rounds_ms=[1000 * t for t in c.rounds],
                       cpu_ms=1000 * statistics.median(c.cpu_rounds) if c.cpu_rounds else None,
                       vs_infer=_ratio(c, by.get("ort-infer")), vs_torch_full=_ratio(c, by.get("torch-full")),
                       peak_rss_mb=c.vmhwm_kb / 1024 if c.vmhwm_kb is not None else None,
                       extra_train_mb=extra, memory_baseline=c.memory_baseline, build_s=c.build_s)
            if c.info:
                row["build_info"] = c.info
            if tokens:
                row["tokens_per_s"] = tokens / median_s
        rows.append(row)
    return {
        "model": args.model, "scheme": args.scheme, "batch": args.batch, "resolution": args.resolution,
        "seq_len": meta["input_shape"][1] if tokens else None,
        "threads": args.threads, "spin": args.spin, "rounds": args.rounds, "warmup": args.warmup,
        "steps_per_round": args.steps, **meta,
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "configs": rows,
        "targets": targets(rows, by, meta["schemes"] + ([LORA] if meta.get("lora") else []), bool(tokens))
                   + lowering_targets(by),
    }


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _header(result: dict[str, Any]) -> list[str]:
    tokens = ["tokens/s"] if result.get("tokens_per_step") else []
    return ["config", "ms/step", *tokens, "CPU ms/step", "x infer", "x torch-full", "peak RSS MB", "extra train MB",
            "what"]


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    tokens = bool(result.get("tokens_per_step"))
    out = []
    for r in result["configs"]:
        if r["status"] != "ok":
            out.append([r["name"], "skipped", *([""] if tokens else []), "", "", "", "", "", r["reason"]])
        else:
            speed = [_fmt(r.get("tokens_per_s"), ",.0f")] if tokens else []
            out.append([r["name"], _fmt(r["median_ms"], ".1f"), *speed, _fmt(r.get("cpu_ms"), ".1f"),
                        _fmt(r["vs_infer"], ".2f"),
                        _fmt(r["vs_torch_full"], ".2f"), _fmt(r["peak_rss_mb"], ".0f"),
                        _fmt(r["extra_train_mb"], ".0f"), r["what"] + build_note(r.get("build_info"))])
    return out


def build_note(info: dict[str, Any] | None) -> str:
    """The table's note on a row's build: export time and the one-step check (the ExecuTorch rows)."""
    if not info:
        return ""
    parts = [f"export {info['export_s']:.1f} s"] if info.get("export_s") is not None else []
    if info.get("check_max_abs_err") is not None:
        failed = "" if info.get("check_ok", True) else f"CHECK FAILED on {info.get('check_worst')}: "
        parts.append(f"{failed}step vs torch SGD: max abs err {info['check_max_abs_err']:.1e} "
                     f"(update {info.get('check_max_abs_step', 0):.1e})")
    return f" ({'; '.join(parts)})" if parts else ""


def _title(result: dict[str, Any]) -> str:
    what = (f"{result['tokens_per_step']} tokens/step" if result.get("tokens_per_step") else "")
    return (f"{result['model']} scheme={result['scheme']} batch={result['batch']} input={result['input_shape']} "
            + (f"({what}) " if what else "")
            + f"threads={result['threads']}{'' if result.get('spin', True) else ' (no spinning)'} "
            f"rounds={result['rounds']} (medians; ratios are medians of per-round ratios)")


def print_table(result: dict[str, Any]) -> None:
    header = _header(result)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        rows = [header] + table_rows(result)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        print(_title(result))
        for r in rows:
            print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + "  " + r[-1])
        print_targets(result)
        return
    t = Table(title=_title(result))
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i in (0, len(header) - 1) else "right")
    for r in table_rows(result):
        t.add_row(*r)
    Console(width=200).print(t)
    print_targets(result)


def targets_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for t in result.get("targets", []):
        verdict = "not measured" if t["met"] is None else "met" if t["met"] else "MISSED"
        if t.get("at_least"):
            ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}x"
            lines.append(f"{t['row']} vs {t['baseline']} ({t['what']}): {ratio}, target >= {t['limit']:g}x: {verdict}")
        else:
            ratio = "-" if t["ratio"] is None else f"{t['ratio']:.3f}"
            lines.append(f"{t['row']} / {t['baseline']} ({t['what']}): {ratio}, target <= {t['limit']:.3f}: {verdict}")
    return lines


def print_targets(result: dict[str, Any]) -> None:
    for line in targets_lines(result):
        print("target " + line)


def markdown_table(result: dict[str, Any]) -> str:
    header = _header(result)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    return "\n".join(lines)


def write_png(result: dict[str, Any], path: str) -> str | None:
    """Bar chart of ms/step; returns None, or why no PNG was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed in this venv; no PNG written (the JSON has every number)"
    ok = [r for r in result["configs"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(ok) + 1.5))
    ax.barh([r["name"] for r in ok], [r["median_ms"] for r in ok])
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (median)")
    ax.set_title(f"{result['model']} {result['scheme']} batch {result['batch']} threads {result['threads']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None
