"""The artifact contract: the one definition of the format that the compiler writes and the runtime reads.

numpy + stdlib only (the device imports it). It holds the file names, the names of the training step's
inputs and outputs, the dtype table, and the manifest as dataclasses: `Manifest.to_json` is exactly what
the compiler writes to manifest.json, `Manifest.from_json` is the runtime's structural validation of it
(ArtifactError naming the field). docs/artifact.md describes the same format for people.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from pockprop.errors import ArtifactError

FORMAT = "pockprop-artifact"
FORMAT_VERSION = 1

# -- file names -----------------------------------------------------------------------------------
TRAIN_STEP_FILE = "train_step.onnx"
INFER_FILE = "infer.onnx"
VJP_FILE = "vjp.onnx"  # a split part's gradients without an update (compiler/split.py, private backpropagation)
APPLY_FILE = "apply.onnx"  # a split part's optimizer update with given gradients
STATE_FILE = "state.safetensors"
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.json"  # the compile report (optional), hashed like every other file


def weights_file(k: int) -> str:
    """The k-th file of ONNX external data that a large model's graphs share (artifact/external.py)."""
    return f"weights-{k}.bin"

# -- names of the training step's inputs and outputs ----------------------------------------------
LOSS = "loss"  # the training step's scalar loss output
LABELS = "labels"  # its labels input
LR = "lr"  # its float32 scalar learning-rate input
STEP = "optimizer.step"  # AdamW's float32 scalar step counter, a state tensor of its own
# A split part below the loss (compiler/split.py) trains on the gradient of its output, fed as its labels: its
# step's loss is sum(output * labels), whose gradient with respect to the output is exactly those labels.
OUTPUT_GRADIENT = "output_gradient"
LOSS_NAMES = ("cross_entropy", "bce_with_logits", "mse", OUTPUT_GRADIENT)  # the manifest's loss.name
INPUT_GRADIENT = "grad_input"  # a split part's step output: the gradient of the loss with respect to its input
# The training step's extra data input of a kd loss whose teacher is "logits" (manifest loss.kd.input): the
# teacher's output for the batch, shaped and typed like the trained output. The inference graph lacks it.
TEACHER_LOGITS = "teacher_logits"
KD_TEACHERS = ("logits", "model")
_UPDATED = "new/"
_OPTIMIZER = "optimizer."


def updated(state: str) -> str:
    """The training step's output holding the updated value of state tensor `state`."""
    return f"{_UPDATED}{state}"


def gradient_of(param: str) -> str:
    """The gradient of trainable tensor `param`: an output of VJP_FILE and an input of APPLY_FILE."""
    return f"grad.{param}"


def optimizer_slot(slot: str, param: str) -> str:
    """The state tensor (and step input) holding optimizer slot `slot` (e.g. momentum) of parameter `param`."""
    return f"{_OPTIMIZER}{slot}.{param}"


# -- dtypes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DType:
    """One tensor dtype as each format spells it."""

    name: str  # numpy's dtype name, as the manifest writes it
    onnx: int  # onnx.TensorProto.DataType (written literally: the runtime does not import onnx)
    safetensors: str  # the safetensors header's dtype code
    ort: str  # onnxruntime's NodeArg.type


DTYPES = (
    DType("float32", 1, "F32", "tensor(float)"),
    DType("uint8", 2, "U8", "tensor(uint8)"),
    DType("int8", 3, "I8", "tensor(int8)"),
    DType("int32", 6, "I32", "tensor(int32)"),
    DType("int64", 7, "I64", "tensor(int64)"),
    DType("bool", 9, "BOOL", "tensor(bool)"),
    DType("float16", 10, "F16", "tensor(float16)"),
    DType("float64", 11, "F64", "tensor(double)"),
)
BY_NAME = {d.name: d for d in DTYPES}
BY_ONNX = {d.onnx: d for d in DTYPES}
BY_SAFETENSORS = {d.safetensors: d for d in DTYPES}
BY_ORT = {d.ort: d for d in DTYPES}

