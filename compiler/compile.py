"""compile(): a PyTorch model -> an Artifact holding the training-step and inference ONNX graphs.

Pipeline: trace (torch.export -> IR) -> lift trainable parameters to graph inputs -> loss ->
autodiff (VJP rules) -> optimizer update -> passes -> emit ONNX. Frozen tensors stay graph
constants; the backward graph only reaches what the trainable tensors need.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from pockprop.artifact.contract import (APPLY_FILE, INPUT_GRADIENT, LABELS, LOSS, LR, OUTPUT_GRADIENT, STEP,
                                       TEACHER_LOGITS, VJP_FILE, gradient_of, optimizer_slot, updated, weights_file)
from pockprop.artifact import external as external_data
from pockprop.artifact.external import ExternalArrays
from pockprop.autodiff.backward import backward
from pockprop.compiler import batchnorm as bn_modes
from pockprop.compiler import lora as lora_adapters
from pockprop.compiler import preprocess as preprocess_steps
from pockprop.compiler.artifact import Artifact, StateEntry
from pockprop.compiler.optim import build_update, initial_state, parse_optimizer
from pockprop.compiler.prompt import PROMPT, parse_prompt, with_prompt
from pockprop.compiler.blocks import module_tree
from pockprop.compiler.distill import KDSpec, add_kd_loss, add_teacher, parse_kd, teacher_logits_input
from pockprop.compiler.scheme import Layer, Scheme, discover_layers, load_scheme, resolve_scheme
from pockprop.compiler.target import TargetProfile, chooser_for, load_target_profile
from pockprop.compiler.target import record as record_lowerings
from pockprop.compiler.signature import example_args, index_ranges, pick_output
from pockprop.compiler.trainable import select, split_patterns
from pockprop.emit.onnx import to_onnx
from pockprop.errors import CompileError
from pockprop.ir import Graph, Node, Phase, Role, TensorType, module_of
from pockprop.ops.builder import Builder
from pockprop.ops.loss import IGNORE_INDEX, LOSSES, pos_weight_shape
from pockprop.ops.registry import FULL, Need
from pockprop.passes.lowerings import Chooser, choose_lowerings
from pockprop.passes.pipeline import INFERENCE, TRAINING, TRAINING_FORWARD, UNOPTIMIZED
from pockprop.tracing.trace import Traced, trace

def _part(array: np.ndarray, need: Need) -> np.ndarray:
    if need.is_full:
        return array
    idx = [slice(None)] * array.ndim
    idx[need.axis] = slice(need.start, need.stop)
    return np.ascontiguousarray(array[tuple(idx)])


def _label_type(loss: str, out: TensorType, labels: Any) -> TensorType:
    if labels is not None:
        t = torch.as_tensor(labels)
        return TensorType(tuple(t.shape), str(t.dtype).removeprefix("torch."))
    if loss == "cross_entropy":  # one class index per row of logits: (N,) for (N, C), (N, T) for (N, T, V)
        return TensorType(out.shape[:-1], "int64")
    return out


@dataclass
class PartOptions:
    """How compile_traced builds one part of a split model (compiler/split.py): what it trains (resolved on
    the whole model, so a part trains what the unsplit model would), its LoRA adapters, whether its labels
    are the gradient of its output (every part but the last) and whether its step returns the gradient of
    its input (a part above a trained one)."""

    needs: dict[str, Need]
    adapters: list[lora_adapters.Adapter]
    output_gradient: bool
    input_gradient: bool
    scheme: Any = None  # the whole model's ResolvedScheme restricted to the part's layers, for the manifest
    gradients: bool = False  # also the VJP graph (gradients, no update) and the apply graph (update from gradients)


@dataclass
class TracedModel:
    """A model traced once (torch.export -> IR), ready to be compiled with several schemes.

    `compile_traced` never mutates it (every compile works on copies of the graph), so scheme search
    compiles dozens of schemes from one trace: the trace is the slow part of compiling a small model.
    """

    traced: Traced
    tree: list[tuple[str, bool]]  # pockprop.compiler.blocks.module_tree(model): the blocks presets count
    name: str  # type(model).__name__, the artifact's default name
    adapters: list[lora_adapters.Adapter] = field(default_factory=list)  # a peft model's LoRA layers (stripped)
    prompt: str | None = None  # the soft prompt's parameter (compiler/prompt.py), trained whatever the scheme

    @property
    def layers(self) -> list[Layer]:
        """The model's layers in forward order (pockprop.compiler.scheme.discover_layers); a soft prompt is
        none of them: schemes see the model as it was."""
        params = [p for p in self.traced.parameters if p != self.prompt]
        return discover_layers(self.traced.graph, params, self.tree, self.traced.aliases)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {p: self.traced.graph.types[p].shape for p in self.traced.parameters}


def trace_model(model: torch.nn.Module, example_inputs: Any, output: str | None = None,
                prompt: dict[str, Any] | int | None = None) -> TracedModel:
    """Trace `model` once for `compile_traced` (puts it in eval form, as `compile` does); `example_inputs`,
    `output` and `prompt` as in `compile`."""
    spec = parse_prompt(prompt)
    name = type(model).__name__
    tree = module_tree(model)
    _check_peft(model)
    if spec is not None:
        model = with_prompt(model.eval(), spec)
    args, kwargs = example_args(example_inputs)
    traced = trace(model, args, kwargs)
    pick_output(traced, output)
    graph, parameters, adapters = lora_adapters.strip_peft(traced.graph, traced.parameters)
    traced.graph, traced.parameters = graph, parameters
    return TracedModel(traced, tree, name, adapters, PROMPT if spec is not None else None)


def _check_peft(model: torch.nn.Module) -> None:
    """A peft model's options that its eval-form trace would silently drop are refused (compiler/lora.py)."""
    for name, config in (getattr(model, "peft_config", None) or {}).items():
        if getattr(config, "lora_dropout", 0):
            raise CompileError(f"peft adapter {name!r}: lora_dropout={config.lora_dropout} is not supported, only 0")
        if getattr(config, "use_dora", False):
            raise CompileError(f"peft adapter {name!r}: DoRA (use_dora) is not supported")


