"""One benchmark configuration in its own process, driven over a line protocol by bench/harness.py.

Run as a script (`python bench/worker.py`), not as a package module: the onnxruntime-training peer
runs it with the peers' interpreter (--peers-python), which has no pockprop dependencies beyond
numpy/onnxruntime, and the ExecuTorch rows with .venv-et's (torch + executorch, no onnxruntime), so nothing
here is imported at top level except the standard library. pockprop is
imported from the spec's "root" (the folder holding the package), put first on the path.

Protocol: one JSON object per line. The parent writes the spec line first; the worker builds its thing and
answers {"ready": true, "build_s": ...} or {"error": "..."}. Then {"cmd": "run", "steps": k} answers
{"times": [wall seconds per step], "cpu": [CPU seconds of the process, every thread, per step]}, and
{"cmd": "stop"} answers {"vmhwm_kb": peak RSS} and exits. Anything the libraries print goes to stderr: the
protocol has its own copy of the original stdout.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback


def vmhwm_kb() -> int | None:
    """Peak resident set size of this process (VmHWM), in KiB; None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    try:
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    except Exception:  # pragma: no cover
        return None


def _data(spec: dict):
    """The step's input and labels: token ids in [0, vocab) when the model takes them, else normal floats;
    class labels shaped like the model's output without its class axis."""
    import numpy as np
    rng = np.random.default_rng(spec.get("seed", 0))
    if spec.get("vocab"):
        x = rng.integers(0, spec["vocab"], size=spec["input_shape"]).astype(np.int64)
    else:
        x = rng.standard_normal(spec["input_shape"]).astype(np.float32)
    label_shape = spec.get("label_shape", spec["input_shape"][:1])
    y = rng.integers(0, spec["num_classes"], size=label_shape).astype(np.int64)
    return x, y


def build_ort_infer(spec: dict):
    from pockprop.runtime.session import session  # onnxruntime + numpy only: fine under the peers' interpreter
    x, _ = _data(spec)
    sess = session(spec["onnx"], spec["threads"])
    name = sess.get_inputs()[0].name
    feeds = {name: x}
    return lambda: sess.run(None, feeds)


def _use_root(spec: dict) -> None:
    if spec["root"] not in sys.path:
        sys.path.insert(0, spec["root"])


def build_pockprop(spec: dict):
    _use_root(spec)
    from pockprop.runtime.trainer import Trainer
    x, y = _data(spec)
    tr = Trainer.load(spec["artifact"], threads=spec["threads"])
    return lambda: tr.step(x, y)


def _torch_model(spec: dict):
    _use_root(spec)
    import torch
    from pockprop.tracing.loader import ModelSpec
    torch.set_num_threads(spec["threads"])
    model, _ = ModelSpec(**spec["model"]).build()
    model.eval()  # BatchNorm uses running statistics, as in pockprop's training step
    if spec.get("prompt"):  # a soft prompt of that many tokens, as the pockprop artifact has it
        from pockprop.compiler.prompt import PromptSpec, with_prompt
        model = with_prompt(model, PromptSpec(spec["prompt"]))
    return torch, model


def build_torch_infer(spec: dict):
    torch, model = _torch_model(spec)
    x, _ = _data(spec)
    xt = torch.from_numpy(x)
    for p in model.parameters():
        p.requires_grad_(False)

    def step():
        with torch.no_grad():
            model(xt)
    return step


def build_torch_train(spec: dict):
    torch, model = _torch_model(spec)
    x, y = _data(spec)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    want = spec.get("trainable")  # None: every parameter
    params = []
    if spec.get("lora"):  # peft's LoRA: it freezes every other parameter itself
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(**spec["lora"], lora_dropout=0.0))
        params = [p for p in model.parameters() if p.requires_grad]
    for name, p in model.named_parameters() if not spec.get("lora") else ():
        on = want is None or name in want
        p.requires_grad_(on)
        if on:
            params.append(p)
    if not params:
        raise RuntimeError("no trainable parameters")
    opt = spec["optimizer"]
    if opt["name"] == "sgd":
        optim = torch.optim.SGD(params, lr=opt["lr"], momentum=opt.get("momentum", 0.0),
                                weight_decay=opt.get("weight_decay", 0.0), nesterov=opt.get("nesterov", False))
    else:
        optim = torch.optim.AdamW(params, lr=opt["lr"], betas=tuple(opt.get("betas", (0.9, 0.999))),
                                  eps=opt.get("eps", 1e-8), weight_decay=opt.get("weight_decay", 0.01))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=spec.get("label_smoothing", 0.0))

    def step():
        optim.zero_grad(set_to_none=True)
        out = model(xt)
        loss = loss_fn(out.reshape(-1, out.shape[-1]), yt.reshape(-1))  # (N, T, V) logits: the mean over tokens
        loss.backward()
        optim.step()
    return step


