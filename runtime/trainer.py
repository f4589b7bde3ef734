"""Train a compiled artifact on the device: numpy + onnxruntime, no torch.

The training state (trainable tensors and optimizer state) lives in two sets of onnxruntime-owned
buffers, A and B. A step binds A as the graph's state inputs and B as its "new/..." outputs (IO
binding, so onnxruntime writes the update straight into B), then swaps the roles. No weight is
copied through numpy per step; numpy only reads the buffers through zero-copy views, for the guard.

The guard (runtime.guard): a batch with NaN/Inf is refused before running; after the run, a
non-finite or exploding loss or update means the step is rejected by simply not swapping, so A, the
last good state, stays current. Rejected steps are counted and reported. A state that diverged all the
same (its loss crept up, its weights grew) is never written to a checkpoint.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Mapping

import numpy as np
import onnxruntime as ort

from pockprop.runtime import checkpoint, data, export, guard, inputs, multilabel
from pockprop.runtime.session import CPU, providers_for, session
from pockprop.artifact import onnx_wire, safetensors, tuning
from pockprop.artifact.contract import BY_ORT, OUTPUT_GRADIENT, TEACHER_LOGITS, Manifest, teacher_input, StateRole, StateSpec, TensorSpec
from pockprop.errors import ArtifactError, CheckpointError, DataError, TrainingFailed
from pockprop.artifact.manifest import Bundle, DirectoryFiles, Watched, open_artifact
from pockprop.runtime.replay import ReplayBuffer
from pockprop.runtime.schedule import Schedule


def _session(model: bytes | str, where: str, threads: int | None,
             external: Mapping[str, np.ndarray] | None = None, providers: list[str] = CPU,
             mem_pattern: bool = True) -> ort.InferenceSession:
    """An onnxruntime session of the model (bytes, or a file path), or ArtifactError naming `where`."""
    try:
        return session(model, threads, external=external, providers=providers, mem_pattern=mem_pattern)
    except Exception as ex:  # onnxruntime raises its own exception types; the file is what is wrong
        raise ArtifactError(f"{where}: onnxruntime cannot load it ({str(ex).splitlines()[0]})") from None


def _finite(a: np.ndarray) -> bool:
    """All elements finite, without allocating a mask (min/max propagate NaN; inf shows at the ends)."""
    if a.dtype.kind != "f" or a.size == 0:
        return True
    return bool(np.isfinite(a.min()) and np.isfinite(a.max()))


def _check_io(where: str, args: list[Any], want: dict[str, tuple[tuple[int, ...], str]], what: str) -> None:
    """Graph inputs/outputs `args` must include every name in `want` with a compatible shape and dtype."""
    have = {a.name: a for a in args}
    for name, (shape, dtype) in want.items():
        arg = have.get(name)
        if arg is None:
            raise ArtifactError(f"{where}: the manifest names {what} {name!r}, which the graph does not have")
        got_dtype = BY_ORT[arg.type].name if arg.type in BY_ORT else arg.type
        dims_ok = len(arg.shape) == len(shape) and all(not isinstance(g, int) or g == w for g, w in zip(arg.shape, shape))
        if got_dtype != dtype or not dims_ok:
            raise ArtifactError(f"{where}: {what} {name!r} is {got_dtype}{list(arg.shape)} in the graph, "
                                f"{dtype}{list(shape)} in the manifest")


def _spec(t: TensorSpec | StateSpec) -> tuple[tuple[int, ...], str]:
    return t.shape, t.dtype


class Trainer:
    """An artifact's sessions and training state; `load` it, then `step`, `predict`, `evaluate`, `save_checkpoint`."""

    def __init__(self, bundle: Bundle, state: dict[str, np.ndarray], threads: int | None = None,
                 provider: str = "cpu") -> None:
        m = bundle.manifest
        self.path, self.manifest, self.digest = bundle.path, m, bundle.digest
        self._entries: list[StateSpec] = m.state
        self._entries_by_name = {e.name: e for e in m.state}
        self._inputs, self._labels = m.data, m.labels
        # The inference graph's signature is read now from its protobuf (onnx_wire), but its onnxruntime
        # session is made on first use (predict, evaluate): a device that only trains never holds a second
        # copy of every weight. It is read before the training session is built, so its bytes are gone by
        # then; the peak is onnxruntime's build.
        self._threads = threads
        self.providers = providers_for(provider)  # resolved once: one fallback message, not one per session
        infer_name = m.graphs.infer
        infer_raw = bundle.files[infer_name]  # read once (a directory's file is read on each lookup)
        try:
            infer = onnx_wire.signature(infer_raw)
        except (onnx_wire.WireError, KeyError, IndexError, UnicodeDecodeError) as ex:
            raise ArtifactError(f"{bundle.where(infer_name)}: not a readable ONNX model ({ex})") from None
        self._bases = self._slice_bases(bundle, infer_raw)
        # a bundle read from disk is read again on first use (and its hash checked); one built in memory is kept
        self._memory_bundle = None if os.path.exists(bundle.path) else bundle
        del infer_raw
        train_name = m.graphs.train_step
        self._grad_input = m.split.input_gradient if m.split is not None else None
        # a split part's loss is sum(output * output gradient): a scale the guard cannot judge (its updates it can)
        self._judge_loss = m.loss.get("name") != OUTPUT_GRADIENT
        self._watched: list[Watched] = []  # the files the sessions keep reading (external data, mapped)
        # the step without onnxruntime's memory pattern, which would double its intermediates (runtime.session)
        self._train = _graph_session(bundle, train_name, threads, self.providers, self._watched, mem_pattern=False)
        self._check_train(bundle)
        self._check_infer(bundle, *infer)
        infer_params = {a.name for a in infer[2]}
        self._infer_params = [e for e in self._entries if e.role in _WEIGHTS and e.parameter in infer_params]
        pred = next(o for o in infer[1] if o.name == m.outputs.prediction)
        self._infer_session: ort.InferenceSession | None = None
        # class indices are checked against the classes axis (the last): of (N, C) logits, and of (N, T, V)
        # ones under cross-entropy, whose ignore_index (a sequence's padding) is let through
        sequence = len(pred.shape) > 2 and m.loss.get("name") == "cross_entropy"
        classes = pred.shape[-1] if (len(pred.shape) == 2 or sequence) and isinstance(pred.shape[-1], int) else None
        try:
            self.pipeline = data.Pipeline(self._inputs, self._labels, classes, loss=m.loss)
        except DataError as ex:
            raise ArtifactError(f"{bundle.where('manifest.json')}: {ex}") from None

        self.steps = 0  # accepted steps
        self.rejected = 0
        self.last_rejection: str | None = None
        self.guard = "full"  # a mode of runtime.guard.MODES
        self.loss_floor = guard.loss_floor(m.loss, classes, self.batch_size)
        self._params = [i for i, e in enumerate(self._entries) if e.role == StateRole.PARAM]
        self._last_batch: tuple[dict[str, np.ndarray], np.ndarray] | None = None  # the last accepted step's batch
        self._state_loss: float | None = None  # the current state's loss on a batch, once found sane
        self._state_spikes = 0  # steps rejected because the current state's loss exploded on their batch
        self.schedule = Schedule("constant", float(m.lr.initial))
        self.schedule_start = 0  # the step count at which `schedule` began (a new round restarts it)
        self.progress: dict[str, Any] | None = None  # data position of the current round (runtime.loop)
        self.rounds: list[dict[str, Any]] = []  # one record per finished round
        self.replay: ReplayBuffer | None = None  # past samples mixed into later rounds (runtime.replay)
        self.kd_logits: np.ndarray | None = None  # the round's teacher logits, with kd from the previous round
        self._allocate(state)
        self.start_round()

    @classmethod
    def load(cls, path: str, threads: int | None = None, provider: str = "cpu") -> "Trainer":
        """Load and validate an artifact (directory or packed file); ArtifactError naming the file if unusable.
        provider: onnxruntime's execution provider, `cpu` or `cuda` (runtime.session: CPU where unavailable)."""
        bundle = open_artifact(path)
        where = bundle.where(bundle.manifest.state_file)
        try:
            state, _ = safetensors.loads(bundle.files[bundle.manifest.state_file])
        except ValueError as ex:
            raise ArtifactError(f"{where}: {ex}") from None
        _check_state(state, bundle.manifest.state, where)
        note = tuning.mismatch(bundle.manifest.lowerings, threads, ort.__version__)
        if note is not None:
            warnings.warn(note, tuning.TuningMismatch, stacklevel=2)
        return cls(bundle, state, threads, provider)

    # -- validation ------------------------------------------------------------------------------
    def _check_train(self, bundle: Bundle) -> None:
        m = self.manifest
        where = bundle.where(m.graphs.train_step)
        teacher = teacher_input(m.loss)
        inputs = {d.name: _spec(d) for d in self._inputs} | ({teacher.name: _spec(teacher)} if teacher else {}) | {
            self._labels.name: _spec(self._labels),
                                                            m.lr.name: ((), "float32")} \
            | {e.input: _spec(e) for e in self._entries}
        _check_io(where, self._train.get_inputs(), inputs, "input")
        extra = {a.name for a in self._train.get_inputs()} - set(inputs)
        if extra:
            raise ArtifactError(f"{where}: the graph needs inputs {sorted(extra)} that the manifest does not describe")
        outputs = {m.outputs.loss: ((), "float32")} | {e.output: _spec(e) for e in self._entries}
        if self._grad_input is not None:  # a split part's gradient of its input, shaped like it
            outputs[self._grad_input] = _spec(self._inputs[0])
        _check_io(where, self._train.get_outputs(), outputs, "output")

    def _check_infer(self, bundle: Bundle, inputs: list[Any], outputs: list[Any], overridable: list[Any]) -> None:
        m = self.manifest
        where = bundle.where(m.graphs.infer)
        _check_io(where, inputs, {d.name: _spec(d) for d in self._inputs}, "input")
        if len(inputs) != len(self._inputs):
            raise ArtifactError(f"{where}: the graph needs inputs {[a.name for a in inputs]}; "
                                f"the manifest feeds only {[d.name for d in self._inputs]}")
        full = {e.parameter: (e.parameter_shape, e.dtype) for e in self._entries if e.role in _WEIGHTS}
        have = {a.name for a in overridable}
        _check_io(where, overridable, {k: v for k, v in full.items() if k in have}, "parameter")
        adapted = {ad.weight: (ad.shape, self._entries_by_name[ad.a].dtype) for ad in m.adapters}
        if not adapted.keys() <= have:
            raise ArtifactError(f"{where}: the adapted weights {sorted(adapted.keys() - have)} are not inputs "
                                "of the graph (manifest adapters)")
        _check_io(where, overridable, adapted, "adapted weight")
        if m.outputs.prediction not in {o.name for o in outputs}:
            raise ArtifactError(f"{where}: no output named {m.outputs.prediction!r} (manifest outputs.prediction)")

    @property
    def _infer(self) -> ort.InferenceSession:
        """The inference session, made on first use (see __init__)."""
        if self._infer_session is None:
            self._infer_session = _graph_session(self._bundle(), self.manifest.graphs.infer, self._threads,
                                                 self.providers, self._watched)
        return self._infer_session

    def session(self, name: str) -> ort.InferenceSession:
        """A session of another graph file the manifest lists (a split part's vjp or apply graph), read and
        verified like the step's."""
        return _graph_session(self._bundle(), name, self._threads, self.providers, self._watched)

    def _check_files(self) -> None:
        """ArtifactError if a file that a session reads as it runs changed in place since it was loaded."""
        for w in self._watched:
            w.check()

    def _bundle(self) -> Bundle:
        """The artifact again: the bundle kept in memory, else read and verified again (the same digest)."""
        bundle = self._memory_bundle
        if bundle is None:
            bundle = open_artifact(self.path)
            if bundle.digest != self.digest:
                raise ArtifactError(f"{self.path}: the artifact changed since it was loaded")
        return bundle

    def _slice_bases(self, bundle: Bundle, infer_raw: bytes) -> dict[str, np.ndarray]:
        """The frozen full value of each parameter trained on a slice, and of each weight a LoRA adapter
        adds to (their initializers in infer.onnx)."""
        names = {e.parameter for e in self._entries if e.slice is not None} | {a.weight for a in self.manifest.adapters}
        external = bundle.external_data(self.manifest.graphs.infer, infer_raw, names)  # checks every reference
        if not names:
            return {}
        where = bundle.where(self.manifest.graphs.infer)
        try:
            bases = onnx_wire.initializers(infer_raw, names - set(external))
        except onnx_wire.WireError as ex:
            raise ArtifactError(f"{where}: {ex}") from None
        bases |= {n: external[n] for n in names & set(external)}  # copies (directory) or views of a held pack
        for e in self._entries:
            if e.slice is not None and (e.parameter not in bases or bases[e.parameter].shape != e.full_shape):
                raise ArtifactError(f"{where}: needs an initializer {e.parameter!r} of shape {list(e.full_shape or ())} "
                                    f"to write the trained slice of {e.name!r} into")
        for a in self.manifest.adapters:
            if a.weight not in bases or bases[a.weight].shape != a.shape:
                raise ArtifactError(f"{where}: needs an initializer {a.weight!r} of shape {list(a.shape)} to merge "
                                    "its LoRA adapter into")
        return bases

    # -- state buffers ---------------------------------------------------------------------------
    def _allocate(self, state: dict[str, np.ndarray]) -> None:
        def buffers() -> list[ort.OrtValue]:
            return [ort.OrtValue.ortvalue_from_shape_and_type(list(e.shape), np.dtype(e.dtype), "cpu", 0)
                    for e in self._entries]

        self._bufs = [buffers(), buffers()]
        self._views = [[v.numpy() for v in bufs] for bufs in self._bufs]  # zero-copy numpy views
        self._loss = ort.OrtValue.ortvalue_from_shape_and_type([], np.float32, "cpu", 0)
        self._loss_view = self._loss.numpy()
        if self._grad_input is not None:
            first = self._inputs[0]
            self._grad_input_value = ort.OrtValue.ortvalue_from_shape_and_type(list(first.shape), np.dtype(first.dtype),
                                                                               "cpu", 0)
        self._bindings = []
        for src, dst in ((0, 1), (1, 0)):
            b = self._train.io_binding()
            for e, i, o in zip(self._entries, self._bufs[src], self._bufs[dst]):
                b.bind_ortvalue_input(e.input, i)
                b.bind_ortvalue_output(e.output, o)
            b.bind_ortvalue_output(self.manifest.outputs.loss, self._loss)
            if self._grad_input is not None:
                b.bind_ortvalue_output(self._grad_input, self._grad_input_value)
            self._bindings.append(b)
        self._cur = 0
        self.load_state(state)

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Copy tensors (by state name) into the current buffers."""
        _check_state(state, self._entries, "state")
        for e, view in zip(self._entries, self._views[self._cur]):
            view[...] = state[e.name]
        self._state_loss, self._state_spikes = None, 0

    def start_round(self) -> None:
        """Judge what follows against the current state (runtime.guard.Baseline); runtime.loop calls it
        when a round begins."""
        self.baseline = guard.Baseline(self.loss_floor, guard.norms(self._param_views()))

    def _param_views(self) -> list[np.ndarray]:
        return [self._views[self._cur][i] for i in self._params]

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of the current training state, by state name."""
        return {e.name: v.copy() for e, v in zip(self._entries, self._views[self._cur])}

    @property
    def state(self) -> dict[str, np.ndarray]:
        return self.state_dict()

    @property
    def batch_size(self) -> int:
        return int(self._inputs[0].shape[0])

    # -- training --------------------------------------------------------------------------------
    def _model_inputs(self, x: Any, batch: int | None) -> dict[str, np.ndarray]:
        """Model-ready inputs (an array, a tuple in manifest order or a dict by name) as checked feeds."""
        specs = self._inputs
        feeds = {s.name: inputs.check(a, s, batch, inputs.label(specs, s))
                 for s, a in zip(specs, inputs.arrange(x, specs))}
        if batch is None and len({len(a) for a in feeds.values()}) > 1:
            raise DataError(f"data: the inputs have different numbers of samples "
                            f"{ {k: len(v) for k, v in feeds.items()} }")
        return feeds

    def _same_kind(self, a: np.ndarray, spec: TensorSpec, what: str) -> np.ndarray:
        want = np.dtype(spec.dtype)
        if a.dtype != want:
            if a.dtype.kind != want.kind and not (a.dtype.kind in "iu" and want.kind in "iu"):
                raise DataError(f"{what}: expected dtype {want}, got {a.dtype}")
            a = a.astype(want)
        return np.ascontiguousarray(a)

    @property
    def guard(self) -> str:
        """The guard's mode: "full", "loss" or "off" (runtime.guard)."""
        return self._guard

    @guard.setter
    def guard(self, mode: str) -> None:
        if mode not in guard.MODES:
            raise ValueError(f"guard must be one of {', '.join(guard.MODES)}, got {mode!r}")
        self._guard = mode

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        self.last_rejection = reason

    @property
    def lr(self) -> float:
        """The learning rate the next step takes from the schedule."""
        return self.schedule.lr(self.steps - self.schedule_start)

    def _run(self, feeds: dict[str, np.ndarray], y: np.ndarray, rate: float) -> float:
        """Run the step on the current state, writing the update into the other buffers; the loss."""
        binding = self._bindings[self._cur]
        for name, a in feeds.items():
            binding.bind_cpu_input(name, a)
        binding.bind_cpu_input(self._labels.name, y)
        binding.bind_cpu_input(self.manifest.lr.name, np.array(rate, np.float32))
        self._check_files()
        self._train.run_with_iobinding(binding)
        return float(self._loss_view)

    def step(self, x: Any, y: Any, lr: float | None = None, teacher_logits: Any = None) -> float | None:
        """One training step on a model-ready batch; the loss, or None if the guard rejected the step.

        x: the batch's inputs: an array (a one-input model), a tuple in manifest order or a dict by name.
        teacher_logits: the teacher's output for the batch, shaped and typed like the model's output
        (the manifest's loss.kd.input), required by an artifact compiled with loss="kd" and teacher
        "logits" and refused by any other; NaN or Inf in it is a DataError, not a rejected step.
        """
        feeds = self._model_inputs(x, self.batch_size)
        teacher = self.pipeline.teacher
        if teacher is None and teacher_logits is not None:
            raise DataError(f"{TEACHER_LOGITS}: this artifact takes none (it was not compiled with loss kd, "
                            "teacher logits)")
        if teacher is not None:
            if teacher_logits is None:
                raise DataError(f"{TEACHER_LOGITS}: the step distills from the teacher's logits (loss kd, teacher "
                                f"logits); give teacher_logits of shape {list(teacher.shape)} with the batch")
            feeds[teacher.name] = data.check_teacher(teacher_logits, teacher, self.batch_size, "")
        y = np.asarray(y)
        if y.shape != self._labels.shape:
            raise DataError(f"labels: expected shape {list(self._labels.shape)} ({self._labels.dtype}), got {list(y.shape)}")
        y = self._same_kind(y, self._labels, "labels")
        problem = self.pipeline.bad_label(y)
        if problem:
            raise DataError(f"labels: {problem}")
        if self.guard != "off":
            if not (all(_finite(a) for a in feeds.values()) and _finite(y)):
                self._reject("the batch holds NaN or Inf")
                return None
            if self.pipeline.all_ignored(y):  # the loss would be 0/0
                self._reject("every label of the batch is the ignore_index")
                return None
        loss = self._run(feeds, y, self.lr if lr is None else lr)
        nxt = 1 - self._cur
        spike = None if self.guard == "off" or not self._judge_loss else self.baseline.spike(loss)
        if spike is not None:  # this batch, or the current state: two in a row blame the state
            self._state_spikes += 1
            self._reject(spike)
            return None
        self._last_batch = (feeds, y)
        problem = self._update_problem(nxt) if self.guard == "full" else None
        if problem is not None:
            self._state_loss, self._state_spikes = loss, 0  # the current state stays; its loss was sane
            self._reject(problem)
            return None
        self._cur = nxt  # accept: the new state becomes current; the old buffers take the next update
        self._state_loss, self._state_spikes = None, 0
        self.steps += 1
        if self._judge_loss:
            self.baseline.accepted(loss)
        return loss

    def input_gradient(self) -> np.ndarray:
        """A copy of the gradient of the loss with respect to the input, from the last step run (accepted or
        not): a split part's step output (pockprop.runtime.split); ValueError for an artifact without it."""
        if self._grad_input is None:
            raise ValueError(f"{self.path}: this artifact's step has no input gradient (not a split part above "
                             "a trained one)")
        return self._grad_input_value.numpy().copy()

    def _update_problem(self, nxt: int) -> str | None:
        """Why the update in buffers `nxt` must not be accepted (full guard), or None."""
        cur, new = self._views[self._cur], self._views[nxt]
        reason = guard.update_explodes([self._entries[i].name for i in self._params],
                                       [cur[i] for i in self._params], [new[i] for i in self._params])
        if reason is not None:
            return reason
        for e, view in zip(self._entries, new):
            if e.role != StateRole.PARAM and not _finite(view):
                return f"the update made {e.name!r} non-finite"
        return None

    def divergence(self) -> str | None:
        """Why the current state must not be saved, or None (runtime.guard): a tensor holds NaN or Inf
        (whatever the mode); with the guard on, a parameter grew too much this round, the round's loss
        crept up, or the state's loss exploded on two batches in a row or on the last accepted batch
        (measured now if no step has measured it)."""
        for e, view in zip(self._entries, self._views[self._cur]):
            if not _finite(view):
                return f"{e.name!r} holds NaN or Inf"
        if self.guard == "off":
            return None
        why = (guard.grown([self._entries[i].name for i in self._params], self._param_views(), self.baseline.norms)
               or self.baseline.drift())
        if why is not None:
            return why
        if self._state_spikes >= 2:
            return f"its loss exploded on {self._state_spikes} batches in a row, the last: {self.last_rejection}"
        if self._state_loss is None and self._last_batch is not None:
            loss = self._run(*self._last_batch, 0.0)  # the update written into the other buffers is dropped
            why = self.baseline.spike(loss)
            if why is not None:
                return f"on the last accepted batch, {why}"
            self._state_loss = loss
        return None

    # -- inference -------------------------------------------------------------------------------
    def full_parameters(self) -> dict[str, np.ndarray]:
        """Each trainable parameter's full current value (slices written into their frozen tensor), and each
        running statistic the step updates (batchnorm="train"): what the model's weights are now."""
        out = {}
        for e, view in zip(self._entries, self._views[self._cur]):
            if e.role not in _WEIGHTS:
                continue
            if e.slice is not None:
                full = out.get(e.parameter)
                if full is None:
                    full = out[e.parameter] = self._bases[e.parameter].copy()
                full[e.slice.index(full.ndim)] = view
            else:
                out[e.name] = view
        return out

    def _infer_weights(self) -> dict[str, np.ndarray]:
        """What the inference graph is fed: its trained parameters, and each LoRA-adapted weight merged
        with its adapter's current A and B (W + scale * B A), so the graph holds no adapter nodes."""
        full = self.full_parameters()
        weights = {e.parameter: full[e.parameter] for e in self._infer_params}
        return weights | {a.weight: a.merge(self._bases[a.weight], full[a.a], full[a.b]) for a in self.manifest.adapters}

    def predict(self, x: Any) -> np.ndarray:
        """Model output for model-ready inputs (as `step` takes them) of N samples, any N (batched and
        padded inside)."""
        return self.predictor()(x)

    def predictor(self) -> Callable[[Any], np.ndarray]:
        """`predict` at the current weights, which it gathers (slices joined, LoRA adapters merged) once:
        for many calls in a row with no step between them (evaluation in chunks)."""
        weights = self._infer_weights()
        return lambda x: self._predict(x, weights)

    def _predict(self, x: Any, weights: dict[str, np.ndarray]) -> np.ndarray:
        given = self._model_inputs(x, None)
        out = self.manifest.outputs.prediction
        names = list(given)
        parts = []
        self._check_files()
        for chunks in zip(*(data.padded_batches(a, self.batch_size) for a in given.values())):
            feeds = weights | {n: chunk for n, (chunk, _) in zip(names, chunks)}
            parts.append(self._infer.run([out], feeds)[0][:chunks[0][1]])
        return np.concatenate(parts) if parts else np.zeros((0,), np.float32)

    def evaluate(self, source: Any, y: Any = None, threshold: float = 0.5) -> dict[str, Any]:
        """Loss and (for classification) accuracy over a Dataset or data path (raw, preprocessed here),
        arrays x, y, or an iterable of (x, y) batches (model-ready); multi-label metrics at `threshold`."""
        if isinstance(source, str):
            source = self.pipeline.load(source)
        if isinstance(source, data.Dataset):
            self.pipeline.check(source)
            labels = self.pipeline.labels(source.y, source.source)
            predict = self.predictor()
            preds = [predict(self.pipeline.inputs(source.x[i:i + 256], source.source))
                     for i in range(0, len(source), 256)]
        elif y is not None:
            preds, labels = [self.predict(source)], np.asarray(y)
        else:
            predict = self.predictor()
            pairs = [(predict(bx), np.asarray(by)) for bx, by in source]
            preds, labels = [p for p, _ in pairs], np.concatenate([b for _, b in pairs]) if pairs else np.zeros(0)
        pred = np.concatenate(preds) if preds else np.zeros((0,))
        return metrics(self.manifest.loss, pred, labels, threshold)

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, directory: str) -> str:
        """Write the full training state atomically to directory/checkpoint.safetensors; returns its path.

        TrainingFailed, and nothing written, if the state diverged (`divergence`); CheckpointError if
        another process holds the directory (checkpoint.lock) or it cannot be written."""
        reason = self.divergence()
        if reason is not None:
            raise TrainingFailed(f"the state after step {self.steps} diverged ({reason}): not saved; "
                                 f"{checkpoint.describe(directory)}")
        meta = {"artifact": self.digest, "model": self.manifest.model, "steps": self.steps,
                "rejected": self.rejected, "schedule": self.schedule.to_json(), "schedule_start": self.schedule_start,
                "progress": self.progress, "rounds": self.rounds, "guard": self.baseline.to_json()}
        tensors = {e.name: v for e, v in zip(self._entries, self._views[self._cur])}
        if self.replay is not None:  # in the same file as the state: both always come from the same step
            meta["replay"] = self.replay.meta()
            tensors |= self.replay.tensors()
        if self.kd_logits is not None:
            tensors[KD_LOGITS] = self.kd_logits
        with checkpoint.lock(directory):
            return checkpoint.save(directory, tensors, meta)

    def resume(self, directory: str) -> dict[str, Any]:
        """Restore state, counters, schedule and data position from a checkpoint of this artifact."""
        tensors, meta = checkpoint.load(directory)
        where = checkpoint.path_of(directory)
        if meta.get("artifact") != self.digest:
            raise CheckpointError(f"{where}: made for another artifact ({meta.get('model')!r}, manifest sha256 "
                                  f"{str(meta.get('artifact'))[:12]}...), not {self.path}")
        try:
            _check_state(tensors, self._entries, where)
            schedule = Schedule.from_json(meta["schedule"])
            counters = int(meta["steps"]), int(meta["rejected"]), int(meta["schedule_start"])
            progress, rounds = checkpoint.check_progress(meta.get("progress")), checkpoint.check_rounds(meta.get("rounds"))
            baseline = guard.Baseline.from_json(meta["guard"]) if "guard" in meta else None
            replay = ReplayBuffer.restore(tensors, meta["replay"]) if "replay" in meta else None
        except (KeyError, TypeError, ValueError) as ex:
            raise CheckpointError(f"{where}: malformed checkpoint metadata ({ex})") from None
        self.load_state(tensors)
        self.steps, self.rejected, self.schedule_start = counters
        self.schedule, self.progress, self.rounds = schedule, progress, rounds
        if replay is not None:  # else a buffer given to this trainer starts with this round
            self.replay = replay
        self.kd_logits = tensors.get(KD_LOGITS)
        if baseline is None:  # a checkpoint written before the guard kept one: judge from here on
            self.start_round()
        else:
            self.baseline = baseline
        return meta

    # -- export ----------------------------------------------------------------------------------
    def export_inference(self, path: str) -> str:
        """Write a self-contained ONNX model with the trained weights baked in; returns `path`. A model
        whose initializers exceed the external-data threshold keeps them in one file beside it
        (`<path>.data`, ONNX external data: runtime/export.py)."""
        trained = self._infer_weights()
        meta = {"pockprop.model": str(self.manifest.model or ""), "pockprop.steps": str(self.steps),
                "pockprop.artifact_sha256": self.digest}
        return export.write(path, self._bundle(), self.manifest.graphs.infer, trained, meta)