def _check_options(loss: str, label_smoothing: float, trainable: Any, scheme: Any,
                   kd: dict[str, Any] | str | None = None, pos_weight: Any = None) -> tuple[str, KDSpec | None]:
    """(the task loss's op, the kd spec when loss is "kd"), or CompileError."""
    if kd is not None and loss != "kd":
        raise CompileError(f"kd settings apply to loss='kd', not {loss!r}")
    spec = parse_kd(kd) if loss == "kd" else None
    loss_op = spec.task if spec is not None else LOSSES.get(loss)
    if loss_op is None:
        raise CompileError(f"unknown loss {loss!r}; choose one of: {', '.join(sorted([*LOSSES, 'kd']))}")
    if pos_weight is not None and (loss_op != "bce_with_logits" or spec is not None):
        raise CompileError("pos_weight applies to bce_with_logits only (not inside kd)")
    if label_smoothing and loss_op != "cross_entropy":
        raise CompileError("label_smoothing applies to cross_entropy only")
    if not 0.0 <= label_smoothing < 1.0:
        raise CompileError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if trainable is not None and scheme is not None:
        raise CompileError("give either trainable patterns or a scheme, not both")
    return loss_op, spec


def compile(model: torch.nn.Module, example_inputs: Any, labels: Any = None,
            loss: str = "cross_entropy", optimizer: str | dict[str, Any] = "sgd",
            trainable: str | Iterable[str] | None = None, *, scheme: str | Scheme | dict[str, Any] | None = None,
            label_smoothing: float = 0.0, name: str | None = None,
            preprocess: str | dict[str, Any] | None = None, optimize: bool = True,
            output: str | None = None, target_profile: str | dict[str, Any] | TargetProfile | None = None,
            lora: Any = None, kd: dict[str, Any] | str | None = None,
            prompt: dict[str, Any] | int | None = None,
            pos_weight: float | Sequence[float] | None = None, batchnorm: str | None = None) -> Artifact:
    """Compile `model` into one ONNX training step (forward, loss, backward, update) + inference graph.

    example_inputs: a tensor, a tuple of positional tensors, or a dict of keyword tensors
    ({"input_ids": ids, "attention_mask": mask} for a Hugging Face model), fixing the inputs' shapes
    (batch size included) and dtypes; every tensor is a data input of both graphs, named by its forward
    argument. output: which returned tensor to train on when the model returns several (a ModelOutput's
    `logits`; see compiler/signature.py); a model returning one tensor needs none.
    labels: example labels fixing their shape/dtype (default: for cross_entropy int64 class indices
    shaped like the output without its last axis, (N,) for (N, C) logits and (N, T) for (N, T, V); else
    like the model output). cross_entropy takes classes on the last axis and ignores labels equal to
    -100 (torch's default ignore_index), averaging over the others. What is trained is given by either
    `trainable` (fnmatch patterns over parameter names, 'features.17.*', whole tensors; a shared
    parameter answers to each of its names) or `scheme` (a preset name like 'sparse', a YAML path, a
    dict or a Scheme: per-layer updates incl. channel slices; see compiler/scheme.py);
    with neither, every parameter is trained. preprocess: how raw device data becomes the model
    input, recorded in the manifest for the runtime (e.g. {"resize": [32, 32], "mean": [...], "std": [...]}),
    or a preset name ("imagenet", "unit", "none"; compiler/preprocess.py); none is recorded by default.
    With several inputs it describes the first one, which must then be a float input.
    pos_weight: bce_with_logits only, torch's BCEWithLogitsLoss(pos_weight=...): one weight or one per
    label (the output's last axis) on the positive term; recorded in the manifest's loss entry.
    optimize=False skips the optimization passes (BatchNorm folding, constant folding, saving slices
    and masks for backward, update reordering): the same step, as autodiff built it; for debugging.
    target_profile: the lowering of each op that offers several, from a profile measured on the target with
    `pockprop tune` (a path, `default` or a shipped architecture's name, or the parsed JSON;
    pockprop.compiler.target); keys it lacks, and every key without one, go to the fallback chooser.
    lora: LoRA adapters on the layers it targets ({"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
    compiler/lora.py): only their A and B are trained, besides whatever `trainable` or `scheme` names
    (with neither, only the adapters). A model wrapped by peft trains its adapters the same way. The
    inference graph holds one weight per adapted layer, which the runtime merges (W + alpha/r B A).
    loss="kd" distills: kd={"task": "cross_entropy"|"bce_with_logits", "alpha": 0.5, "temperature": 2.0,
    "teacher": "model"|"logits"} (those are the defaults); see compiler/distill.py.
    prompt={"tokens": P, "init": "vocab"|"random"} prepends a trainable soft prompt after the embedding
    layer (compiler/prompt.py); it trains with what `trainable` or `scheme` selects, or alone if neither
    is given.
    batchnorm: "frozen" (batch norm with its running statistics, as traced in eval form) or "train" (as
    PyTorch's model.train(): batch statistics in the step, the running statistics updated as state;
    compiler/batchnorm.py); None (the default): the scheme's `batchnorm`, else frozen.

    The same as `compile_traced(trace_model(model, example_inputs), ...)`; use those two to compile
    one model with several schemes while tracing it once.
    """
    _check_options(loss, label_smoothing, trainable, scheme, kd, pos_weight)
    parse_optimizer(optimizer)
    parse_prompt(prompt)
    if scheme is not None:
        scheme = load_scheme(scheme)  # a bad scheme fails before the slow trace
    batchnorm_mode(batchnorm, scheme)
    if target_profile is not None:
        target_profile = load_target_profile(target_profile)  # so does a bad profile
    if lora is not None:
        lora = lora_adapters.parse_spec(lora)
    return compile_traced(trace_model(model, example_inputs, output, prompt), labels, loss, optimizer, trainable,
                          scheme=scheme, label_smoothing=label_smoothing, name=name, preprocess=preprocess,
                          optimize=optimize, target_profile=target_profile, lora=lora, kd=kd, pos_weight=pos_weight,
                          batchnorm=batchnorm)


