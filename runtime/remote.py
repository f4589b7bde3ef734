"""A part of a split model hosted by `pockprop serve`, used like a local one: `RemotePart` has the `info`,
`forward`, `step`, `vjp` and `apply` of runtime.split.Part, so a training loop does not care where a part runs.

What stays true:
- Each training step carries the next step number of this client (1, 2, ...), and a retry re-sends the very
  same request: after a lost answer the server replays the answer it gave (runtime.host), so a step is never
  applied twice. Connection errors, timeouts and 503 answers are retried with exponential backoff; after the
  last try RemoteUnavailable says the step may or may not have been applied (re-sending it is safe).
- A 4xx answer raises RemoteError with the server's one-line reason; nothing changed on the server.
- `step` and `vjp` after `forward` of the same activation send only the gradients (the server kept the
  activation). `vjp` and `apply` are one step (one number) of private backpropagation: `vjp` sends the m
  output gradients and changes nothing, `apply` sends the combined parameter gradients and is the update.
- `step(..., want_grad=False)` asks for no input gradient: none crosses the network.
- `sent` / `received` count the bytes of every HTTP message (request line, headers, body; retries
  included), and `traffic` holds them per step.
"""
from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from pockprop.artifact.contract import TensorSpec
from pockprop.errors import DataError, RemoteError, RemoteUnavailable
from pockprop.runtime.wire import CONTENT_TYPE, PARAM, WireError, decode, encode

PREFIX = "/v1/"


@dataclass(frozen=True)
class RemoteInfo:
    """What the server says of its part (the fields of runtime.split.SplitInfo)."""

    index: int
    parts: int
    split_id: str
    digest: str
    boundary_in: TensorSpec | None
    boundary_out: TensorSpec | None
    has_labels: bool


def _spec(doc: Any) -> TensorSpec | None:
    return None if doc is None else TensorSpec(doc["name"], tuple(doc["shape"]), doc["dtype"])


class _Counting(http.client.HTTPConnection):
    """An HTTPConnection that counts the bytes it writes."""

    written = 0

    def send(self, data: Any) -> None:
        self.written += len(data)
        super().send(data)


