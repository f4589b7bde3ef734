"""Check an op's importer, shape rule, VJP and ONNX lowering against torch.autograd in one go.

`check_vjp(fn, *tensors)` traces `fn` (every float tensor argument a trainable leaf; integer and bool
tensors -- indices, masks -- are model inputs fed at run time, as token ids would be), builds
loss = sum(fn(...) * c) for a random cotangent c, differentiates it with our VJP rules, emits ONNX,
runs it on onnxruntime and compares the output and every gradient with torch. This is the oracle of
the per-op tests and the quickest way to validate a new rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from pockprop.autodiff.backward import backward
from pockprop.emit.onnx import to_onnx
from pockprop.ir import Role
from pockprop.ops.builder import Builder
from pockprop.ops.registry import FULL, Need
from pockprop.passes.lowerings import Chooser, choose_lowerings, default_lowering
from pockprop.runtime.session import session
from pockprop.tracing.trace import trace


def _trainable(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point


class _Wrap(torch.nn.Module):
    """fn's float tensors as parameters `args.0`, `args.1`, ... (in order); its other tensors as inputs."""

    def __init__(self, fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor], consts: dict[str, Any]):
        super().__init__()
        self.fn, self.consts = fn, consts
        self.trainable = [_trainable(t) for t in tensors]
        self.args = torch.nn.ParameterList([torch.nn.Parameter(t.clone()) for t in tensors if _trainable(t)])

    def forward(self, dummy: torch.Tensor, *data: torch.Tensor) -> torch.Tensor:
        params, fed = iter(self.args), iter(data)
        args = [next(params) if t else next(fed) for t in self.trainable]
        # `dummy` exists because torch.export wants one float user input; adding 0*sum keeps it alive cheaply
        return self.fn(*args, **self.consts) + 0 * dummy.sum()


@dataclass
class GradCheckResult:
    max_abs_err: float
    max_rel_err: float
    values: list[np.ndarray] = field(default_factory=list)  # what onnxruntime gave: output, then gradients


def run_onnx(model: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model.SerializeToString(), threads=1).run(None, feeds)


def check_vjp(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5,
              seed: int = 0, needs: dict[int, Need] | None = None, choose_lowering: Chooser = default_lowering,
              **consts: Any) -> GradCheckResult:
    """Raise AssertionError if our output or gradients differ from torch's; return the worst errors.

    `needs` maps an argument position to a sliced Need, to check sliced-gradient rules. Gradients are
    checked for the float arguments only; the others (indices, masks) are fed as data. `choose_lowering`
    picks the lowering of each op that offers several (passes/lowerings.py), to check each of them.
    """
    gen = torch.Generator().manual_seed(seed)
    module = _Wrap(fn, list(tensors), consts)
    dummy = torch.zeros(1)
    data = [t for t in tensors if not _trainable(t)]
    floats = [k for k, t in enumerate(tensors) if _trainable(t)]
    traced = trace(module, (dummy, *data))
    g = traced.graph
    b = Builder(g)
    (y,) = g.outputs
    cot = torch.randn(g.types[y].shape, generator=gen, dtype=torch.float32)

    # Lift the parameters to graph inputs, as compile() does for trainable tensors.
    names = [f"args.{i}" for i in range(len(floats))]
    for n in names:
        g.lift(n, Role.PARAMETER)
    c = b.const(cot.numpy(), hint="cotangent")
    loss = b.op("sum", [b.op("mul", [y, c])], axes=list(range(len(cot.shape))), keepdim=False)
    wants = {n: (needs or {}).get(k, FULL) for k, n in zip(floats, names)}
    grads = backward(g, loss, wants)
    g.outputs = [y] + [grads[n] for n in names]
    model = to_onnx(choose_lowerings(g, choose_lowering).graph, "gradcheck")
    feeds = {n: tensors[k].detach().numpy().astype(np.float32) for n, k in zip(names, floats)}
    feeds.update(zip(traced.user_inputs, [t.numpy() for t in (dummy, *data)]))
    got = run_onnx(model, feeds)

    ref_args = [t.detach().clone().requires_grad_(_trainable(t)) for t in tensors]
    ref_y = fn(*ref_args, **consts)
    leaves = [ref_args[k] for k in floats]
    ref_grads = torch.autograd.grad((ref_y * cot).sum(), leaves, allow_unused=True) if leaves else ()
    want = [ref_y.detach().numpy()]
    for i, rg in enumerate(ref_grads):
        rg = torch.zeros_like(leaves[i]) if rg is None else rg
        need = wants[names[i]]
        if need.axis is not None:
            rg = rg.narrow(need.axis, need.start, need.stop - need.start)
        want.append(rg.numpy())

    worst_abs = worst_rel = 0.0
    for k, (a, w) in enumerate(zip(got, want)):
        what = "output" if k == 0 else f"gradient of argument {k - 1}"
        assert a.shape == w.shape, f"{what}: shape {a.shape} != torch {w.shape}"
        np.testing.assert_allclose(a, w, rtol=rtol, atol=atol, err_msg=what)
        err = np.abs(a - w)
        worst_abs = max(worst_abs, float(err.max(initial=0)))
        worst_rel = max(worst_rel, float((err / (np.abs(w) + atol)).max(initial=0)))
    return GradCheckResult(worst_abs, worst_rel, got)