def compile_traced(tm: TracedModel, labels: Any = None, loss: str = "cross_entropy",
                   optimizer: str | dict[str, Any] = "sgd", trainable: str | Iterable[str] | None = None, *,
                   scheme: str | Scheme | dict[str, Any] | None = None, label_smoothing: float = 0.0,
                   name: str | None = None, preprocess: str | dict[str, Any] | None = None,
                   optimize: bool = True, choose_lowering: Chooser | None = None,
                   target_profile: str | dict[str, Any] | TargetProfile | None = None, lora: Any = None,
                   kd: dict[str, Any] | str | None = None,
                   pos_weight: float | Sequence[float] | None = None, part: PartOptions | None = None,
                   batchnorm: str | None = None) -> Artifact:
    """`compile` of an already traced model (see `trace_model`); the arguments mean the same.

    choose_lowering: picks each node's lowering among those its op offers (passes/lowerings.py); by
    default the target profile's choice, else `pockprop.compiler.target.fallback_chooser()`'s.
    part: set by compiler/split.py for one part of a split model (PartOptions); trainable, scheme and
    lora are then the whole model's, already resolved into it."""
    loss_op, kd_spec = _check_options(loss, label_smoothing, trainable, scheme, kd, pos_weight)
    target = None if target_profile is None else load_target_profile(target_profile)
    if choose_lowering is None:
        choose_lowering = chooser_for(target)
    opt = parse_optimizer(optimizer)
    spec = load_scheme(scheme) if scheme is not None else None
    batchnorm = batchnorm_mode(batchnorm, spec)
    lora_spec = lora_adapters.parse_spec(lora) if lora is not None else None
    traced = tm.traced
    if part is not None:
        needs, resolved, adapters = dict(part.needs), part.scheme, list(part.adapters)
    else:
        needs, resolved, adapters = resolve_training(tm, trainable, spec, lora_spec)
    grad_input = traced.user_inputs[0] if part is not None and part.input_gradient else None
    chosen = [p for p in traced.parameters if p in needs]  # model order

    full_values = {p: traced.graph.constants[p] for p in chosen}
    if batchnorm == "train" and kd_spec is not None:
        raise CompileError("batchnorm='train' with loss 'kd' is not supported")
    stat_values = {s: traced.graph.constants[s] for s in bn_modes.statistics(traced.graph)} if batchnorm == "train" \
        else {}
    # the inference graph: each adapted weight an input with a default, which the runtime feeds merged; and
    # the running statistics that the step updates
    infer_values = full_values | {ad.spec.weight: traced.graph.constants[ad.spec.weight] for ad in adapters} \
        | stat_values
    infer, _ = _lift(traced.graph.copy(), dict.fromkeys(infer_values, FULL))
    infer = choose_lowerings((INFERENCE if optimize else UNOPTIMIZED)(infer).graph, choose_lowering).graph
    # (copied after the inference graph: each copy takes fresh value names from the trace's counter)
    train_src = lora_adapters.insert(traced.graph.copy(), adapters)
    stats: list[bn_modes.Statistic] = []
    if batchnorm == "train":
        train_src, stats = bn_modes.train_mode(train_src)
    adapted = {n: v for ad in adapters for n, v in ((ad.spec.a, ad.a_value), (ad.spec.b, ad.b_value))}
    train_fwd, wants = _lift(train_src, {p: needs[p] for p in chosen} | dict.fromkeys(adapted, FULL))
    if optimize:
        train_fwd = TRAINING_FORWARD(train_fwd).graph
    teacher_model = kd_spec is not None and kd_spec.teacher == "model"  # reads the trained tensors' originals
    # (a LoRA teacher reads A and B as they start: B = 0, the model without its adapters)
    originals = ({p: _part(full_values[p], needs[p]) for p in chosen} | adapted) if teacher_model else {}
    loss_attrs = _loss_attrs(loss_op, label_smoothing, pos_weight, traced.graph.types[traced.graph.outputs[0]])
    if part is not None and part.output_gradient:
        loss_op, loss_attrs = OUTPUT_GRADIENT, {}
    statistics = [StateEntry.statistic(s.name, s.updated, stat_values[s.name]) for s in stats]
    train, state = _training_graph(train_fwd, wants, full_values | adapted, loss_op, labels, opt, loss_attrs,
                                   optimize, kd_spec, originals, grad_input, statistics)
    train = choose_lowerings(train, choose_lowering).graph

    model_name = name or tm.name
    external = _external_data(train, infer, infer_values)
    extra = {}
    if part is not None and part.gradients:
        vjp = choose_lowerings(_vjp_graph(train_fwd, wants, grad_input, optimize), choose_lowering).graph
        apply = _apply_graph(train_fwd, wants, full_values | adapted, opt)
        extra = {VJP_FILE: to_onnx(vjp, f"{model_name}.vjp", doc="pockprop split part: gradients", external=external),
                 APPLY_FILE: to_onnx(apply, f"{model_name}.apply", doc="pockprop split part: update from gradients",
                                     external=external)}
    return Artifact(
        name=model_name,
        train_model=to_onnx(train, f"{model_name}.train_step", doc="pockprop training step", external=external),
        infer_model=to_onnx(infer, f"{model_name}.infer", input_defaults=infer_values, doc="pockprop inference",
                            external=external),
        external=external,
        state=state,
        data_inputs=[(n, traced.graph.types[n]) for n in traced.user_inputs],
        input_ranges=index_ranges(traced.graph, traced.user_inputs),
        labels=(LABELS, train.types[LABELS]),
        output=traced.graph.outputs[0],
        loss={"name": loss_op, **({"label_smoothing": label_smoothing} if label_smoothing else {}),
              **({"ignore_index": IGNORE_INDEX} if loss_op == "cross_entropy" else {}),
              **({"pos_weight": list(loss_attrs["pos_weight"])} if "pos_weight" in loss_attrs else {}),
              **({"kd": _kd_entry(kd_spec, train)} if kd_spec is not None else {})},
        optimizer=opt,
        trainable=chosen + list(adapted),
        adapters=[ad.spec for ad in adapters],
        parameter_count={p: int(traced.graph.types[p].numel) for p in traced.parameters},
        train_graph=train,
        preprocess=_preprocess(preprocess, traced),
        scheme=resolved,
        lowerings=record_lowerings(train, target),
        extra_models=extra,
    )


