"""Knowledge distillation in the training step: `compile(..., loss="kd", kd={...})`.

The step's loss is alpha * task + (1 - alpha) * term, where task is the loss the labels train
(cross_entropy or bce_with_logits) and term compares the student's tempered output with a teacher's
(ops/distill.py: the softmax KL times T^2 for cross_entropy, the per-label binary KL times T^2 for
bce_with_logits). The teacher is one of:

- "logits": given with every batch. The step takes one more data input, named
  `pockprop.artifact.contract.TEACHER_LOGITS` ("teacher_logits"), shaped and typed like the trained
  output; the manifest's loss entry records it under kd.input. The inference graph does not take it.
- "model": the original model, frozen, compiled into the same step (`add_teacher`): a second copy of the
  forward graph from the first trained tensor on, reading the student's own frozen constants and
  activations wherever they are the same values, and a constant holding the original value of each
  trained tensor. For a sliced one that is the original slice, concatenated with the shared frozen rest;
  constant folding then joins the two into the original full tensor, so a sliced layer's frozen rest is
  stored twice (folding decides that for every all-constant node alike). Nothing in the copy depends on
  a trained tensor, so autodiff builds no backward node for it.

Labels stay those of the task (class indices, or multi-hot targets); rows the cross-entropy ignores
(-100) count in neither term.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pockprop.artifact.contract import TEACHER_LOGITS
from pockprop.errors import CompileError
from pockprop.ir import Graph, Node, Phase, Role
from pockprop.ops.builder import Builder

TASKS = {"cross_entropy": "kl_div_softmax", "bce_with_logits": "kl_div_sigmoid", "bce": "kl_div_sigmoid"}
TEACHERS = ("logits", "model")
TEACHER_SCOPE = "teacher"  # the module path prefix of the teacher copy's nodes


@dataclass(frozen=True)
class KDSpec:
    """A checked kd spec: task loss, weight alpha of the task in [0, 1], temperature T > 0, teacher."""

    task: str = "cross_entropy"
    alpha: float = 0.5
    temperature: float = 2.0
    teacher: str = "model"

    @property
    def term(self) -> str:
        """The distillation term's op."""
        return TASKS[self.task]

    def to_json(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "temperature": self.temperature, "teacher": self.teacher}


def parse_kd(spec: dict[str, Any] | str | None) -> KDSpec:
    """A KDSpec from a dict (or 'key=value,...' as the CLI takes it); CompileError naming a bad key or value."""
    if spec is None:
        return KDSpec()
    if isinstance(spec, str):
        spec = _pairs(spec)
    if not isinstance(spec, dict):
        raise CompileError(f"kd: expected a dict of task, alpha, temperature, teacher; got {type(spec).__name__}")
    unknown = sorted(set(spec) - {"task", "alpha", "temperature", "teacher"})
    if unknown:
        raise CompileError(f"kd: unknown key {unknown[0]!r}; the keys are task, alpha, temperature, teacher")
    task = spec.get("task", "cross_entropy")
    if task not in TASKS:
        raise CompileError(f"kd: task {task!r} is not one of cross_entropy, bce_with_logits")
    teacher = spec.get("teacher", "model")
    if teacher not in TEACHERS:
        raise CompileError(f"kd: teacher {teacher!r} is not one of {', '.join(TEACHERS)}")
    alpha = _number(spec.get("alpha", 0.5), "alpha")
    if not 0.0 <= alpha <= 1.0:
        raise CompileError(f"kd: alpha must be in [0, 1], got {alpha:g}")
    temperature = _number(spec.get("temperature", 2.0), "temperature")
    if not temperature > 0:
        raise CompileError(f"kd: temperature must be > 0, got {temperature:g}")
    return KDSpec("bce_with_logits" if task == "bce" else task, alpha, temperature, teacher)


def _pairs(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise CompileError(f"kd: expected key=value pairs like alpha=0.5,temperature=2, got {part!r}")
        out[key.strip()] = value.strip()
    return out


def _number(value: Any, key: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CompileError(f"kd: {key} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v):
        raise CompileError(f"kd: {key} must be a finite number, got {value!r}")
    return v


def add_kd_loss(g: Graph, out: str, labels: str, kd: KDSpec, teacher: str, label_smoothing: float) -> str:
    """alpha * task(out, labels) + (1 - alpha) * term(out, teacher) on the loss tape; returns the loss."""
    b = Builder(g, "loss", Phase.LOSS)
    task_attrs = {"label_smoothing": label_smoothing} if kd.task == "cross_entropy" else {}
    task = b.op(kd.task, [out, labels], hint="task_loss", **task_attrs)
    term_inputs = [out, teacher, labels] if kd.term == "kl_div_softmax" else [out, teacher]
    term = b.op(kd.term, term_inputs, hint="kd_term", temperature=kd.temperature)
    weighted = [b.op("mul", [task, b.scalar_like(kd.alpha, task)]),
                b.op("mul", [term, b.scalar_like(1.0 - kd.alpha, term)])]
    return b.op("add", weighted, hint="loss")


def teacher_logits_input(g: Graph, out: str) -> str:
    """The step's `teacher_logits` data input, typed like the trained output `out`."""
    if TEACHER_LOGITS in g.types:
        raise CompileError(f"the model already has a value named {TEACHER_LOGITS!r}, the kd teacher's input; "
                           "rename it in the model")
    return g.add_input(TEACHER_LOGITS, g.types[out], Role.DATA)


def add_teacher(g: Graph, originals: dict[str, np.ndarray]) -> str:
    """Append a frozen copy of forward graph `g`'s nodes (before any loss) and return its output.

    Each trained tensor p (a PARAMETER input) is read in the copy as a new constant holding
    `originals[p]`, its value before training (for a sliced parameter, the slice the input holds). Only
    the nodes that depend on a trained tensor are copied, their values renamed into the teacher's own
    (`teacher/<name>`); every other value (frozen constants, data inputs, and all that the student
    computes from them alone) is the student's, read under its own name: frozen weights are stored once
    and the frozen part of the forward pass runs once.
    """
    rename: dict[str, str] = {}
    for p in g.inputs:
        if g.roles.get(p) == Role.PARAMETER:
            rename[p] = g.add_constant(np.ascontiguousarray(originals[p]), name=g.fresh(f"{TEACHER_SCOPE}/{p}"))
    copies = []
    for node in list(g.nodes):
        if not any(i in rename for i in node.inputs):
            continue  # the same value as the student's
        for o in node.outputs:
            rename[o] = g.add_value(g.fresh(f"{TEACHER_SCOPE}/{o}"), g.types[o])
        ins = tuple(None if i is None else rename.get(i, i) for i in node.inputs)
        module = f"{TEACHER_SCOPE}.{node.module}" if node.module else TEACHER_SCOPE
        copies.append(Node(node.op, ins, tuple(rename[o] for o in node.outputs), node.attrs, module, Phase.FORWARD))
    for node in copies:
        g.append(node)
    return rename.get(g.outputs[0], g.outputs[0])