def _graph_session(bundle: Bundle, name: str, threads: int | None, providers: list[str],
                   watched: list[Watched], mem_pattern: bool = True) -> ort.InferenceSession:
    """A session of the bundle's graph file `name` with its external data (every reference checked first:
    listed, plain file names only). From a directory onnxruntime reads the graph and those files itself,
    relative to the directory, and their sha256 is checked again after that read, so what it read is what
    was verified; that takes about half the peak memory of handing it their values, which it copies
    (docs/benchmarks.md, "Large models"). It maps the external files and keeps reading them, so they are
    added to `watched` (see Watched). Otherwise the values come from the verified bytes."""
    raw = bundle.files[name]  # read once (a directory's file is read on each lookup)
    where = bundle.where(name)
    if isinstance(bundle.files, DirectoryFiles):
        used = dict.fromkeys(ref.location for ref in bundle.external_refs(name, raw))
        del raw
        sess = _session(bundle.files.local_path(name), where, threads, None, providers, mem_pattern)
        watched += [bundle.files.watch(fname) for fname in used]  # opened before the check below
        for fname in (name, *used):
            bundle.files.verify(fname)
        return sess
    return _session(raw, where, threads, bundle.external_data(name, raw), providers, mem_pattern)


KD_LOGITS = "kd/teacher_logits"  # checkpoint tensor: a round's teacher logits (runtime.loop, kd_previous)