def batchnorm_mode(batchnorm: str | None, scheme: Scheme | str | None) -> str:
    """The batch-norm mode of a compile: the argument, else the scheme's (a preset's: frozen); CompileError when
    they disagree."""
    own = scheme.batchnorm if isinstance(scheme, Scheme) else "frozen"
    if batchnorm is None:
        return own
    bn_modes.check_mode(batchnorm)
    if isinstance(scheme, Scheme) and own != batchnorm and own != "frozen":
        raise CompileError(f"batchnorm={batchnorm!r}, but the scheme {scheme.name} says batchnorm: {own}")
    return batchnorm


def resolve_training(tm: TracedModel, trainable: str | Iterable[str] | None, scheme: Scheme | None,
                     lora: lora_adapters.LoraSpec | None) -> tuple[dict[str, Need], Any, list[lora_adapters.Adapter]]:
    """What a compile trains: (the part of each trained parameter, the resolved scheme or None, the LoRA
    adapters), from `trainable` patterns or a scheme (neither: every parameter, or with adapters or a soft
    prompt only those), the prompt always; CompileError if that is nothing."""
    resolved = None
    if scheme is not None:
        resolved = resolve_scheme(scheme, tm.layers, tm.shapes)
        needs = resolved.needs()
    elif trainable is None and (tm.adapters or lora is not None or tm.prompt is not None):
        needs = {}  # only the adapters and the prompt, as peft trains
    else:
        needs = {p: FULL for p in _select(trainable, tm.traced)}
    if tm.prompt is not None:
        needs[tm.prompt] = FULL
    adapters = _adapters(tm, lora, needs)
    if not needs and not adapters:
        raise CompileError("the model has no parameters to train")
    return needs, resolved, adapters