PREPROCESS_KEYS = {"resize", "antialias", "channel_order", "scale", "mean", "std"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
REQUIRED = ("format", "format_version", "graphs", "state_file", "data", "labels", "lr", "outputs", "state", "files")


def _fail(where: str, msg: str) -> ArtifactError:
    return ArtifactError(f"{where}: {msg}")


def is_plain_name(name: Any) -> bool:
    """A file name inside the artifact: no folder part, not hidden, not empty."""
    return isinstance(name, str) and bool(name) and name == os.path.basename(name) and not name.startswith(".")


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


# -- the manifest's parts -------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """A graph input the runtime feeds: name, shape (batch first), dtype. A float data input may say how
    raw samples become it (`preprocess`, see check_preprocess); an integer data input used as indices
    says which values the graph can take (`range`, inclusive [lowest, highest])."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    preprocess: dict[str, Any] | None = None
    range: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype} | (
            {"preprocess": self.preprocess} if self.preprocess else {}) | (
            {"range": list(self.range)} if self.range is not None else {})

    @classmethod
    def from_json(cls, spec: Any, what: str, where: str) -> "TensorSpec":
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _fail(where, f"{what}: expected an object with a name")
        if not _is_shape(spec.get("shape")) or spec.get("dtype") not in BY_NAME:
            raise _fail(where, f"{what} {spec['name']!r}: bad shape {spec.get('shape')!r} or dtype {spec.get('dtype')!r}")
        return cls(spec["name"], tuple(spec["shape"]), spec["dtype"])


def is_integer(dtype: str) -> bool:
    """An integer dtype of the table (bool is not one)."""
    return dtype.startswith(("int", "uint"))


def _data_input(d: Any, where: str) -> TensorSpec:
    """One entry of the manifest's `data`: a TensorSpec with a positive batch, `preprocess` only on a float
    input, `range` only on an integer one."""
    spec = TensorSpec.from_json(d, "data", where)
    what = f"data {spec.name!r}"
    if not spec.shape or spec.shape[0] < 1:
        raise _fail(where, f"{what}: the first dimension (batch size) must be positive")
    preprocess = check_preprocess(d.get("preprocess") or {}, where)
    if preprocess and not spec.dtype.startswith("float"):
        raise _fail(where, f"{what}: preprocess applies to float inputs, this one is {spec.dtype}")
    valid = d.get("range")
    if valid is not None:
        if not (isinstance(valid, list) and len(valid) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                   for v in valid) and valid[0] <= valid[1]):
            raise _fail(where, f"{what}: range must be [lowest, highest] integers, got {valid!r}")
        if not is_integer(spec.dtype):
            raise _fail(where, f"{what}: range applies to integer inputs, this one is {spec.dtype}")
    return TensorSpec(spec.name, spec.shape, spec.dtype, preprocess or None, None if valid is None else tuple(valid))


def _data_inputs(data: Any, reserved: set[str], where: str) -> list[TensorSpec]:
    """The manifest's `data`: one or more inputs with distinct names (none of them `reserved`, the
    labels' and lr's names) and one batch size."""
    if not isinstance(data, list) or not data:
        raise _fail(where, "data: expected a non-empty list of inputs")
    specs = [_data_input(d, where) for d in data]
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1} | (set(names) & reserved))
    if twice:
        raise _fail(where, f"data: input names must be distinct from each other, the labels and the lr; "
                           f"{', '.join(map(repr, twice))} repeat")
    batches = {s.shape[0] for s in specs}
    if len(batches) > 1:
        raise _fail(where, f"data: the inputs have different batch sizes {sorted(batches)}")
    return specs


