"""`pockprop serve`: one part of a split model served over HTTP/1.1 to several clients (runtime.host holds the
protocol; docs/transport.md describes it).

Endpoints: `GET /v1/info[?client=ID]` (JSON), `POST /v1/forward`, `/v1/backward`, `/v1/step`, `/v1/vjp`,
`/v1/apply` (runtime.wire messages both ways). A request must say its Content-Length, and one over what its
exchange can need is refused (413) before its body is read; a socket idle for `timeout` seconds is closed.
Errors answer JSON `{"error": one line, "code": reason}` with a 4xx status; the server's state is then
unchanged. The standard library only: a device or a server needs nothing beyond the runtime's numpy and
onnxruntime.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import signal
import socket
import socketserver
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from pockprop import args as cli_args
from pockprop.errors import Interrupted, UsageError
from pockprop.runtime.host import Host, Refused
from pockprop.runtime.wire import CONTENT_TYPE, WireError, decode, encode

PREFIX = "/v1/"


class Handler(BaseHTTPRequestHandler):
    """One connection (kept alive between requests); `server.host` serves what it reads."""

    protocol_version = "HTTP/1.1"
    server: "PartServer"

    busy = False  # between reading a request and answering it (an idle connection waits for the next one)

    def setup(self) -> None:
        self.timeout = self.server.timeout_s  # StreamRequestHandler applies it to the socket
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self)
        super().finish()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        finally:
            self.busy = False
            if self.server.stopping:  # answered: no further request on this connection
                self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if close:  # the body was not read: the connection cannot carry another request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, close: bool = False) -> None:
        self._send(status, json.dumps({"error": message, "code": code}).encode(), "application/json", close)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.busy = True
        url = urlsplit(self.path)
        if url.path != PREFIX + "info":
            return self._error(404, "unknown", f"no such resource {url.path!r:.80} (GET {PREFIX}info)")
        client = parse_qs(url.query).get("client", [None])[0]
        self._send(200, json.dumps(self.server.host.describe(client)).encode(), "application/json")

    def do_POST(self) -> None:  # noqa: N802
        self.busy = True
        host = self.server.host
        kind = urlsplit(self.path).path.removeprefix(PREFIX) if self.path.startswith(PREFIX) else ""
        try:
            limit = host.body_limit(kind)
        except Refused as ex:
            return self._error(ex.status, ex.code, str(ex), close=True)
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return self._error(411, "bad_request", "a request must give its Content-Length", close=True)
        if int(length) > limit:
            return self._error(413, "too_large", f"{length} bytes: {kind} needs at most {limit}", close=True)
        body = self.rfile.read(int(length))
        if len(body) != int(length):
            self.close_connection = True
            return  # the client went away mid-body: nobody to answer
        try:
            meta, tensors = decode(body)
            out_meta, out = host.handle(kind, meta, tensors, hashlib.sha256(body).hexdigest())
            answer = encode(out_meta, out)
        except WireError as ex:
            return self._error(400, "bad_message", str(ex))
        except Refused as ex:
            return self._error(ex.status, ex.code, str(ex))
        except Exception as ex:  # noqa: BLE001 - a bug: say so to the client, keep serving the others
            traceback.print_exc()
            return self._error(500, "internal", f"internal error: {type(ex).__name__}: {ex}")
        self._send(200, answer, CONTENT_TYPE)


class PartServer(ThreadingHTTPServer):
    """A threading HTTP server of one Host; `server_close` waits for the requests in flight."""

    daemon_threads = False  # server_close joins them: a step in flight finishes before the last checkpoint
    block_on_close = True

    def __init__(self, host: Host, address: tuple[str, int], timeout: float = 30.0, verbose: bool = False):
        self.host, self.timeout_s, self.verbose = host, timeout, verbose
        self.connections: set[Handler] = set()
        self.connections_lock = threading.Lock()
        self.stopping = False
        super().__init__(address, Handler)

    def server_close(self) -> None:
        """Stop listening, close the connections idle between requests (a client's kept-alive one would
        otherwise hold the stop for `timeout`), and wait for the requests in flight to be answered."""
        self.stopping = True
        socketserver.TCPServer.server_close(self)  # the listening socket; ThreadingMixIn's would join first
        with self.connections_lock:
            idle = [h for h in self.connections if not h.busy]
        for h in idle:
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._threads.join()  # type: ignore[attr-defined]

    @property
    def url(self) -> str:
        name, port = self.server_address[:2]
        return f"http://{name}:{port}"


def serve_until_stopped(server: PartServer, on_stop: Callable[[], None] | None = None) -> str:
    """Serve until SIGTERM or Ctrl-C (from the main thread), then wait for the requests in flight and
    checkpoint; returns how it stopped ("terminated" or "interrupted")."""
    how = {"signal": "terminated"}

    def stop(signum: int, _frame: Any) -> None:
        how["signal"] = "interrupted" if signum == signal.SIGINT else "terminated"
        threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown() waits for serve_forever

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        server.server_close()
        if on_stop is not None:
            on_stop()
    return how["signal"]


# -- the command ------------------------------------------------------------------------------------------
def load_part(path: str, threads: int | None) -> Any:
    """The part artifact at `path` (runtime.split.Part)."""
    from pockprop.runtime.split import Part

    return Part.load(path, threads=threads)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve one part of a split model to clients over HTTP (numpy + onnxruntime only)",
                       description="Host a server-side part of a split compile (`pockprop compile --split-at`): "
                                   "clients send boundary activations and gradients (docs/transport.md); steps of "
                                   "several clients are serialised, a retried step is never applied twice.",
                       epilog="Exit codes: 0 stopped by SIGTERM (after a last checkpoint); 2 bad input (artifact, "
                              "checkpoint, a port in use); 130 Ctrl-C (after a last checkpoint); 1 internal error.")
    p.add_argument("artifact", help="the part's artifact directory or packed .pockprop file")
    p.add_argument("--port", type=cli_args.integer(0, 65535), required=True, help="TCP port (0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--checkpoint", help="checkpoint directory: resumed from at start, written on stop")
    p.add_argument("--checkpoint-every", type=cli_args.non_negative_int, default=0,
                   help="also checkpoint every N applied steps (0: only on stop)")
    p.add_argument("--timeout", type=cli_args.number(0, lo_open=True), default=30.0,
                   help="seconds a connection may stay silent mid-request or idle before it is closed")
    p.add_argument("--verbose", action="store_true", help="log every request on stderr")
    cli_args.add_threads(p)
    p.set_defaults(func=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    if args.checkpoint_every and not args.checkpoint:
        raise UsageError("--checkpoint-every needs --checkpoint")
    if args.checkpoint:
        cli_args.check_output_dir(args.checkpoint, "--checkpoint")
    part = load_part(args.artifact, args.threads)
    host = Host(part, args.checkpoint, args.checkpoint_every)
    try:
        resumed = host.resume()
        try:
            server = PartServer(host, (args.host, args.port), args.timeout, args.verbose)
        except OSError as ex:
            raise OSError(ex.errno, f"{args.host}:{args.port}: cannot listen ({ex.strerror})") from None
        i = host.info
        note = f", resumed at step {part.trainer.steps}" if resumed else ""
        print(f"pockprop serve: part {i.index} of {i.parts} (split {i.split_id}) on {server.url}{note}", flush=True)
        saved: list[str] = []
        how = serve_until_stopped(server, lambda: saved.append(str(host.save())) if args.checkpoint else None)
    finally:
        host.close()
    what = f"checkpoint {saved[0]} (step {part.trainer.steps})" if saved else "no checkpoint (no --checkpoint)"
    if how == "interrupted":
        raise Interrupted(what)
    print(f"pockprop serve: stopped; {what}", file=sys.stderr)
    return 0