def _adapters(tm: TracedModel, spec: lora_adapters.LoraSpec | None,
              needs: dict[str, Need]) -> list[lora_adapters.Adapter]:
    """The peft model's adapters and those `spec` asks for; none on a weight that is also trained."""
    adapters = list(tm.adapters)
    if spec is not None:
        taken = {ad.spec.weight for ad in adapters} | set(needs)
        adapters += lora_adapters.plan(spec, tm.traced.graph, tm.traced.parameters, taken)
    both = [ad.spec.weight for ad in adapters if ad.spec.weight in needs]
    if both:
        raise CompileError(f"{', '.join(both)}: adapted by LoRA and also trained (scheme or trainable); "
                           "train one or the other")
    return adapters
def _kd_entry(kd: KDSpec, train: Graph) -> dict[str, Any]:
    """The manifest loss's kd object; with teacher "logits", `input` is the TEACHER_LOGITS input's spec."""
    entry = kd.to_json()
    if kd.teacher == "logits":
        t = train.types[TEACHER_LOGITS]
        entry["input"] = {"name": TEACHER_LOGITS, "shape": list(t.shape), "dtype": t.dtype}
    return entry


def _external_data(train: Graph, infer: Graph, defaults: dict[str, np.ndarray]) -> ExternalArrays | None:
    """The layout of the graphs' shared external data if their distinct initializers (each array counted
    once: both graphs read the same frozen weights) exceed `artifact.external.threshold()`, else None."""
    arrays = {id(a): a for g in (train, infer) for a in g.constants.values()} | {id(a): a for a in defaults.values()}
    if sum(a.nbytes for a in arrays.values()) <= external_data.threshold():
        return None
    return ExternalArrays(weights_file)