def check_preprocess(p: Any, where: str) -> dict[str, Any]:
    """A data input's `preprocess` object (the steps docs/artifact.md defines, each with a value of its
    type), or ArtifactError."""
    if not isinstance(p, dict):
        raise _fail(where, "data preprocess: expected an object")
    unknown = set(p) - PREPROCESS_KEYS
    if unknown:
        raise _fail(where, f"data preprocess: unknown steps {sorted(unknown)}; this runtime knows "
                           f"{sorted(PREPROCESS_KEYS)}")
    finite = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < float("inf")  # noqa: E731
    numbers = lambda v: isinstance(v, list) and v and all(finite(x) for x in v)  # noqa: E731
    if "resize" in p and not (isinstance(p["resize"], list) and len(p["resize"]) == 2
                              and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in p["resize"])):
        raise _fail(where, f"data preprocess: resize must be [height, width], got {p['resize']!r}")
    if "antialias" in p and not isinstance(p["antialias"], bool):
        raise _fail(where, f"data preprocess: antialias must be true or false, got {p['antialias']!r}")
    if "channel_order" in p and p["channel_order"] not in ("rgb", "bgr"):
        raise _fail(where, f"data preprocess: channel_order must be \"rgb\" or \"bgr\", got {p['channel_order']!r}")
    if "scale" in p and not (finite(p["scale"]) and p["scale"] != 0):
        raise _fail(where, f"data preprocess: scale must be a finite non-zero number, got {p['scale']!r}")
    for k in ("mean", "std"):
        if k in p and not (numbers(p[k]) or finite(p[k])):
            raise _fail(where, f"data preprocess: {k} must be a finite number or a list of them, got {p[k]!r}")
    std = p.get("std", 1)
    if any(v == 0 for v in (std if isinstance(std, list) else [std])):
        raise _fail(where, "data preprocess: std must not be 0")
    return p


@dataclass(frozen=True)
class SliceSpec:
    """The part [start, stop) along `axis` of a parameter that a sliced state entry holds."""

    axis: int
    start: int
    stop: int

    def to_json(self) -> dict[str, int]:
        return {"axis": self.axis, "start": self.start, "stop": self.stop}

    def index(self, ndim: int) -> tuple[slice, ...]:
        """The numpy index of this part in the full parameter."""
        idx = [slice(None)] * ndim
        idx[self.axis] = slice(self.start, self.stop)
        return tuple(idx)


class StateRole(str, Enum):
    """What a state tensor is: a trainable tensor, optimizer state (slots, the step counter), or a statistic the
    step updates without training it (BatchNorm's running mean and variance with batchnorm="train"), which the
    inference graph reads like a parameter."""

    PARAM = "param"
    OPTIMIZER = "optimizer"
    STATISTIC = "statistic"


