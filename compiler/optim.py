"""Optimizers built into the training graph: SGD (momentum, weight decay, nesterov) and AdamW.

The update is ordinary IR (mul/add/sqrt...), so it goes through the same passes and emitter as the
rest of the step. The learning rate is a graph input, so schedules live in the runtime. Semantics
follow torch.optim exactly (same defaults, same order of operations), which the zoo tests check.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pockprop.errors import CompileError
from pockprop.ops.builder import Builder


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        if self.name == "sgd":
            for k in ("betas", "eps"):
                d.pop(k)
        else:
            for k in ("momentum", "nesterov"):
                d.pop(k)
        return d

    def slots(self) -> list[str]:
        """Per-parameter state tensors, each shaped like its parameter."""
        if self.name == "sgd":
            return ["momentum"] if self.momentum else []
        return ["exp_avg", "exp_avg_sq"]

    @property
    def needs_step(self) -> bool:
        return self.name == "adamw"


_DEFAULTS = {"sgd": {"weight_decay": 0.0}, "adamw": {"weight_decay": 0.01}}
_ALLOWED = {"sgd": {"name", "lr", "momentum", "weight_decay", "nesterov"},
            "adamw": {"name", "lr", "betas", "eps", "weight_decay"}}


def parse_optimizer(spec: str | dict[str, Any] | OptimizerSpec) -> OptimizerSpec:
    """'sgd' / {'name': 'adamw', 'lr': 1e-3, ...} -> a validated OptimizerSpec."""
    if isinstance(spec, OptimizerSpec):
        return spec
    d = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = str(d.get("name", "")).lower()
    if name not in _ALLOWED:
        raise CompileError(f"unknown optimizer {d.get('name')!r}; choose one of: {', '.join(_ALLOWED)}")
    unknown = set(d) - _ALLOWED[name]
    if unknown:
        raise CompileError(f"optimizer {name} does not take {', '.join(sorted(unknown))}; "
                           f"it takes {', '.join(sorted(_ALLOWED[name] - {'name'}))}")
    d = {**_DEFAULTS[name], **d, "name": name}
    d.setdefault("lr", 0.01 if name == "sgd" else 1e-3)
    if "betas" in d:
        d["betas"] = tuple(float(x) for x in d["betas"])
    opt = OptimizerSpec(**d)
    if not opt.lr > 0 or opt.weight_decay < 0 or opt.momentum < 0:
        raise CompileError(f"optimizer {name}: lr must be > 0, weight_decay and momentum >= 0 (got {d})")
    if opt.nesterov and opt.momentum <= 0:
        raise CompileError("optimizer sgd: nesterov needs momentum > 0 (as in torch.optim.SGD)")
    return opt


def build_update(b: Builder, opt: OptimizerSpec, param: str, grad: str, state: dict[str, str], lr: str,
                 step: str | None) -> tuple[str, dict[str, str]]:
    """Append one parameter's update; returns the new parameter and its new state tensors."""
    s = lambda v: b.scalar_like(v, param)  # noqa: E731
    if opt.name == "sgd":
        # torch.optim.SGD: g += wd p; buf = mu buf + g (buf starts at 0, so the first step gives g);
        # g = g + mu buf (nesterov) or buf; p -= lr g
        g = grad
        if opt.weight_decay:
            g = b.op("add", [g, b.op("mul", [param, s(opt.weight_decay)])])
        new_state = {}
        if opt.momentum:
            buf = b.op("add", [b.op("mul", [state["momentum"], s(opt.momentum)]), g], hint="momentum")
            new_state["momentum"] = buf
            g = b.op("add", [g, b.op("mul", [buf, s(opt.momentum)])]) if opt.nesterov else buf
        return b.op("sub", [param, b.op("mul", [g, lr])], hint="updated"), new_state

    # torch.optim.AdamW: p *= 1 - lr wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    # p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    assert step is not None
    b1, b2 = opt.betas
    p = param
    if opt.weight_decay:
        p = b.op("mul", [p, b.op("sub", [s(1.0), b.op("mul", [lr, s(opt.weight_decay)])])])
    m = b.op("add", [b.op("mul", [state["exp_avg"], s(b1)]), b.op("mul", [grad, s(1 - b1)])], hint="exp_avg")
    v = b.op("add", [b.op("mul", [state["exp_avg_sq"], s(b2)]), b.op("mul", [b.op("mul", [grad, grad]), s(1 - b2)])],
             hint="exp_avg_sq")
    bc1 = b.op("sub", [s(1.0), b.op("pow_of", [step], base=b1)])
    bc2_sqrt = b.op("sqrt", [b.op("sub", [s(1.0), b.op("pow_of", [step], base=b2)])])
    denom = b.op("add", [b.op("div", [b.op("sqrt", [v]), bc2_sqrt]), s(opt.eps)])
    new_p = b.op("sub", [p, b.op("mul", [b.op("div", [m, denom]), b.op("div", [lr, bc1])])], hint="updated")
    return new_p, {"exp_avg": m, "exp_avg_sq": v}


def initial_state(opt: OptimizerSpec, param: np.ndarray) -> dict[str, np.ndarray]:
    return {slot: np.zeros_like(param) for slot in opt.slots()}