def _preprocess(spec: str | dict[str, Any] | None, traced: Traced) -> dict[str, Any]:
    """The first data input's preprocess: a checked dict, or a preset name resolved for its shape."""
    if not traced.user_inputs:
        raise CompileError("the model takes no tensor input")
    name = traced.user_inputs[0]
    t = traced.graph.types[name]
    if isinstance(spec, str):
        steps = preprocess_steps.resolve(spec, t.shape, flag="preprocess")
    else:
        steps = preprocess_steps.check(dict(spec), t.shape) if spec else {}
    if steps and not t.dtype.startswith("float"):
        raise CompileError(f"preprocess applies to float inputs; the first input {name!r} is {t.dtype}")
    return steps


def _select(trainable: str | Iterable[str] | None, traced: Traced) -> list[str]:
    """The parameters `trainable` names; a pattern may name a shared parameter by any of its names."""
    names = select(split_patterns(trainable), traced.parameters + list(traced.aliases), traced.buffers)
    return list(dict.fromkeys(traced.aliases.get(p, p) for p in names))


def _lift(g: Graph, needs: dict[str, Need]) -> tuple[Graph, dict[str, tuple[str, Need]]]:
    """Make the trainable tensors graph inputs; the frozen rest of a sliced one stays a constant.

    A parameter updated on a slice [0, k) along an axis becomes the input `p` holding just the slice,
    concatenated with the constant rest into the value the forward graph uses. Returns, per parameter,
    the value to differentiate and the part of its gradient wanted.
    """
    wants: dict[str, tuple[str, Need]] = {}
    merges = []
    for p, need in needs.items():
        if need.is_full:
            g.lift(p, Role.PARAMETER)
            wants[p] = (p, need)
            continue
        full = g.constants.pop(p)
        idx = [slice(None)] * full.ndim
        idx[need.axis] = slice(need.start, need.stop)
        rest = [slice(None)] * full.ndim
        rest[need.axis] = slice(need.stop, None)
        del g.types[p]
        g.add_input(p, TensorType(tuple(full[tuple(idx)].shape), full.dtype.name), Role.PARAMETER)
        frozen = g.add_constant(np.ascontiguousarray(full[tuple(rest)]), name=g.fresh(f"{p}.frozen"))
        merged = g.add_value(g.fresh(f"{p}.merged"), TensorType(full.shape, full.dtype.name))
        g.replace_all_uses(p, merged)
        merges.append(Node("concat", (p, frozen), (merged,), {"axis": need.axis}, module_of(p)))
        wants[p] = (merged, need)
    g.insert(0, merges)
    return g, wants


