"""One part of a split model hosted for several clients: the step protocol and its checkpoints, independent of
the transport (runtime.serve carries it over HTTP, runtime.remote is its client).

What stays true:
- Every request names its client, the split and the part digest it expects, and its step number; another
  split or part is refused (409 `mismatch`) before anything else is looked at.
- Steps of one client are numbered 1, 2, 3, ...: a step is applied once. A step equal to the client's last
  applied one, with the same request bytes, gets the answer it got then (a retry after a lost answer); any
  other step at or below it is refused (409 `stale`), and so is one that skips a number (409 `gap`: the
  server came back from an older checkpoint than the client's). A client the server has not seen may start
  at any number (a new client, or one resuming from its own checkpoint).
- A refused request changes nothing: tensors are checked (names, shape, dtype, finite) before the part runs.
- `forward` keeps the activation it received until the same step's `backward` (or `apply`), so the
  activation crosses the network once; steps of all clients are serialised by one lock on the shared part.
- Private backpropagation (a part with gradient graphs, runtime.split.Part.vjp/apply) takes a step in two
  exchanges of the same number: `vjp` (m output gradients -> m input and parameter gradients, no state
  change; answered once, a retry replays it) then `apply` (the combined parameter gradients: the update).
  Between them the step's other exchanges are refused; `apply` without its `vjp` is refused.
- A `step` or `backward` may decline the input gradient (`want_grad` false): its answer carries none.
- A checkpoint holds the part's training state (Trainer.save_checkpoint) and every client's last step,
  cached answer, pending activation and a `vjp` answer awaiting its `apply`, and switches from one to the next by one atomic rename: a server
  killed at any moment restarts from a complete, consistent checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from pockprop.artifact import safetensors
from pockprop.artifact.contract import TensorSpec
from pockprop.artifact.durable import write_atomic
from pockprop.errors import ArtifactError, CheckpointError, DataError, TrainingFailed
from pockprop.runtime import checkpoint
from pockprop.runtime.wire import MAX_HEADER, PARAM, nbytes

KINDS = ("forward", "backward", "step", "vjp", "apply")
MAX_VECTORS = 16  # output gradients one `vjp` may carry (P3EFT's m)
POINTER = "serve.json"  # the checkpoint directory's current generation; replaced atomically
SESSIONS = "sessions.safetensors"  # inside a generation, beside the part's checkpoint.safetensors
FORMAT, VERSION = "pockprop-serve", 1
MAX_CLIENT_ID = 128


class Refused(Exception):
    """A request the host will not serve: HTTP `status`, a reason `code` and a one-line message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class Answer:
    kind: str
    digest: str  # sha256 of the request that produced it: a replay must be the same request
    meta: dict[str, Any]
    tensors: dict[str, np.ndarray]


@dataclass
class Session:
    last: int = 0  # the last step applied for this client (0: none yet)
    answer: Answer | None = None  # the answer to step `last`, replayed to a retry
    pending: tuple[int, np.ndarray] | None = None  # (step, activation) from forward, until that step's backward
    vjp: Answer | None = None  # the vjp answer of step last + 1, replayed to a retry until that step's apply


def _loss_json(loss: float | None) -> float | str | None:
    """A loss as standard JSON holds it: a number, or "nan" / "inf" / "-inf" (a run without the guard can
    diverge), which float() reads back."""
    return None if loss is None else float(loss) if np.isfinite(loss) else str(float(loss))


def _spec_json(spec: Any) -> dict[str, Any] | None:
    return None if spec is None else {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype}