@dataclass(frozen=True)
class StateSpec:
    """One tensor of training state: fed as graph input `input`, returned updated as output `output`.

    `param`: for optimizer slots, the parameter they belong to; for a sliced param entry, the full
    parameter it is part of (`slice` says which part, `full_shape` the full parameter's shape).
    """

    name: str
    role: StateRole
    input: str
    output: str
    shape: tuple[int, ...]
    dtype: str
    param: str | None = None
    slot: str | None = None
    slice: SliceSpec | None = None
    full_shape: tuple[int, ...] | None = None

    @property
    def parameter(self) -> str:
        """The full parameter a param entry trains (itself, unless it is a slice)."""
        return self.param if self.slice is not None and self.param else self.name

    @property
    def parameter_shape(self) -> tuple[int, ...]:
        """The shape of `parameter`."""
        return self.full_shape if self.slice is not None and self.full_shape is not None else self.shape

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "role": self.role.value, "input": self.input, "output": self.output,
                             "shape": list(self.shape), "dtype": self.dtype}
        if self.param is not None:
            d["param"] = self.param
        if self.slot is not None:
            d["slot"] = self.slot
        if self.slice is not None:
            d["slice"] = self.slice.to_json()
            d["full_shape"] = list(self.full_shape or ())
        return d

    @classmethod
    def from_json(cls, s: Any, where: str) -> "StateSpec":
        t = TensorSpec.from_json(s, "state", where)
        what = f"state {t.name!r}"
        if s.get("role") not in [r.value for r in StateRole] or not isinstance(s.get("input"), str) \
                or not isinstance(s.get("output"), str):
            raise _fail(where, f"{what}: needs role param|optimizer|statistic, input and output")
        for k in ("param", "slot"):
            if s.get(k) is not None and not isinstance(s[k], str):
                raise _fail(where, f"{what}: {k} must be a name, got {s[k]!r}")
        spec = cls(t.name, StateRole(s["role"]), s["input"], s["output"], t.shape, t.dtype, s.get("param"), s.get("slot"))
        return spec if "slice" not in s else spec._sliced(s["slice"], s.get("full_shape"), where)

    def _sliced(self, sl: Any, full: Any, where: str) -> "StateSpec":
        """A param entry that is part of a parameter: full_shape, and `shape` = full_shape cut on one axis."""
        what = f"state {self.name!r}"
        if self.role != StateRole.PARAM or self.param is None:
            raise _fail(where, f"{what}: a slice belongs to a param entry naming its full parameter ('param')")
        if not isinstance(sl, dict) or not all(isinstance(sl.get(k), int) for k in ("axis", "start", "stop")):
            raise _fail(where, f"{what}: slice must be {{axis, start, stop}}")
        if not _is_shape(full) or not 0 <= sl["axis"] < len(full) or not 0 <= sl["start"] < sl["stop"] <= full[sl["axis"]]:
            raise _fail(where, f"{what}: slice {sl} does not fit full_shape {full}")
        expect = list(full)
        expect[sl["axis"]] = sl["stop"] - sl["start"]
        if expect != list(self.shape):
            raise _fail(where, f"{what}: shape {list(self.shape)} is not full_shape {full} cut by slice {sl}")
        return StateSpec(self.name, self.role, self.input, self.output, self.shape, self.dtype, self.param, self.slot,
                         SliceSpec(sl["axis"], sl["start"], sl["stop"]), tuple(full))


