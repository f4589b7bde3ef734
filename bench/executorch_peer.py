"""The ExecuTorch training peer of `pockprop bench` (rows et-full and et-SCHEME).

ExecuTorch trains through a joint forward/backward program: torch.export -> _export_forward_backward ->
to_edge -> to_executorch (a .pte buffer), stepped by executorch.extension.training's TrainingModule and its
C++ SGD. executorch 1.5.1 needs numpy >= 2 and onnxruntime-training 1.19.2 needs numpy < 2, so it has its own
venv (`make peers` builds .venv-et; --et-python, bench/peers.py). Everything here runs under it, from
bench/worker.py; torch and executorch are imported inside the functions.

Two pitfalls of the executorch 1.5.1 API, kept here on purpose: TrainingModule.named_parameters() fails until
forward_backward has run once, and the module reads the program buffer in place, so the buffer is kept alive
as long as the module (freeing it first segfaults).
"""
from __future__ import annotations

import time
from typing import Any


CHECK_RTOL = 1e-3  # largest weight difference from torch's SGD step, relative to the largest weight update


def _sgd_args(opt: dict[str, Any]) -> tuple[float, float, float, float, bool]:
    """(lr, momentum, dampening, weight_decay, nesterov): get_sgd_optimizer's and torch.optim.SGD's order."""
    return (float(opt["lr"]), float(opt.get("momentum", 0.0)), 0.0, float(opt.get("weight_decay", 0.0)),
            bool(opt.get("nesterov", False)))


def _export(torch: Any, model: Any, xt: Any, yt: Any, label_smoothing: float) -> Any:
    """The joint forward/backward .pte of model + cross-entropy, as an ExecutorchProgramManager."""
    from executorch.exir import to_edge
    from torch.export.experimental import _export_forward_backward

    class WithLoss(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.loss = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)

        def forward(self, x, y):
            out = self.net(x)
            return (self.loss(out.reshape(-1, out.shape[-1]), y.reshape(-1)),)  # the loss must come first

    ep = torch.export.export(WithLoss(model), (xt, yt), strict=False)
    return to_edge(_export_forward_backward(ep)).to_executorch()


def build_et_infer(spec: dict[str, Any], model: Any, x: Any):
    """The forward-only .pte of `model` (to_edge -> to_executorch, the same kernels as training) and a step
    that runs it: the memory baseline of the et rows, and the forward's share of their step time."""
    import torch
    from executorch.exir import to_edge
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    xt = torch.from_numpy(x)
    for p in model.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    buffer = to_edge(torch.export.export(model, (xt,), strict=False)).to_executorch().buffer
    module = _load_for_executorch_from_buffer(buffer)
    info = {"export_s": time.perf_counter() - t0}

    def step():
        module.forward((xt,))
    step.buffer = buffer  # type: ignore[attr-defined] - kept alive with the module, as for training
    return step, info


