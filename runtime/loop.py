"""Training rounds: epochs over a Dataset with checkpoints, resumable bit for bit (the µ-Trainer loop).

A *round* is one `fit` call on one dataset. The trainer's `progress` records where the round is:
its data (by fingerprint), settings, epoch and batch, and the running loss. Every checkpoint carries
it, so after a crash `fit` with the same data continues exactly where the checkpoint left off: the
batch order is a pure function of (seed, round, epoch) and the learning rate of the step count.
Called with new data (or after the round finished), `fit` starts the next round from the current
weights and optimizer state: continual learning on data that keeps arriving. Each finished round is
logged in `trainer.rounds` (steps, rejected steps, per-epoch loss, held-out accuracy before/after).

A round that cannot learn stops with TrainingFailed, and what it leaves on disk is the last good
checkpoint: guard.STOP_AFTER rejected steps in a row, most of the round's steps rejected, or a final state
that diverged (runtime.guard). A periodic or epoch-end checkpoint is skipped while the state is diverged
or most of the round's steps so far were rejected: a round that then fails leaves the checkpoint it
started from byte for byte. While a round trains, its checkpoint directory is locked (checkpoint.lock), and
Ctrl-C is acted on at the next batch boundary: the state there is checkpointed (when there is a directory
and the state is sound) and Interrupted says so; a second Ctrl-C interrupts at once, leaving the last
complete checkpoint.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Any, Callable

import numpy as np

from pockprop.errors import DataError, Interrupted, TrainingFailed
from pockprop.runtime import checkpoint, guard, prune
from pockprop.artifact.contract import TEACHER_LOGITS
from pockprop.runtime.data import Dataset, Pipeline, batch_indices, epoch_order
from pockprop.runtime.replay import ReplayBuffer
from pockprop.runtime.schedule import Schedule
from pockprop.runtime.trainer import Trainer

OnBatch = Callable[[int, int, "float | None"], None]  # (batches done in round, total, loss or None)
Log = Callable[[dict[str, Any]], None]  # one metrics record (runtime.runlog's format, docs/artifact.md)


def _same_round(p: dict[str, Any] | None, key: dict[str, Any]) -> bool:
    return bool(p) and not p.get("finished") and all(p.get(k) == v for k, v in key.items())


def fit(trainer: Trainer, train: Dataset, epochs: int, *, seed: int = 0, last_batch: str = "drop",
        schedule: Schedule | dict[str, Any] | None = None, holdout: float = 0.0, eval_data: Dataset | None = None,
        checkpoint_dir: str | None = None, checkpoint_every: int = 0, on_batch: OnBatch | None = None,
        log: Log | None = None, eval_old: Dataset | None = None, prune_keep: float = 1.0,
        prune_score: str = "el2n", threshold: float = 0.5, kd_previous: bool = False) -> dict[str, Any]:
    """Train `epochs` epochs on `train` (raw samples, preprocessed here); returns the round's log record.

    schedule: a Schedule, or a dict of its fields where a cosine `total_steps` of 0 means "this round's
    batches"; default constant at the artifact's lr. holdout: fraction of `train` held out to measure
    accuracy before and after the round (or pass eval_data). checkpoint_every: also checkpoint every
    that many batches (checkpoints are always written at each epoch end and at the end of the round).
    log: called with a record at the start, after every step, at each epoch end (with the held-out
    metrics, evaluated there for it, when there is held-out data) and at the end (runtime.runlog).
    Continual rounds: `trainer.replay` (a runtime.replay.ReplayBuffer, kept in the checkpoint) takes places
    in every batch and is offered the round's samples at its end; eval_old: the old task, evaluated before
    and after the round (the record's old_before and old: forgetting); prune_keep < 1 keeps that fraction
    of `train`, the highest `prune_score`s at the round's starting weights (runtime.prune; the kept indices
    into `train` go to the log and stay fixed when the round resumes). threshold: multi-label metrics.
    kd_previous (a kd artifact taking teacher logits): the teacher is the model as the round starts (the
    previous round's), run through the inference graph once on the round's samples and on the replay buffer;
    those logits are kept in the checkpoint until the round ends, so a resumed round distills from the same.
    Raises TrainingFailed (see the module's docstring), Interrupted on Ctrl-C, CheckpointError before the
    first step if checkpoint_dir is locked by another process or cannot be written.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    with checkpoint.lock(checkpoint_dir) if checkpoint_dir else contextlib.nullcontext():
        pipe = trainer.pipeline
        if kd_previous and pipe.teacher is None:
            raise DataError("kd from the previous round needs an artifact compiled with loss kd and teacher logits "
                            "(pockprop compile --loss kd --kd teacher=logits)")
        pipe.check(train, training=not kd_previous)
        held = eval_data
        if holdout:
            train, held = train.split(holdout, seed)
        for extra in (held, eval_old):
            if extra is not None:
                pipe.check(extra)
        y_all = pipe.labels(train.y, train.source)

        key = {"data": train.fingerprint, "epochs": epochs, "seed": seed, "last_batch": last_batch, "holdout": holdout}
        if prune_keep < 1.0:
            key |= {"prune_keep": prune_keep, "prune_score": prune_score}
        replay = trainer.replay
        k = replay.per_batch(trainer.batch_size) if replay is not None else 0
        if k:  # the buffer as the round began (it changes only at the round's end): batches of batch - k new samples
            key["replay_per_batch"] = k
        p = trainer.progress
        new_round = not _same_round(p, key)
        round_no = (p or {}).get("round", 0) + 1 if new_round else p["round"]
        if new_round:
            kept = _prune(trainer, train, y_all, prune_keep, prune_score) if prune_keep < 1.0 else None
        else:  # a resumed round trains on the samples it kept when it began
            kept = p.get("kept")
        if kept is not None:
            if log and new_round:
                log({"event": "prune", "round": round_no, "score": prune_score, "kept": len(kept), "of": len(train),
                     "indices": [int(i) for i in kept]})
            train, y_all = train.subset(np.asarray(kept, np.int64)), y_all[kept]
        n_batches = len(batch_indices(np.arange(len(train)), trainer.batch_size - k, last_batch))
        if new_round:  # continue from the current weights on this data
            trainer.schedule = _schedule(schedule, trainer, epochs * n_batches)
            trainer.schedule_start = trainer.steps
            trainer.start_round()
            before = trainer.evaluate(held, threshold=threshold) if held is not None else {}
            p = trainer.progress = {**key, "round": round_no, "source": train.source,
                                    "samples": len(train), "epoch": 0, "batch": 0, "loss_sum": 0.0, "loss_count": 0,
                                    "epoch_losses": [], "steps_at_start": trainer.steps,
                                    "rejected_at_start": trainer.rejected, "before": before, "finished": False}
            if kept is not None:
                p["kept"] = [int(i) for i in kept]
            if eval_old is not None:
                p["old_before"] = trainer.evaluate(eval_old, threshold=threshold)
            trainer.kd_logits = _teach(trainer, train, replay) if kd_previous else None
        elif kd_previous and trainer.kd_logits is None:
            raise DataError(f"round {p['round']} began without kd from the previous round; resume it without "
                            "--kd-previous, or start a new round")
        kd_logits = trainer.kd_logits if kd_previous else None
        assert p is not None
        t0 = time.perf_counter()
        total = epochs * n_batches
        streak = 0  # rejected steps in a row
        held_now: dict[str, Any] | None = None  # the held-out metrics of the current weights, if evaluated
        if log:
            log({"event": "start", "round": p["round"], "data": p["source"], "samples": p["samples"], "epochs": epochs,
                 "batches_per_epoch": n_batches, "epoch": p["epoch"], "batch": p["batch"], "step": trainer.steps,
                 "resumed": p["epoch"] > 0 or p["batch"] > 0} | ({"held_out": p["before"]} if p["before"] else {}))
        with _CtrlC() as ctrl_c:
            for epoch in range(p["epoch"], epochs):
                order = batch_indices(epoch_order(len(train), seed, p["round"], epoch), trainer.batch_size - k,
                                      last_batch)
                t_epoch = time.perf_counter()
                for b in range(p["batch"], len(order)):
                    idx = order[b]
                    t_step, lr = time.perf_counter(), trainer.lr
                    raw = train.x[idx]
                    x, y = model_inputs(pipe, raw, train.source), y_all[idx]
                    teacher = pipe.teacher_logits(raw, train.source) if kd_logits is None else kd_logits[idx]
                    if teacher is not None:  # a column beside the inputs, so replayed samples carry theirs
                        x[TEACHER_LOGITS] = teacher
                    if k:  # the buffer's samples take k places of the batch (runtime/replay.py)
                        rx, ry = replay.draw(k, seed, p["round"], epoch, b)
                        x, y = {n: np.concatenate([v, rx[n]]) for n, v in x.items()}, np.concatenate([y, ry])
                    loss = trainer.step(x, y, teacher_logits=x.pop(TEACHER_LOGITS, None))
                    if log:
                        log({"event": "step", "round": p["round"], "epoch": epoch + 1, "batch": b + 1,
                             "step": trainer.steps, "loss": loss, "lr": lr, "rejected": loss is None,
                             "reason": trainer.last_rejection if loss is None else None,
                             "seconds": round(time.perf_counter() - t_step, 6)})
                    if loss is not None:
                        p["loss_sum"] += loss
                        p["loss_count"] += 1
                    p["batch"] = b + 1
                    done = epoch * n_batches + b + 1
                    if on_batch:
                        on_batch(done, total, loss)
                    streak = 0 if loss is not None else streak + 1
                    if streak >= guard.STOP_AFTER:
                        _fail(trainer, checkpoint_dir, f"the last {streak} steps were all rejected")
                    if checkpoint_dir and checkpoint_every and done % checkpoint_every == 0 and b + 1 < len(order):
                        _checkpoint(trainer, checkpoint_dir)
                    if ctrl_c.pressed:
                        _interrupted(trainer, checkpoint_dir)
                p["epoch_losses"].append(p["loss_sum"] / p["loss_count"] if p["loss_count"] else None)
                if log:
                    seconds = round(time.perf_counter() - t_epoch, 6)
                    held_now = trainer.evaluate(held) if held is not None else None
                    log({"event": "epoch", "round": p["round"], "epoch": epoch + 1, "step": trainer.steps,
                         "loss": p["epoch_losses"][-1], "seconds": seconds} | ({"held_out": held_now} if held_now else {}))
                p.update(epoch=epoch + 1, batch=0, loss_sum=0.0, loss_count=0)
                if checkpoint_dir and epoch + 1 < epochs:
                    _checkpoint(trainer, checkpoint_dir)
                if ctrl_c.pressed:
                    _interrupted(trainer, checkpoint_dir)

        steps, rejected = trainer.steps - p["steps_at_start"], trainer.rejected - p["rejected_at_start"]
        if rejected > steps:
            _fail(trainer, checkpoint_dir, f"{rejected} of the round's {steps + rejected} steps were rejected")
        reason = trainer.divergence()
        if reason is not None:
            raise TrainingFailed(f"training diverged: the state after step {trainer.steps} is not usable ({reason}); "
                                 f"{_left(checkpoint_dir)}")
        record = {"round": p["round"], "data": p["source"], "samples": p["samples"], "epochs": epochs,
                  "steps": steps, "rejected": rejected, "epoch_losses": p["epoch_losses"],
                  "seconds": round(time.perf_counter() - t0, 3)}
        if held is not None:
            after = held_now or trainer.evaluate(held)  # the last epoch's, when the log evaluated it
            record |= {"held_out": after["samples"], "before": p["before"], "after": after}
        if eval_old is not None:
            record |= {"old": trainer.evaluate(eval_old, threshold=threshold)}
            if "old_before" in p:  # absent when a round resumed with eval_old added
                record["old_before"] = p["old_before"]
        if kept is not None:
            record["kept"] = len(kept)
        if replay is not None:  # the round's samples go into the buffer before the round's checkpoint
            replay.offer(((_with_teacher(pipe, train, i, kd_logits), y_all[i:i + 256])
                          for i in range(0, len(train), 256)), seed, p["round"])
            record["replay"] = len(replay)
        trainer.kd_logits = None  # the round's teacher is done with
        trainer.rounds.append(record)
        p["finished"] = True
        if checkpoint_dir:
            trainer.save_checkpoint(checkpoint_dir)
        if log:
            log({"event": "end", "round": record["round"], "step": trainer.steps, "steps": record["steps"],
                 "rejected": record["rejected"], "epoch_losses": record["epoch_losses"], "seconds": record["seconds"]}
                | ({"held_out": record["after"]} if "after" in record else {})
                | ({"old_task": record["old"]} if "old" in record else {}))
        return record


def model_inputs(pipe: Pipeline, raw: Any, source: str) -> dict[str, np.ndarray]:
    """A batch of raw samples as model-ready inputs by name (one-input models too)."""
    x = pipe.inputs(raw, source)
    return x if isinstance(x, dict) else {pipe.specs[0].name: x}


def _logits(trainer: Trainer, train: Dataset) -> np.ndarray:
    """The current weights' output on every sample of `train` (the inference graph, 256 at a time)."""
    predict = trainer.predictor()
    return np.concatenate([predict(model_inputs(trainer.pipeline, train.x[i:i + 256], train.source))
                           for i in range(0, len(train), 256)])


def _prune(trainer: Trainer, train: Dataset, y: np.ndarray, fraction: float, kind: str) -> list[int]:
    """The indices of `train` a pruned round keeps (runtime.prune), scored at the current weights."""
    return [int(i) for i in prune.keep(prune.scores(trainer.manifest.loss, _logits(trainer, train), y, kind),
                                       fraction)]


def _teach(trainer: Trainer, train: Dataset, replay: ReplayBuffer | None) -> np.ndarray:
    """The round's teacher logits (the current weights) on `train`; the replay buffer's are written into it."""
    if replay is not None and len(replay):
        replay.x[TEACHER_LOGITS] = trainer.predict({n: v for n, v in replay.x.items() if n != TEACHER_LOGITS})
    return _logits(trainer, train).astype(np.float32)


def _with_teacher(pipe: Pipeline, train: Dataset, i: int, kd_logits: np.ndarray | None) -> dict[str, np.ndarray]:
    """Model-ready samples i..i+256 of `train`, with their teacher logits when the step takes them."""
    raw = train.x[i:i + 256]
    x = model_inputs(pipe, raw, train.source)
    teacher = pipe.teacher_logits(raw, train.source) if kd_logits is None else kd_logits[i:i + 256]
    return x if teacher is None else x | {TEACHER_LOGITS: teacher}


def _unsound(trainer: Trainer) -> str | None:
    """Why the state within a round must not replace the last checkpoint, or None."""
    p = trainer.progress or {}
    rejected = trainer.rejected - p.get("rejected_at_start", trainer.rejected)
    if rejected > trainer.steps - p.get("steps_at_start", trainer.steps):
        return f"{rejected} of the round's steps so far were rejected, the last because {trainer.last_rejection}"
    return trainer.divergence()


def _checkpoint(trainer: Trainer, directory: str) -> None:
    """A checkpoint within a round, skipped while the round is unsound: it goes on (and fails at its end
    if it is still unsound), and the previous checkpoint stays."""
    if _unsound(trainer) is None:
        trainer.save_checkpoint(directory)


def _left(checkpoint_dir: str | None) -> str:
    return checkpoint.describe(checkpoint_dir) if checkpoint_dir else "nothing was saved (no checkpoint directory)"


def _fail(trainer: Trainer, checkpoint_dir: str | None, what: str) -> None:
    raise TrainingFailed(f"training stopped: {what}, the last because {trainer.last_rejection}; {_left(checkpoint_dir)}")


def _interrupted(trainer: Trainer, checkpoint_dir: str | None) -> None:
    p = trainer.progress or {}
    at = f"step {trainer.steps} (round {p.get('round')}: {p.get('epoch')} epochs and {p.get('batch')} batches done)"
    if not checkpoint_dir:
        raise Interrupted(f"stopped at {at}; nothing saved (no checkpoint directory)")
    why = _unsound(trainer)
    if why is not None:
        raise Interrupted(f"stopped at {at}; not saved ({why}); {_left(checkpoint_dir)}")
    path = trainer.save_checkpoint(checkpoint_dir)
    raise Interrupted(f"saved {path} at {at}; resuming on the same data continues from there")


class _CtrlC:
    """Defers the first Ctrl-C (SIGINT) to the loop's next batch boundary, a consistent point to save at;
    a second one interrupts at once. Only in the main thread and over Python's own handler: a program
    that handles SIGINT itself keeps doing so."""

    def __enter__(self) -> "_CtrlC":
        self.pressed = False
        self._old: Any = None
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, signum: int, frame: Any) -> None:
        self.pressed = True
        signal.signal(signal.SIGINT, self._old)

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _schedule(spec: Schedule | dict[str, Any] | None, trainer: Trainer, round_steps: int) -> Schedule:
    if isinstance(spec, Schedule):
        return spec
    d = {"name": "constant", "base_lr": float(trainer.manifest.lr.initial)} | dict(spec or {})
    if d.get("base_lr") is None:
        d["base_lr"] = float(trainer.manifest.lr.initial)
    if d["name"] == "cosine" and not d.get("total_steps"):
        d["total_steps"] = round_steps
    return Schedule(**d)
