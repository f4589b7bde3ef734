"""Helpers of the transport tests: a part server on a loopback thread, a proxy that loses answers, raw posts."""
from __future__ import annotations

import contextlib
import http.client
import json
import socket
import socketserver
import threading
from typing import Any, Iterator

import numpy as np

from pockprop.runtime.host import Host
from pockprop.runtime.serve import PartServer
from pockprop.runtime.wire import CONTENT_TYPE, decode, encode


def u_step(bottom: Any, middle: Any, head: Any, x: np.ndarray, y: np.ndarray) -> float:
    """One step of a U-shaped split: the activation goes up, the head's gradient comes back down (the same
    calls whether `middle` is local or a RemotePart)."""
    a = bottom.forward(x)
    h = middle.forward(a)
    g2, loss = head.step(h, labels=y)
    g1, _ = middle.step(a, grad_out=g2)
    if g1 is not None:
        bottom.step(x, grad_out=g1)
    return loss


@contextlib.contextmanager
def serving(part: Any, directory: str | None = None, every: int = 0, timeout: float = 5.0,
            resume: bool = False, save_on_stop: bool = False) -> Iterator[PartServer]:
    """`part` served on an ephemeral loopback port; stopping without `save_on_stop` is a kill: nothing is
    written beyond the periodic checkpoints."""
    host = Host(part, directory, every)
    if resume:
        host.resume()
    server = PartServer(host, ("127.0.0.1", 0), timeout)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        if save_on_stop:
            host.save()
        host.close()


def post(url: str, kind: str, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> tuple[int, Any]:
    """A raw request: (status, decoded message or JSON error)."""
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", f"/v1/{kind}", encode(meta, tensors), {"Content-Type": CONTENT_TYPE})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return resp.status, decode(data) if resp.status == 200 else json.loads(data)


def _read_message(f: Any) -> tuple[bytes, str] | None:
    """One HTTP message (head and body) from a file, and its first line; None at the end of the stream."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = f.readline()
        if not line:
            return None
        head += line
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + f.read(length), head.split(b"\r\n")[0].decode()


class DroppingProxy(socketserver.ThreadingTCPServer):
    """Forwards HTTP requests to `port`; the first `drops` answers to requests on `path` are read from the
    server (so the server has acted) and then lost: the client's connection is closed instead."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, path: str, drops: int = 1):
        self.target, self.path, self.drops, self.dropped = port, path, drops, 0
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _ProxyHandler(socketserver.StreamRequestHandler):
    server: DroppingProxy

    def handle(self) -> None:
        with socket.create_connection(("127.0.0.1", self.server.target)) as upstream:
            up = upstream.makefile("rb")
            while True:
                request = _read_message(self.rfile)
                if request is None:
                    return
                upstream.sendall(request[0])
                answer = _read_message(up)
                if answer is None:
                    return
                if f" {self.server.path} " in request[1] and self.server.dropped < self.server.drops:
                    self.server.dropped += 1
                    return  # the server applied it; the client never hears
                self.wfile.write(answer[0])
                self.wfile.flush()


def private_step(bottom: Any, middle: Any, head: Any, x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
                 m: int = 3) -> float:
    """One U-shaped step with private backpropagation through `middle`: the head's gradient g goes up hidden
    as z_1 = g + r among random vectors z_2 = r, z_3, ...; the device combines the answers with (1, -1, 0, ...)
    and sends the parameter gradients back to be applied (the same calls whether `middle` is local or remote)."""
    a = bottom.forward(x)
    h = middle.forward(a)
    g, loss = head.step(h, labels=y)
    if m == 1:  # no mask: the true gradient alone
        ((gin, grads),) = middle.vjp(a, [g])
    else:
        r = rng.standard_normal((m - 1, *g.shape)).astype(g.dtype)
        (gin, p0), (rin, p1), *_ = middle.vjp(a, [g + r[0], *r])
        gin, grads = gin - rin, {k: p0[k] - p1[k] for k in p0}
    middle.apply(grads)
    bottom.step(x, grad_out=gin)
    return loss