def build_et_train(spec: dict[str, Any], model: Any, x: Any, y: Any):
    """Export `model` (eval mode, the spec's trainable tensors requiring grad, the rest frozen), load it with
    executorch's TrainingModule and SGD, check one step against torch.optim.SGD on a copy, and return
    (step, info): info has export_s (export and lowering), check_max_abs_err (on tensor check_worst),
    check_max_abs_step (the largest update) and check_ok (err <= CHECK_RTOL * update)."""
    import copy

    import torch
    from executorch.extension.training import _load_for_executorch_for_training_from_buffer, get_sgd_optimizer

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    want = spec.get("trainable")  # None: every parameter
    for name, p in model.named_parameters():
        p.requires_grad_(want is None or name in want)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise RuntimeError("no trainable parameters")
    sgd = _sgd_args(spec["optimizer"])
    label_smoothing = spec.get("label_smoothing", 0.0)
    reference = copy.deepcopy(model)  # before export: the step below is checked against this copy

    t0 = time.perf_counter()
    program = _export(torch, model, xt, yt, label_smoothing)
    buffer = program.buffer  # read in place by the module: it must outlive it (held by the closure below)
    module = _load_for_executorch_for_training_from_buffer(buffer)
    export_s = time.perf_counter() - t0

    module.forward_backward("forward", (xt, yt))  # named_parameters() works only after a first run
    params = module.named_parameters()
    names = {k.removeprefix("net."): k for k in params}
    if set(names) != trainable:
        raise RuntimeError(f"ExecuTorch's trainable tensors differ from the scheme's: "
                           f"{sorted(set(names) ^ trainable)[:5]}")
    before = {n: params[k].clone() for n, k in names.items()}
    optimizer = get_sgd_optimizer(params, *sgd)
    optimizer.step(module.named_gradients())

    ref_params = [p for n, p in reference.named_parameters() if n in trainable]
    ref_opt = torch.optim.SGD(ref_params, lr=sgd[0], momentum=sgd[1], dampening=sgd[2], weight_decay=sgd[3],
                              nesterov=sgd[4])
    out = reference(xt)
    torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)(out.reshape(-1, out.shape[-1]), yt.reshape(-1)).backward()
    ref_opt.step()
    ref = dict(reference.named_parameters())
    errs = {n: float((params[k] - ref[n]).abs().max()) for n, k in names.items()}
    worst = max(errs, key=errs.__getitem__)
    moved = max(float((ref[n].detach() - before[n]).abs().max()) for n in names)
    # Not an error that stops the row: the step still runs ExecuTorch's whole program (its time is real), but
    # the table says the check failed and on which tensor (max_pool2d's backward in executorch 1.5.1).
    info = {"export_s": export_s, "check_max_abs_err": errs[worst], "check_max_abs_step": moved,
            "check_worst": worst, "check_ok": errs[worst] <= CHECK_RTOL * moved}

    def step():
        module.forward_backward("forward", (xt, yt))
        optimizer.step(module.named_gradients())
    step.buffer = buffer  # type: ignore[attr-defined] - the module reads it in place: it lives as long as step
    return step, info


# Bookkeeping events of an ETDump run: the whole method and the wrapper around every kernel call.
NOT_KERNELS = ("Method::execute", "OPERATOR_CALL", "Program::load_method")


def op_times(events: Any) -> list[tuple[str, int, float, float]]:
    """Per kernel of one ETDump run's events (profile_event name, start_time, end_time in ns): (name, calls, ms,
    share of all kernels' time), slowest first."""
    total: dict[str, float] = {}
    calls: dict[str, int] = {}
    for ev in events:
        p = getattr(ev, "profile_event", None)
        if p is None or p.name in NOT_KERNELS:
            continue
        total[p.name] = total.get(p.name, 0.0) + (p.end_time - p.start_time) / 1e6
        calls[p.name] = calls.get(p.name, 0) + 1
    whole = sum(total.values()) or 1.0
    return sorted(((n, calls[n], ms, ms / whole) for n, ms in total.items()), key=lambda r: -r[2])


def profile(model_name: str, resolution: int, batch: int, etdump: str) -> list[tuple[str, int, float, float]]:
    """Where one full ExecuTorch training step of zoo model `model_name` spends its time: ETDump's per-kernel
    times of the second forward_backward (the first warms up), as op_times gives them."""
    import torch
    from executorch.devtools.etdump.serialize import deserialize_from_etdump_flatcc
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer
    from executorch.extension.training.pybindings._training_module import TrainingModule

    from pockprop.tracing.loader import ModelSpec
    model, _ = ModelSpec(spec=f"models:{model_name}", kwargs={"num_classes": 10}).build()
    model.eval()
    x, y = torch.randn(batch, 3, resolution, resolution), torch.randint(0, 10, (batch,))
    buffer = _export(torch, model, x, y, 0.0).buffer
    module = TrainingModule(_load_for_executorch_from_buffer(buffer, enable_etdump=True))
    for _ in range(2):
        module.forward_backward("forward", (x, y))
    module.model.write_etdump_result_to_file(etdump)
    with open(etdump, "rb") as f:
        runs = deserialize_from_etdump_flatcc(f.read()).run_data
    return op_times(max(reversed(runs), key=lambda r: len(r.events)).events)  # the last training run


if __name__ == "__main__":  # under the ExecuTorch venv, from the repository root: MODEL RESOLUTION BATCH ETDUMP
    import sys
    for name, n, ms, share in profile(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])[:8]:
        print(f"{name:50s} {n:5d} calls {ms:10.1f} ms {100 * share:5.1f}%")