class RemotePart:
    """The part served at `url` (http://HOST:PORT), trained as client `client_id`. `split_id` and `digest` are
    what the client's own parts expect (RemoteError at once if the server hosts another part). `timeout`:
    seconds per try; `retries`: tries after the first; `start_step`: this client's next step number
    (default: the one after the last the server applied for it)."""

    def __init__(self, url: str, client_id: str, split_id: str, digest: str, timeout: float = 30.0,
                 retries: int = 3, backoff: float = 0.2, start_step: int | None = None):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise RemoteError(f"{url}: expected http://HOST:PORT")
        self.url, self.client_id, self.timeout, self.retries, self.backoff = url, client_id, timeout, retries, backoff
        self._address = (parts.hostname, parts.port or 80)
        self._conn: _Counting | None = None
        self.sent = self.received = 0
        self.traffic: list[tuple[int, int]] = []  # (sent, received) bytes of each completed step
        self._mark = (0, 0)  # the counters when the current step began
        self._pending: tuple[int, np.ndarray] | None = None  # (step, activation) of the last forward
        self._last_step = 0
        try:
            self.info = self._connect(split_id, digest)
        except BaseException:
            self.close()
            raise
        self.split_id, self.digest = split_id, digest
        self.next_step = self._last_step + 1 if start_step is None else start_step

    def _connect(self, split_id: str, digest: str) -> RemoteInfo:
        """The server's part, checked to be the one expected; its last applied step of this client."""
        doc = self._exchange("GET", f"{PREFIX}info?client={quote(self.client_id)}", None)
        try:
            info = RemoteInfo(doc["index"], doc["parts"], doc["split_id"], doc["digest"], _spec(doc["boundary_in"]),
                              _spec(doc["boundary_out"]), doc["has_labels"])
            self._last_step = int(doc["last_step"])
        except (KeyError, TypeError, ValueError) as ex:
            raise RemoteError(f"{self.url}: not a pockprop part server ({ex})") from None
        if (info.split_id, info.digest) != (split_id, digest):
            raise RemoteError(f"{self.url}: hosts part {info.index} of split {info.split_id!r} (digest "
                              f"{info.digest[:16]}...); expected split {split_id!r}, digest {digest[:16]}...",
                              409, "mismatch")
        return info

    # -- the Part interface -------------------------------------------------------------------------
    def forward(self, x: Any) -> np.ndarray:
        """The part's output for activation `x` with its current weights; the server keeps `x` for `step`."""
        x = np.asarray(x)
        meta, out = self._post("forward", {"x": x})
        self._pending = (self.next_step, x.copy())
        return out["y"]

    def step(self, x: Any, grad_out: Any = None, labels: Any = None, lr: float | None = None,
             want_grad: bool = True) -> tuple[np.ndarray | None, float | None]:
        """One training step of the remote part: (gradient of its input, or None with `want_grad` False;
        loss or None)."""
        x = np.asarray(x)
        extra = {} if want_grad else {"want_grad": False}
        if labels is None and grad_out is not None and self._forwarded(x):
            meta, out = self._post("backward", {"grad": np.asarray(grad_out)}, lr, extra)
        else:
            tensors = {"x": x} | ({} if grad_out is None else {"grad": np.asarray(grad_out)}) | (
                {} if labels is None else {"labels": np.asarray(labels)})
            meta, out = self._post("step", tensors, lr, extra)
        self._stepped()
        loss = meta.get("loss")
        return out.get("grad"), None if loss is None else float(loss)

    def vjp(self, x: Any, grad_outs: Any) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """For each output gradient, the gradient of the part's input and of each trained tensor at the
        server's current state, updating nothing (runtime.split.Part.vjp); the step's `apply` comes next."""
        x, grads = np.asarray(x), [np.asarray(g) for g in grad_outs]
        if not grads or len({(g.shape, g.dtype) for g in grads}) != 1:
            raise DataError(f"vjp: expected one or more output gradients of one shape and dtype, got "
                            f"{[(list(g.shape), g.dtype.name) for g in grads]}"[:300])
        stacked = np.stack(grads)
        _, out = self._post("vjp", {"grad": stacked} if self._forwarded(x) else {"x": x, "grad": stacked})
        params = {k.removeprefix(PARAM): v for k, v in out.items() if k.startswith(PARAM)}
        try:
            return [(out["grad"][i], {k: v[i] for k, v in params.items()}) for i in range(len(grads))]
        except (KeyError, IndexError) as ex:
            raise RemoteError(f"{self.url}: a vjp answer without {len(grads)} gradients ({ex})") from None

    def apply(self, grads: dict[str, Any], lr: float | None = None) -> None:
        """The step's update with the given gradients (one per trained tensor, runtime.split.Part.apply),
        after this step's `vjp`."""
        self._post("apply", {PARAM + k: np.asarray(v) for k, v in grads.items()}, lr)
        self._stepped()

    def _forwarded(self, x: np.ndarray) -> bool:
        """The server keeps `x` from this step's forward."""
        p = self._pending
        return p is not None and p[0] == self.next_step and p[1].shape == x.shape and np.array_equal(p[1], x)

    def _stepped(self) -> None:
        self._pending = None
        self.next_step += 1
        self.traffic.append((self.sent - self._mark[0], self.received - self._mark[1]))
        self._mark = (self.sent, self.received)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "RemotePart":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the wire -----------------------------------------------------------------------------------
    def _post(self, kind: str, tensors: dict[str, np.ndarray], lr: float | None = None,
              extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {"client": self.client_id, "split_id": self.split_id, "digest": self.digest,
                "step": self.next_step} | (extra or {})
        if lr is not None:
            meta["lr"] = float(lr)
        body = self._exchange("POST", PREFIX + kind, encode(meta, tensors))
        try:
            return decode(body)
        except WireError as ex:
            raise RemoteError(f"{self.url}: unreadable answer to {kind} ({ex})") from None

    def _exchange(self, method: str, path: str, body: bytes | None) -> Any:
        """The answer's body (bytes; JSON decoded for GET), retrying what a retry can fix."""
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                status, data = self._once(method, path, body)
            except (OSError, http.client.HTTPException) as ex:
                self.close()  # the connection's state is unknown: a fresh one for the next try
                last = f"{type(ex).__name__}: {ex}" if str(ex) else type(ex).__name__
                continue
            if status == 503:
                last = "503 busy"
                continue
            if status != 200:
                raise self._refusal(status, data, path)
            return json.loads(data) if method == "GET" else data
        raise RemoteUnavailable(f"{self.url}{path}: no answer after {self.retries + 1} tries ({last}); the step may "
                                "or may not have been applied: re-sending it is safe")

    def _once(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        if self._conn is None:
            self._conn = _Counting(*self._address, timeout=self.timeout)
        conn = self._conn
        before = conn.written
        headers = {} if body is None else {"Content-Type": CONTENT_TYPE}
        try:
            conn.request(method, path, body, headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            self.sent += conn.written - before
        status_line = len(f"HTTP/1.1 {resp.status} {resp.reason}\r\n")
        self.received += status_line + sum(len(f"{k}: {v}\r\n") for k, v in resp.getheaders()) + 2 + len(data)
        if resp.will_close:
            self.close()
        return resp.status, data

    def _refusal(self, status: int, data: bytes, path: str) -> RemoteError:
        try:
            doc = json.loads(data)
            message, code = str(doc["error"]), str(doc.get("code", ""))
        except (ValueError, KeyError, TypeError):
            message, code = data[:200].decode("utf-8", "replace"), ""
        return RemoteError(f"{self.url}{path}: {status}: {message}", status, code)