def _replayed(answer: Answer, digest: str, other: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`answer` again, to a retry (the request of the same sha256); 409 `stale` (`other` says why) to another."""
    if answer.digest != digest:
        raise Refused(409, "stale", f"{other}; a retry must resend the same request")
    return answer.meta | {"replayed": True}, answer.tensors


class Host:
    """`part` (runtime.split.Part, or anything with its `info`, `trainer`, `forward`, `step` and, for private
    backpropagation, `gradient_specs`, `vjp` and `apply`) served to several clients; with `directory`, checkpointed there every `every` applied steps (0: only by `save`).
    Holds the directory's lock (runtime.checkpoint.lock) until `close`."""

    def __init__(self, part: Any, directory: str | None = None, every: int = 0):
        info = part.info
        if info.boundary_in is None:
            raise ArtifactError(f"part {info.index} of {info.parts} takes the raw data, not an activation: serve a "
                                "later part (the client keeps the first)")
        self.part, self.info, self.directory, self.every = part, info, directory, every
        self.labels = getattr(getattr(part.trainer, "manifest", None), "labels", None) if info.has_labels else None
        if info.has_labels and self.labels is None:
            raise ArtifactError(f"part {info.index}: it holds the loss but names no labels tensor")
        specs = getattr(part, "gradient_specs", None)
        # the trained tensors of vjp / apply; None: the part serves no private backpropagation
        self.params: dict[str, TensorSpec] | None = specs() if specs and info.boundary_out is not None else None
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self._since = 0  # steps applied since the last checkpoint
        self._generation = 0
        self._held = None
        if directory is not None:
            self._held = checkpoint.lock(directory)
            self._held.__enter__()

    # -- what a request may carry --------------------------------------------------------------------
    def expected(self, kind: str) -> dict[str, Any]:
        """The tensors a request of `kind` must carry, by name: their specs (name, shape, dtype)."""
        if kind not in KINDS:
            raise Refused(404, "unknown", f"no such exchange {kind!r} (one of {', '.join(KINDS)})")
        if kind in ("vjp", "apply"):
            return self._expected_private(kind)
        want: dict[str, Any] = {}
        if kind in ("forward", "step"):
            want["x"] = self.info.boundary_in
        if kind == "backward" and self.info.boundary_out is None:
            raise Refused(400, "no_backward", f"part {self.info.index} ends in the loss: it takes `step` with "
                                              "labels, not a gradient")
        if kind in ("backward", "step") and self.info.boundary_out is not None:
            want["grad"] = self.info.boundary_out
        if kind == "step" and self.labels is not None:
            want["labels"] = self.labels
        return want

    def _expected_private(self, kind: str) -> dict[str, Any]:
        if self.params is None:
            raise Refused(409, "no_gradients", f"part {self.info.index} has no private backpropagation (`vjp`, `apply`):"
                                               " compile the split with --private-backprop; a part with the loss has"
                                               " none")
        if kind == "apply":
            return {PARAM + name: spec for name, spec in self.params.items()}
        out = self.info.boundary_out
        assert out is not None
        # `grad`: m stacked output gradients, 1 <= m <= MAX_VECTORS; `x` may be left out after a forward
        return {"x": self.info.boundary_in, "grad": TensorSpec(out.name, (MAX_VECTORS, *out.shape), out.dtype)}

    def body_limit(self, kind: str) -> int:
        """The most bytes a request of `kind` can need: refused (413) beyond it before it is read."""
        return 8 + MAX_HEADER + sum(nbytes(tuple(s.shape), s.dtype) for s in self.expected(kind).values())

    def describe(self, client: str | None = None) -> dict[str, Any]:
        """The part's identity and boundaries, and `client`'s last applied step (0: none)."""
        i = self.info
        doc = {"split_id": i.split_id, "digest": i.digest, "index": i.index, "parts": i.parts,
               "has_labels": i.has_labels, "boundary_in": _spec_json(i.boundary_in),
               "boundary_out": _spec_json(i.boundary_out), "labels": _spec_json(self.labels),
               "steps": int(self.part.trainer.steps), "private": self.params is not None, "max_vectors": MAX_VECTORS}
        if client is not None:
            with self.lock:
                doc["last_step"] = self.sessions[client].last if client in self.sessions else 0
        return doc

    def _check_meta(self, kind: str, meta: dict[str, Any]) -> tuple[str, int, float | None, bool]:
        client, step, lr, want_grad = meta.get("client"), meta.get("step"), meta.get("lr"), meta.get("want_grad", True)
        if meta.get("split_id") != self.info.split_id:
            raise Refused(409, "mismatch", f"split {str(meta.get('split_id'))[:40]!r}: this server hosts part "
                                           f"{self.info.index} of split {self.info.split_id!r}")
        if meta.get("digest") != self.info.digest:
            raise Refused(409, "mismatch", f"part digest {str(meta.get('digest'))[:16]!r}...: this server's part "
                                           f"{self.info.index} is {self.info.digest[:16]}... (another compile?)")
        if not (isinstance(client, str) and 0 < len(client) <= MAX_CLIENT_ID and client.isprintable()):
            raise Refused(400, "bad_request", f"client id {client!r:.60}: expected 1 to {MAX_CLIENT_ID} printable "
                                              "characters")
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 1):
            raise Refused(400, "bad_request", f"step {step!r:.40}: expected an integer >= 1")
        if lr is not None and not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr < float("inf")):
            raise Refused(400, "bad_request", f"lr {lr!r:.40}: expected a finite number > 0")
        if not isinstance(want_grad, bool) or not (want_grad or kind in ("step", "backward")):
            raise Refused(400, "bad_request", f"want_grad {want_grad!r:.20}: expected true or false (false only on "
                                              "step or backward)")
        return client, step, lr, want_grad

    def _check_tensors(self, kind: str, tensors: dict[str, np.ndarray]) -> None:
        want = self.expected(kind)
        optional = {"x"} if kind == "vjp" else set()
        if not set(want) - optional <= set(tensors) <= set(want):
            raise Refused(400, "bad_tensor", f"{kind} carries tensors {sorted(tensors)}; expected {sorted(want)}"
                                             + (" (x optional)" if optional else ""))
        for name, spec in want.items():
            if name not in tensors:
                continue
            a, shape = tensors[name], list(spec.shape)
            stacked = kind == "vjp" and name == "grad"  # m vectors: the first dimension is m, up to MAX_VECTORS
            if stacked and a.ndim == len(shape) and 1 <= a.shape[0] <= MAX_VECTORS:
                shape[0] = a.shape[0]
            if list(a.shape) != shape or a.dtype.name != spec.dtype:
                what = f"m (1 to {MAX_VECTORS}) x {list(spec.shape[1:])}" if stacked else str(list(spec.shape))
                raise Refused(400, "bad_tensor", f"{name}: expected {spec.dtype}{what} ({spec.name}), "
                                                 f"got {a.dtype.name}{list(a.shape)}")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise Refused(400, "bad_tensor", f"{name}: holds NaN or Inf")

    # -- the protocol ---------------------------------------------------------------------------------
    def handle(self, kind: str, meta: dict[str, Any], tensors: dict[str, np.ndarray],
               digest: str = "") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Serve one request (`digest`: the request's sha256, to recognise a retry); Refused if it must not be."""
        self.expected(kind)
        client, step, lr, want_grad = self._check_meta(kind, meta)
        with self.lock:
            session = self.sessions.get(client)
            last = session.last if session else 0
            if step <= last:
                return self._replay(client, session, kind, step, digest)
            if session is not None and step > last + 1:
                raise Refused(409, "gap", f"client {client!r}: step {step} after step {last}; this server's state is "
                                          f"at your step {last} (restarted from an older checkpoint?): resume the "
                                          f"client from its step {last}")
            if session is not None and session.vjp is not None and kind != "apply":  # step == last + 1
                return self._replay_vjp(client, session, kind, step, digest)
            self._check_tensors(kind, tensors)
            if (kind == "backward" or kind == "vjp" and "x" not in tensors) and (
                    session is None or session.pending is None or session.pending[0] != step):
                raise Refused(409, "no_forward", f"client {client!r}: no forward of step {step} here to go back through")
            if kind == "apply" and (session is None or session.vjp is None):
                raise Refused(409, "no_vjp", f"client {client!r}: no vjp of step {step} here: apply follows its vjp")
            try:
                return self._apply(client, kind, step, lr, want_grad, tensors, digest)
            except DataError as ex:  # the part's own checks (label range, a step its guard rejects): nothing changed
                raise Refused(400, "refused", str(ex)) from None

    def _replay(self, client: str, session: Session | None, kind: str, step: int,
                digest: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        answer = session.answer if session else None
        if answer is None or step != session.last or answer.kind != kind:
            raise Refused(409, "stale", f"client {client!r}: step {step} is not after its last applied step "
                                        f"{session.last if session else 0}")
        return _replayed(answer, digest, f"client {client!r}: step {step} was applied with other tensors")

    def _replay_vjp(self, client: str, session: Session, kind: str, step: int,
                    digest: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """A request at a step whose vjp is answered (not yet applied): only that vjp again, the same bytes."""
        assert session.vjp is not None
        if kind != "vjp":
            raise Refused(409, "vjp_answered", f"client {client!r}: step {step}'s vjp is answered; its apply comes "
                                               f"next, not {kind}")
        return _replayed(session.vjp, digest, f"client {client!r}: step {step}'s vjp was answered for other tensors")

    def _apply(self, client: str, kind: str, step: int, lr: float | None, want_grad: bool,
               tensors: dict[str, np.ndarray], digest: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        session = self.sessions.get(client) or Session(last=step - 1)
        if kind in ("forward", "vjp"):  # nothing applied: the step stays open
            x = tensors["x"] if "x" in tensors else session.pending[1]  # type: ignore[index]
            if kind == "forward":
                meta, out = {"step": step}, {"y": np.asarray(self.part.forward(x))}
            else:
                meta, out = {"step": step, "vectors": len(tensors["grad"])}, self._vjp(x, tensors["grad"])
                session.vjp = Answer(kind, digest, meta, out)
            session.pending = (step, x)
            self.sessions[client] = session
            return meta, out
        if kind == "apply":
            assert self.params is not None
            self.part.apply({name: tensors[PARAM + name] for name in self.params}, lr=lr)
            grad = loss = None
        else:
            x = session.pending[1] if kind == "backward" else tensors["x"]  # type: ignore[index]
            grad, loss = self.part.step(x, grad_out=tensors.get("grad"), labels=tensors.get("labels"), lr=lr,
                                        want_grad=want_grad)
        out = {} if grad is None else {"grad": np.asarray(grad)}
        meta = {"step": step, "loss": _loss_json(loss), "server_steps": int(self.part.trainer.steps)}
        session.last, session.pending, session.vjp = step, None, None
        session.answer = Answer(kind, digest, meta, out)
        self.sessions[client] = session
        self._since += 1
        if self.directory is not None and self.every and self._since >= self.every:
            try:
                self._save()
            except (CheckpointError, TrainingFailed) as ex:  # the step stands (its answer is cached): say so, go on
                print(f"pockprop serve: warning: no checkpoint after step {step} of {client!r}: {ex}", file=sys.stderr)
        return meta, out

    def _vjp(self, x: np.ndarray, grads: np.ndarray) -> dict[str, np.ndarray]:
        """The part's vjp for each of the stacked output gradients, stacked the same way: `grad` (input
        gradients) and PARAM + name (each trained tensor's)."""
        assert self.params is not None
        res = self.part.vjp(x, list(grads))
        return {"grad": np.stack([np.asarray(g) for g, _ in res])} | {
            PARAM + name: np.stack([np.asarray(p[name]) for _, p in res]) for name in self.params}

    # -- checkpoints ------------------------------------------------------------------------------------
    def save(self) -> str | None:
        """Checkpoint now (a directory was given); returns the generation's path."""
        with self.lock:
            return self._save() if self.directory is not None else None

    def _save(self) -> str:
        assert self.directory is not None
        name = f"gen-{self._generation + 1:08d}"
        path = os.path.join(self.directory, name)
        if os.path.exists(path):  # a save killed before its pointer was written: never pointed at
            shutil.rmtree(path)
        self.part.trainer.save_checkpoint(path)
        tensors, doc = self._sessions_doc()
        try:
            write_atomic(os.path.join(path, SESSIONS), safetensors.dumps(tensors, {FORMAT: json.dumps(doc)}))
            pointer = {"format": FORMAT, "version": VERSION, "generation": name, "split_id": self.info.split_id,
                       "digest": self.info.digest, "steps": int(self.part.trainer.steps)}
            write_atomic(os.path.join(self.directory, POINTER), json.dumps(pointer).encode())  # the switch
        except OSError as ex:
            raise CheckpointError(str(ex.strerror or ex)) from None
        self._generation += 1
        self._since = 0
        for entry in os.listdir(self.directory):  # older generations, and any a killed save left
            if entry.startswith("gen-") and entry != name:
                shutil.rmtree(os.path.join(self.directory, entry), ignore_errors=True)
        return path

    def _sessions_doc(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors: dict[str, np.ndarray] = {}
        clients = {}
        for i, (client, s) in enumerate(sorted(self.sessions.items())):
            entry: dict[str, Any] = {"last": s.last, "answer": None, "pending": None, "vjp": None}
            for field, a in (("answer", s.answer), ("vjp", s.vjp)):
                if a is not None:
                    entry[field] = {"kind": a.kind, "digest": a.digest, "meta": a.meta, "tensors": list(a.tensors)}
                    tensors |= {f"{i}/{field}/{k}": v for k, v in a.tensors.items()}
            if s.pending is not None:
                entry["pending"] = s.pending[0]
                tensors[f"{i}/pending"] = s.pending[1]
            clients[client] = entry
        return tensors, {"steps": int(self.part.trainer.steps), "clients": clients}

    def resume(self) -> bool:
        """Restore the last checkpoint of the directory, if any (False: none yet); CheckpointError if it belongs
        to another split or part, or is unreadable."""
        if self.directory is None or not os.path.exists(os.path.join(self.directory, POINTER)):
            return False
        where = os.path.join(self.directory, POINTER)
        try:
            with open(where, "rb") as f:
                pointer = json.loads(f.read())
            if pointer.get("format") != FORMAT or pointer.get("version") != VERSION:
                raise ValueError(f"format {pointer.get('format')!r} version {pointer.get('version')!r}")
            name = pointer["generation"]
            if not (isinstance(name, str) and name.startswith("gen-") and name[4:].isdigit()):
                raise ValueError(f"generation {name!r:.40}")
        except (OSError, ValueError, KeyError, AttributeError) as ex:
            raise CheckpointError(f"{where}: not a readable serve checkpoint ({ex})") from None
        if (pointer.get("split_id"), pointer.get("digest")) != (self.info.split_id, self.info.digest):
            raise CheckpointError(f"{where}: made for split {pointer.get('split_id')!r}, part digest "
                                  f"{str(pointer.get('digest'))[:16]}...; this is split {self.info.split_id!r}, "
                                  f"part {self.info.digest[:16]}...")
        path = os.path.join(self.directory, name)
        self.part.trainer.resume(path)
        self.sessions = self._read_sessions(os.path.join(path, SESSIONS))
        self._generation, self._since = int(name[4:]), 0
        return True

    def _read_sessions(self, path: str) -> dict[str, Session]:
        try:
            tensors, meta = safetensors.load(path)
            doc = json.loads(meta[FORMAT])
            if doc["steps"] != self.part.trainer.steps:
                raise ValueError(f"written at step {doc['steps']}, beside a part state at step {self.part.trainer.steps}")
            sessions = {}
            for i, (client, e) in enumerate(sorted(doc["clients"].items())):
                s = Session(last=int(e["last"]))
                s.answer, s.vjp = (None if e.get(field) is None else Answer(
                    e[field]["kind"], e[field]["digest"], e[field]["meta"],
                    {k: tensors[f"{i}/{field}/{k}"] for k in e[field]["tensors"]}) for field in ("answer", "vjp"))
                if e["pending"] is not None:
                    s.pending = (int(e["pending"]), tensors[f"{i}/pending"])
                sessions[client] = s
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as ex:
            raise CheckpointError(f"{path}: not a readable serve checkpoint ({ex})") from None
        return sessions

    def close(self) -> None:
        """Release the checkpoint directory's lock (no checkpoint is written: call `save` first)."""
        if self._held is not None:
            self._held.__exit__(None, None, None)
            self._held = None