def build_ortt_train(spec: dict):
    """onnxruntime-training (deprecated on-device API): generate_artifacts, then Module + Optimizer."""
    import onnx
    import onnxruntime as ort

    from pockprop.runtime.session import QUIET, options
    ort.set_default_logger_severity(QUIET)
    from onnxruntime.training import artifacts
    from onnxruntime.training.api import CheckpointState, Module, Optimizer
    x, y = _data(spec)
    model = onnx.load(spec["onnx"])
    params = [i.name for i in model.graph.initializer if i.name in set(spec["parameters"])]
    want = set(spec["trainable"]) if spec.get("trainable") is not None else set(params)
    grad = [p for p in params if p in want]
    frozen = [p for p in params if p not in want]
    opt = spec["optimizer"]
    if opt["name"] != "adamw" and not hasattr(artifacts.OptimType, "SGD"):
        raise RuntimeError("this onnxruntime-training has no SGD optimizer")
    otype = artifacts.OptimType.AdamW if opt["name"] == "adamw" else artifacts.OptimType.SGD
    out = spec["workdir"]
    os.makedirs(out, exist_ok=True)
    artifacts.generate_artifacts(model, requires_grad=grad, frozen_params=frozen,
                                 loss=artifacts.LossType.CrossEntropyLoss, optimizer=otype, artifact_directory=out)
    state = CheckpointState.load_checkpoint(os.path.join(out, "checkpoint"))
    so = options(spec["threads"])
    try:
        module = Module(os.path.join(out, "training_model.onnx"), state, os.path.join(out, "eval_model.onnx"),
                        device="cpu", session_options=so)
    except TypeError:  # older signature without session_options
        module = Module(os.path.join(out, "training_model.onnx"), state, os.path.join(out, "eval_model.onnx"),
                        device="cpu")
    optimizer = Optimizer(os.path.join(out, "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(opt["lr"])
    module.train()

    def step():
        module(x, y)
        optimizer.step()
        module.lazy_reset_grad()
    return step


def build_et(spec: dict):
    """ExecuTorch training or its forward only (bench/executorch_peer.py), under the ExecuTorch venv."""
    _, model = _torch_model(spec)
    from pockprop.bench import executorch_peer
    x, y = _data(spec)
    if spec["kind"] == "et-infer":
        step, info = executorch_peer.build_et_infer(spec, model, x)
    else:
        step, info = executorch_peer.build_et_train(spec, model, x, y)
    spec["info"] = info  # sent with the ready line
    return step


BUILDERS = {"ort-infer": build_ort_infer, "pockprop": build_pockprop, "pockprop-peer-ort": build_pockprop,
            "torch-infer": build_torch_infer, "torch-train": build_torch_train, "ortt-infer": build_ort_infer,
            "ortt-train": build_ortt_train, "et-infer": build_et, "et-train": build_et}


def main() -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to stderr
    sys.stdout = sys.stderr

    def say(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    spec = json.loads(sys.stdin.readline())
    try:
        _use_root(spec)
        if not spec["kind"].startswith("et-"):  # the ExecuTorch venv has no onnxruntime
            from pockprop.runtime import session  # numpy + onnxruntime only, as under the peers' interpreter
            session.SPINNING = bool(spec.get("spin", False))  # every onnxruntime session of this worker
        t0 = time.perf_counter()
        step = BUILDERS[spec["kind"]](spec)
        say({"ready": True, "build_s": time.perf_counter() - t0, "vmhwm_build_kb": vmhwm_kb(),
             "info": spec.get("info")})
    except BaseException as ex:  # noqa: BLE001 - any failure becomes a skipped row with its reason
        traceback.print_exc()
        say({"error": f"{type(ex).__name__}: {ex}".strip()[:500]})
        return 0
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "run":
            times, cpu = [], []
            for _ in range(msg["steps"]):
                t, c = time.perf_counter(), time.process_time()
                step()
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            say({"times": times, "cpu": cpu})
        elif msg["cmd"] == "stop":
            say({"vmhwm_kb": vmhwm_kb()})
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