_WEIGHTS = (StateRole.PARAM, StateRole.STATISTIC)  # the state tensors the inference graph reads


def _check_state(state: dict[str, np.ndarray], entries: list[StateSpec], where: str) -> None:
    for e in entries:
        arr = state.get(e.name)
        if arr is None or arr.shape != e.shape or arr.dtype.name != e.dtype:
            got = "missing" if arr is None else f"{arr.dtype}{list(arr.shape)}"
            raise ArtifactError(f"{where}: state tensor {e.name!r} should be {e.dtype}{list(e.shape)}, is {got}")


def metrics(loss: dict[str, Any], pred: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """The artifact's loss (numpy, float64) and, for classification, accuracy of predictions `pred`;
    multi-label (bce_with_logits): also mAP, F1 and per-label accuracy at `threshold` (runtime/multilabel.py)."""
    name, n = loss.get("name", ""), len(pred)
    out: dict[str, float] = {"samples": n}
    if n == 0:
        return out
    p = pred.astype(np.float64)
    if name == "cross_entropy":
        out |= _cross_entropy(loss, p, y.astype(np.int64))
    elif name == "bce_with_logits":  # torch's BCEWithLogitsLoss(pos_weight), as in ops/loss.py
        t = y.astype(np.float64)
        lw = 1.0 + (np.asarray(loss.get("pos_weight", [1.0]), np.float64) - 1.0) * t
        out["loss"] = float(np.mean((1 - t) * p + lw * (np.log1p(np.exp(-np.abs(p))) + np.maximum(-p, 0))))
        out |= multilabel.metrics(p, t, threshold)
    elif name == "mse":
        out["loss"] = float(np.mean((p - y.astype(np.float64)) ** 2))
    return out


def _cross_entropy(loss: dict[str, Any], p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The training graph's cross-entropy (ops/loss.py) over logits p, classes last ((N, C) or (N, T, V)):
    labels equal to the manifest's ignore_index do not count; the loss is the mean over the counted
    labels (NaN if none counts, as in the step) and the accuracy the share of counted labels predicted."""
    out: dict[str, float] = {}
    y = y.reshape(-1)
    counted = y != loss["ignore_index"] if "ignore_index" in loss else np.ones(len(y), bool)
    if p.ndim > 2:  # a sequence: the counts are tokens
        out["tokens"] = int(counted.sum())
    p, y = p.reshape(-1, p.shape[-1])[counted], y[counted]
    logp = p - p.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    eps = float(loss.get("label_smoothing", 0.0))
    nll = -logp[np.arange(len(y)), y]
    per = (1 - eps) * nll - eps * logp.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return out | {"loss": float(per.sum() / len(y)), "accuracy": float(np.sum(p.argmax(axis=1) == y) / len(y))}