ADAPTER_KINDS = ("linear", "conv2d")


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter on a frozen weight: the layer computes W x + scale * B(A x); its merged weight is
    W + scale * B A. `weight` is an initializer (and overridable input) of the inference graph, which holds
    no adapter nodes; `a` and `b` are param state entries. linear: W (out, in), A (r, in), B (out, r);
    conv2d: W (out, in, kh, kw), A (r, in, kh, kw) a conv like W's, B (out, r, 1, 1) a 1x1 conv."""

    weight: str
    a: str
    b: str
    scale: float
    kind: str
    shape: tuple[int, ...]  # W's

    def merge(self, w: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """W + scale * B A: the one weight that predicts what the adapted layer computes."""
        delta = b @ a if self.kind == "linear" else np.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
        return (w + np.asarray(self.scale, w.dtype) * delta.astype(w.dtype)).astype(w.dtype)

    def expected_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes A and B must have for W's shape at rank r."""
        out, cin = self.shape[0], self.shape[1]
        if self.kind == "linear":
            return (r, cin), (out, r)
        return (r, cin) + tuple(self.shape[2:]), (out, r, 1, 1)

    def to_json(self) -> dict[str, Any]:
        return {"weight": self.weight, "a": self.a, "b": self.b, "scale": self.scale, "kind": self.kind,
                "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: Any, state: dict[str, "StateSpec"], where: str) -> "AdapterSpec":
        """One entry of the manifest's `adapters`: A and B name unsliced param entries whose shapes fit W's."""
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("weight", "a", "b")):
            raise _fail(where, "adapters: expected objects {weight, a, b, scale, kind, shape}")
        what = f"adapter of {d['weight']!r}"
        scale = d.get("scale")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise _fail(where, f"{what}: scale must be a finite number, got {scale!r:.80}")
        if d.get("kind") not in ADAPTER_KINDS:
            raise _fail(where, f"{what}: kind must be one of {', '.join(ADAPTER_KINDS)}, got {d.get('kind')!r:.80}")
        rank = 2 if d["kind"] == "linear" else 4
        if not _is_shape(d.get("shape")) or len(d["shape"]) != rank:
            raise _fail(where, f"{what}: shape must be a {rank}-D shape, got {d.get('shape')!r:.80}")
        spec = cls(d["weight"], d["a"], d["b"], float(scale), d["kind"], tuple(d["shape"]))
        if spec.weight in state:
            raise _fail(where, f"{what}: the adapted weight is frozen, it cannot also be a state entry")
        for part in (spec.a, spec.b):
            s = state.get(part)
            if s is None or s.role != StateRole.PARAM or s.slice is not None:
                raise _fail(where, f"{what}: {part!r} is not a whole trainable (param) state entry")
        a, b = state[spec.a].shape, state[spec.b].shape
        if not a or (a, b) != spec.expected_shapes(a[0]):
            raise _fail(where, f"{what}: A {list(a)} and B {list(b)} do not fit W {list(spec.shape)} ({spec.kind})")
        return spec


def _adapters(doc: Any, state: list["StateSpec"], where: str) -> list[AdapterSpec]:
    """The manifest's optional `adapters` ([] when absent): each weight adapted once, A and B used once."""
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise _fail(where, "adapters: expected a list")
    by_name = {s.name: s for s in state}
    specs = [AdapterSpec.from_json(d, by_name, where) for d in doc]
    names = [n for s in specs for n in (s.weight, s.a, s.b)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise _fail(where, f"adapters: {', '.join(map(repr, twice))} appear in more than one place")
    return specs


def check_loss(loss: Any, where: str) -> dict[str, Any]:
    """The manifest's `loss` object ({} when absent): a known name, label_smoothing in [0, 1), an integer
    ignore_index, pos_weight a list of numbers >= 0 (BCE); or ArtifactError."""
    if loss is None or loss == {}:
        return {}
    if not isinstance(loss, dict):
        raise _fail(where, f"loss: expected an object, got {loss!r:.80}")
    if loss.get("name") not in LOSS_NAMES:
        raise _fail(where, f"loss: name {loss.get('name')!r} is not one of {', '.join(LOSS_NAMES)}")
    eps = loss.get("label_smoothing", 0.0)
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 <= eps < 1):
        raise _fail(where, f"loss: label_smoothing must be a number in [0, 1), got {eps!r:.80}")
    ignore = loss.get("ignore_index")
    if ignore is not None and (not isinstance(ignore, int) or isinstance(ignore, bool)):
        raise _fail(where, f"loss: ignore_index must be an integer, got {ignore!r:.80}")
    pos = loss.get("pos_weight")
    if pos is not None and not (isinstance(pos, list) and pos and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf") for v in pos)):
        raise _fail(where, f"loss: pos_weight must be a list of numbers >= 0, got {pos!r:.80}")
    if "kd" in loss:
        _check_kd(loss["kd"], where)
    return loss


def _check_kd(kd: Any, where: str) -> None:
    """The loss's `kd` object: alpha in [0, 1], temperature > 0, teacher logits|model; with teacher
    "logits", `input`: the TEACHER_LOGITS input's spec."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if not isinstance(kd, dict) or not number(kd.get("alpha")) or not number(kd.get("temperature")):
        raise _fail(where, f"loss: kd must be {{alpha, temperature, teacher}}, got {kd!r:.80}")
    if not 0 <= kd["alpha"] <= 1 or not 0 < kd["temperature"] < float("inf"):
        raise _fail(where, f"loss: kd alpha must be in [0, 1] and temperature > 0, got {kd!r:.80}")
    if kd.get("teacher") not in KD_TEACHERS:
        raise _fail(where, f"loss: kd teacher must be one of {', '.join(KD_TEACHERS)}, got {kd.get('teacher')!r:.80}")
    if kd["teacher"] == "logits":
        spec = TensorSpec.from_json(kd.get("input"), "loss kd input", where)
        if spec.name != TEACHER_LOGITS or not spec.dtype.startswith("float"):
            raise _fail(where, f"loss: kd input must be a float input named {TEACHER_LOGITS!r}, got {spec.name!r}")


def teacher_input(loss: dict[str, Any]) -> TensorSpec | None:
    """The training step's TEACHER_LOGITS input of a checked manifest loss (a kd loss with teacher "logits"),
    or None."""
    kd = loss.get("kd")
    if not kd or kd.get("teacher") != "logits":
        return None
    return TensorSpec.from_json(kd["input"], "loss kd input", "manifest")


@dataclass(frozen=True)
class Graphs:
    """The file names of the two graphs."""

    train_step: str = TRAIN_STEP_FILE
    infer: str = INFER_FILE


@dataclass(frozen=True)
class LearningRate:
    """The training step's learning-rate input and the rate it was compiled with."""

    name: str
    initial: float


@dataclass(frozen=True)
class Outputs:
    """The names of the loss output (training step) and of the model's output (both graphs)."""

    loss: str
    prediction: str


def _object(doc: dict[str, Any], key: str, where: str, null: bool = True) -> Any:
    """An optional field that must be a JSON object when present (or null, where allowed)."""
    value = doc.get(key)
    if not (isinstance(value, dict) or (null and value is None)):
        raise _fail(where, f"{key}: expected an object, got {value!r}")
    return value


@dataclass(frozen=True)
class SplitSpec:
    """One part of a model cut at module boundaries (compiler/split.py, docs/split.md).

    Part `index` of `parts` (0 holds the model's inputs, the last its output and loss). `id` is the same in
    every part of one split compile and differs between compiles, so parts of two compiles never pair.
    `cut_in` / `cut_out`: the module paths of the cuts before and after this part (None
    at the model's ends). `input_gradient`: the step output holding the gradient of the loss with respect to
    this part's input, None where no part below trains (backprop stops here). A part other than the last
    takes the gradient of its output as its labels (loss name OUTPUT_GRADIENT). `vjp` / `apply`: the files
    of a part compiled for private backpropagation (VJP_FILE, APPLY_FILE), else None."""

    id: str
    index: int
    parts: int
    cut_in: str | None
    cut_out: str | None
    input_gradient: str | None
    vjp: str | None = None
    apply: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {"id": self.id, "index": self.index, "parts": self.parts, "cut_in": self.cut_in,
               "cut_out": self.cut_out, "input_gradient": self.input_gradient}
        return doc | ({"vjp": self.vjp, "apply": self.apply} if self.vjp else {})

    @classmethod
    def from_json(cls, doc: Any, where: str) -> "SplitSpec | None":
        if doc is None:
            return None
        ok = (isinstance(doc, dict) and isinstance(doc.get("id"), str) and _SHA256.match(doc["id"])
              and all(isinstance(doc.get(k), int) and not isinstance(doc.get(k), bool) for k in ("index", "parts"))
              and all(doc.get(k) is None or isinstance(doc.get(k), str)
                      for k in ("cut_in", "cut_out", "input_gradient", "vjp", "apply")))
        if not ok or not 0 <= doc["index"] < doc["parts"] or doc["parts"] < 2:
            raise _fail(where, f"split: expected {{id, index, parts, cut_in, cut_out, input_gradient}}, got {doc!r:.120}")
        if (doc["cut_in"] is None) != (doc["index"] == 0) or (doc["cut_out"] is None) != (doc["index"] == doc["parts"] - 1):
            raise _fail(where, f"split: part {doc['index']} of {doc['parts']} with cuts {doc['cut_in']!r}, {doc['cut_out']!r}")
        if doc["input_gradient"] is not None and doc["index"] == 0:
            raise _fail(where, "split: the first part has no input gradient (its input is the data)")
        if (doc.get("vjp") is None) != (doc.get("apply") is None):
            raise _fail(where, "split: vjp and apply come together")
        return cls(doc["id"], doc["index"], doc["parts"], doc["cut_in"], doc["cut_out"], doc["input_gradient"],
                   doc.get("vjp"), doc.get("apply"))


@dataclass(frozen=True)
class Manifest:
    """manifest.json (`to_json` writes the fields in the file's order). `files` maps every other file of
    the artifact, external-data files included, to its sha256: nothing unlisted is ever read."""

    model: str | None
    data: list[TensorSpec]  # the model's inputs, in the order of its forward's arguments
    labels: TensorSpec
    lr: LearningRate
    outputs: Outputs
    state: list[StateSpec]
    files: dict[str, str] = field(default_factory=dict)
    graphs: Graphs = Graphs()
    state_file: str = STATE_FILE
    pockprop_version: str | None = None
    onnx: dict[str, Any] | None = None  # {"opset", "ir_version"}
    trainable: dict[str, Any] | None = None  # {"parameters": [names], "count", "total"}: displayed only
    scheme: dict[str, Any] | None = None  # the update scheme compiled with: displayed only
    # {"name", "label_smoothing"?, "ignore_index"?, "kd"?}: name is the task loss the runtime evaluates; with
    # "kd" ({alpha, temperature, teacher, input?}) the step's loss is the distillation loss (compiler/distill.py)
    loss: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None  # the optimizer's settings: displayed only
    source: dict[str, Any] | None = None  # how to rebuild the model (pockprop search); never executed
    lowerings: dict[str, Any] | None = None  # target profile used, lowering per node (docs/tuning.md): displayed only
    adapters: list[AdapterSpec] = field(default_factory=list)  # LoRA adapters the runtime merges into infer's weights
    split: SplitSpec | None = None  # where this part sits in a split model (compiler/split.py)

    @property
    def input(self) -> TensorSpec:
        """The first data input (the one `preprocess` describes)."""
        return self.data[0]

    def to_json(self) -> dict[str, Any]:
        """The manifest document; optional fields that are None are left out (scheme is written as null)."""
        head = {"format": FORMAT, "format_version": FORMAT_VERSION, "pockprop_version": self.pockprop_version,
                "onnx": self.onnx, "model": self.model}
        doc = {k: v for k, v in head.items() if v is not None} | {
            "graphs": {"train_step": self.graphs.train_step, "infer": self.graphs.infer},
            "state_file": self.state_file,
            "data": [d.to_json() for d in self.data],
            "labels": self.labels.to_json(),
            "lr": {"name": self.lr.name, "initial": self.lr.initial},
            "outputs": {"loss": self.outputs.loss, "prediction": self.outputs.prediction},
            "state": [s.to_json() for s in self.state],
        }
        if self.trainable is not None:
            doc["trainable"] = self.trainable
        doc["scheme"] = self.scheme
        doc["loss"] = self.loss
        if self.optimizer is not None:
            doc["optimizer"] = self.optimizer
        if self.source:
            doc["source"] = self.source
        if self.lowerings is not None:
            doc["lowerings"] = self.lowerings
        if self.adapters:
            doc["adapters"] = [a.to_json() for a in self.adapters]
        if self.split is not None:
            doc["split"] = self.split.to_json()
        doc["files"] = dict(self.files)
        return doc

    def dumps(self) -> bytes:
        """The bytes of manifest.json."""
        return (json.dumps(self.to_json(), indent=2) + "\n").encode()

    @classmethod
    def loads(cls, raw: bytes, where: str) -> "Manifest":
        """Parse and validate manifest.json's bytes; ArtifactError naming `where` and the field if wrong."""
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as ex:
            raise _fail(where, f"not valid JSON ({ex})") from None
        return cls.from_json(doc, where)

    @classmethod
    def from_json(cls, m: Any, where: str) -> "Manifest":
        """Check the document's structure (types, names, slices) and build the Manifest."""
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise _fail(where, "not a pockprop artifact manifest")
        version = m.get("format_version")
        if version != FORMAT_VERSION:
            raise _fail(where, f"format version {version!r}; this runtime reads version {FORMAT_VERSION} "
                               "(recompile the model, or update pockprop on the device)")
        missing = [k for k in REQUIRED if k not in m]
        if missing:
            raise _fail(where, f"missing fields {', '.join(missing)}")
        files = m["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) and _SHA256.match(v) for v in files.values()):
            raise _fail(where, "files: expected {file name: sha256 hex digest}")
        for name in files:
            if not is_plain_name(name):
                raise _fail(where, f"files: {name!r} is not a plain file name")
        graphs = m["graphs"]
        if not isinstance(graphs, dict) or not all(isinstance(graphs.get(k), str) for k in ("train_step", "infer")):
            raise _fail(where, "graphs: expected {train_step: file, infer: file}")
        if not isinstance(m["state_file"], str):
            raise _fail(where, f"state_file: expected a file name, got {m['state_file']!r}")
        split = SplitSpec.from_json(m.get("split"), where)
        extra = [split.vjp, split.apply] if split is not None and split.vjp else []
        for name in (graphs["train_step"], graphs["infer"], m["state_file"], *extra):
            if name not in files:
                raise _fail(where, f"{name!r} is not listed in files (no hash to check it against)")
        labels = TensorSpec.from_json(m["labels"], "labels", where)
        lr = m["lr"]
        if not isinstance(lr, dict) or not isinstance(lr.get("name"), str) or not isinstance(lr.get("initial"), (int, float)):
            raise _fail(where, "lr: expected {name, initial}")
        if isinstance(lr["initial"], bool) or not 0 <= lr["initial"] < float("inf"):  # NaN fails both
            raise _fail(where, f"lr: initial must be a finite number >= 0, got {lr['initial']!r}")
        data = _data_inputs(m["data"], {labels.name, lr["name"]}, where)
        outputs = m["outputs"]
        if not isinstance(outputs, dict) or not all(isinstance(outputs.get(k), str) for k in ("loss", "prediction")):
            raise _fail(where, "outputs: expected {loss, prediction}")
        # a split part may train nothing itself (it passes the gradient down, or runs only forward)
        if not isinstance(m["state"], list) or not (m["state"] or split):
            raise _fail(where, "state: expected a non-empty list")
        state: list[StateSpec] = []
        for s in m["state"]:
            spec = StateSpec.from_json(s, where)
            if any(spec.name == t.name for t in state):
                raise _fail(where, f"state {spec.name!r} listed twice")
            state.append(spec)
        for key in ("model", "pockprop_version"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise _fail(where, f"{key}: expected a string, got {m[key]!r}")
        return cls(
            model=m.get("model"), data=data,
            labels=labels, lr=LearningRate(lr["name"], lr["initial"]),
            outputs=Outputs(outputs["loss"], outputs["prediction"]), state=state, files=dict(files),
            graphs=Graphs(graphs["train_step"], graphs["infer"]), state_file=m["state_file"],
            pockprop_version=m.get("pockprop_version"), onnx=_object(m, "onnx", where),
            trainable=_object(m, "trainable", where), scheme=_object(m, "scheme", where),
            loss=check_loss(m.get("loss"), where), optimizer=_object(m, "optimizer", where),
            source=_object(m, "source", where), lowerings=_object(m, "lowerings", where),
            adapters=_adapters(m.get("adapters"), state, where), split=split)