def _training_graph(fwd: Graph, wants: dict[str, tuple[str, Need]], full_values: dict[str, np.ndarray],
                    loss_op: str, labels: Any, opt: Any, loss_attrs: dict[str, Any],
                    optimize: bool, kd: KDSpec | None = None,
                    originals: dict[str, np.ndarray] | None = None,
                    grad_input: str | None = None,
                    statistics: list[StateEntry] | None = None) -> tuple[Graph, list[StateEntry]]:
    """The training step from the forward graph, in named stages: (the kd teacher,) loss, gradients,
    optimizer update, output names, then the training pass pipeline. `originals`: each trained input's
    value before training, which a teacher="model" copy reads. `grad_input`: a data input whose gradient
    the step also returns, as INPUT_GRADIENT (a split part's input). `statistics`: state the forward graph
    updates itself (train-mode batch norm's running statistics), returned beside the optimizer's."""
    g = fwd.copy()
    out = g.outputs[0]
    loss = _add_loss(g, out, loss_op, labels, loss_attrs, kd, originals or {})
    grads, d_input = _differentiate(g, loss, wants, grad_input)
    state = _add_optimizer(g, opt, wants, grads, full_values) + list(statistics or [])
    _name_outputs(g, loss, out, state, d_input)
    g = (TRAINING if optimize else UNOPTIMIZED)(g).graph
    g.verify()
    return g, state


def _vjp_graph(fwd: Graph, wants: dict[str, tuple[str, Need]], grad_input: str | None, optimize: bool) -> Graph:
    """A split part's gradients without an update: (data, output gradient as labels, trained tensors) ->
    the gradient of each trained tensor (gradient_of) and of the input. The backward pass is linear in the
    output gradient, which private backpropagation relies on (runtime/private_backprop.py)."""
    g = fwd.copy()
    out = g.outputs[0]
    loss = _add_loss(g, out, OUTPUT_GRADIENT, None, {})
    grads, d_input = _differentiate(g, loss, wants, grad_input)
    names = {grads[p]: gradient_of(p) for p in wants} | ({d_input: INPUT_GRADIENT} if d_input else {})
    for old, new in names.items():
        g.rename_value(old, new)
    if loss != LOSS:
        g.rename_value(loss, LOSS)
    g.outputs = [LOSS, out, *names.values()]
    g = (TRAINING if optimize else UNOPTIMIZED)(g).graph
    g.verify()
    return g


def _apply_graph(fwd: Graph, wants: dict[str, tuple[str, Need]], full_values: dict[str, np.ndarray],
                 opt: Any) -> Graph:
    """The optimizer update alone: (state, lr, each trained tensor's gradient) -> the updated state, under the
    same names as the training step's."""
    g = Graph()
    for p in wants:
        g.add_input(p, fwd.types[p], Role.PARAMETER)
        g.add_input(gradient_of(p), fwd.types[p], Role.GRADIENT)
    state = _add_optimizer(g, opt, {p: (p, need) for p, (_, need) in wants.items()},
                           {p: gradient_of(p) for p in wants}, full_values)
    for e in state:
        g.rename_value(e.output, updated(e.name))
        e.output = updated(e.name)
    g.outputs = [e.output for e in state]
    g.verify()
    return g


def _loss_attrs(loss_op: str, label_smoothing: float, pos_weight: Any, out: TensorType) -> dict[str, Any]:
    """The loss node's attributes: cross-entropy's label smoothing, BCE's pos_weight (checked here)."""
    if loss_op == "cross_entropy":
        return {"label_smoothing": label_smoothing}
    if pos_weight is not None:
        return {"pos_weight": pos_weight_shape(pos_weight, out.shape[-1] if out.rank else 1)}
    return {}


def _add_loss(g: Graph, out: str, loss_op: str, labels: Any, attrs: dict[str, Any], kd: KDSpec | None = None,
              originals: dict[str, np.ndarray] | None = None) -> str:
    """The labels input and the loss node on the model's output (with kd: the teacher, then the kd loss);
    returns the loss value."""
    if loss_op == OUTPUT_GRADIENT:  # sum(out * labels): its gradient with respect to out is the labels, exactly
        y = g.add_input(LABELS, g.types[out], Role.LABEL)
        b = Builder(g, "loss", Phase.LOSS)
        dot = b.op("mul", [out, y], hint="loss_terms")
        return b.op("sum", [dot], hint="loss", axes=list(range(g.types[out].rank)), keepdim=False)
    y = g.add_input(LABELS, _label_type(loss_op, g.types[out], labels), Role.LABEL)
    if kd is not None:  # the teacher copies the forward graph as it is: before the loss's nodes
        teacher = add_teacher(g, originals or {}) if kd.teacher == "model" else teacher_logits_input(g, out)
        return add_kd_loss(g, out, y, kd, teacher, attrs.get("label_smoothing", 0.0))
    b = Builder(g, "loss", Phase.LOSS)
    return b.op(loss_op, [out, y], hint="loss", **attrs)


def _differentiate(g: Graph, loss: str, wants: dict[str, tuple[str, Need]],
                   grad_input: str | None = None) -> tuple[dict[str, str], str | None]:
    """The backward graph; returns each trained parameter's gradient (of its slice, if sliced), and the
    gradient of input `grad_input` if one is asked for."""
    if not wants and not grad_input:  # a split part below every trained one: its step is never run
        return {}, None
    by_value = backward(g, loss, dict(wants.values()) | ({grad_input: FULL} if grad_input else {}))
    return {p: by_value[v] for p, (v, _) in wants.items()}, by_value.get(grad_input) if grad_input else None


def _add_optimizer(g: Graph, opt: Any, wants: dict[str, tuple[str, Need]], grads: dict[str, str],
                   full_values: dict[str, np.ndarray]) -> list[StateEntry]:
    """The lr input, each parameter's update and its optimizer state; returns the state entries."""
    b = Builder(g, "optimizer", Phase.OPTIMIZER)
    lr = g.add_input(LR, TensorType((), "float32"), Role.HYPERPARAMETER)
    state: list[StateEntry] = []
    step = step_next = None
    if opt.needs_step:
        step = g.add_input(STEP, TensorType((), "float32"), Role.OPTIMIZER_STATE)
        step_next = b.op("add", [step, b.scalar_like(1.0, step)], hint="step_next")
        g.roles[step_next] = Role.OPTIMIZER_STATE
    for p, (_, need) in wants.items():
        slots = {s: g.add_input(optimizer_slot(s, p), g.types[p], Role.OPTIMIZER_STATE) for s in opt.slots()}
        with b.scope(module_of(p)):  # the layer it updates, phase optimizer
            new_p, new_slots = build_update(b, opt, p, grads[p], slots, lr, step_next)
        g.roles[new_p] = Role.PARAMETER
        g.roles.update((v, Role.OPTIMIZER_STATE) for v in new_slots.values())
        value = _part(full_values[p], need)
        state.append(StateEntry.param(p, new_p, value, need, full_values[p].shape))
        init = initial_state(opt, value)
        state += [StateEntry.slot(p, s, new_slots[s], init[s]) for s in opt.slots()]
    if step is not None:
        state.append(StateEntry.step(step_next))
    return state


def _name_outputs(g: Graph, loss: str, out: str, state: list[StateEntry], d_input: str | None = None) -> None:
    """Graph outputs get stable, documented names: loss, the model output, then the updated state (and a
    split part's input gradient)."""
    if d_input is not None and (d_input in g.inputs or d_input in g.constants or d_input == out):
        raise CompileError("a split part computes nothing between its input and output; move the cut")
    rename = {loss: LOSS} | {s.output: updated(s.name) for s in state} | ({d_input: INPUT_GRADIENT} if d_input else {})
    taken = [new for old, new in rename.items() if new != old and new in g.types]
    if taken:
        raise CompileError(f"the model already has values named {', '.join(taken)}, which name the training "
                           "step's outputs; rename them in the model")
    for old, new in rename.items():
        if new != old:
            g.rename_value(old, new)
    for s in state:
        s.output = rename[s.output]
    g.outputs = [LOSS, out] + [s.output for s in state] + ([INPUT_GRADIENT] if d_input else [])
