"""The split transport on loopback (runtime.serve, runtime.host, runtime.remote, runtime.wire): a remote part
trains exactly like a local one, several clients share it, a retried step is applied once, bad requests
change nothing, and a restarted server continues from its checkpoint bit for bit."""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pockprop import cli
from pockprop.errors import CheckpointError, DataError, RemoteError, RemoteUnavailable
from pockprop.runtime import wire
from pockprop.runtime.host import POINTER, Host
from pockprop.runtime.remote import RemotePart
from tests.runtime.fake_part import FakePart
from tests.runtime import serve_util
from tests.runtime.serve_util import DroppingProxy, post, private_step, serving

ROOT = Path(__file__).resolve().parents[2]
B = 4


def u_parts(seed: int = 0) -> tuple[FakePart, FakePart, FakePart]:
    """A U-shaped split: the client's bottom (3 -> 6) and head with the loss (5 -> 3), the server's middle (6 -> 5)."""
    return (FakePart(0, 3, n_in=3, n_out=6, seed=seed), FakePart(1, 3, n_in=6, n_out=5, seed=seed + 1),
            FakePart(2, 3, n_in=5, n_out=3, labels=True, seed=seed + 2))


def batch(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + i)
    return rng.standard_normal((B, 3)).astype(np.float32), rng.integers(0, 3, B).astype(np.int64)


def u_step(bottom: FakePart, middle: Any, head: FakePart, i: int) -> float:
    return serve_util.u_step(bottom, middle, head, *batch(i))


def private_parts(seed: int = 0) -> tuple[FakePart, FakePart, FakePart]:
    bottom, _, head = u_parts(seed)
    return bottom, FakePart(1, 3, n_in=6, n_out=5, seed=seed + 1, private=True), head


def p_step(bottom: FakePart, middle: Any, head: FakePart, i: int, m: int = 3) -> float:
    return private_step(bottom, middle, head, *batch(i), np.random.default_rng(i), m)


def remote(server: Any, part: FakePart, client: str = "c0", **kw: Any) -> RemotePart:
    return RemotePart(server.url if isinstance(server, DroppingProxy) else server.url, client, part.info.split_id,
                      part.info.digest, timeout=5, **kw)


def same_state(a: FakePart, b: FakePart) -> bool:
    return a.trainer.steps == b.trainer.steps and all(
        np.array_equal(v, b.trainer.state_dict()[k]) for k, v in a.trainer.state_dict().items())


def test_wire_round_trip_and_refusals() -> None:
    t = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.array([1, -2], np.int64), "m": np.ones(3, bool)}
    meta, out = wire.decode(wire.encode({"step": 3}, t))
    assert meta == {"step": 3} and all(np.array_equal(out[k], t[k]) and out[k].dtype == t[k].dtype for k in t)
    data = wire.encode({}, {"x": t["x"]})
    for bad, why in [(data[:-1], "bytes of tensor data"), (b"XXXX" + data[4:], "not a pockprop"),
                     (data[:6], "too short")]:
        with pytest.raises(wire.WireError, match=why):
            wire.decode(bad)
    with pytest.raises(wire.WireError, match="cannot travel"):
        wire.encode({}, {"o": np.array([object()])})


def test_u_shaped_round_trip_equals_local() -> None:
    local, served = u_parts(), u_parts()
    with serving(served[1]) as server, remote(server, served[1]) as middle:
        losses = [u_step(served[0], middle, served[2], i) for i in range(3)]
        assert middle.next_step == 4 and len(middle.traffic) == 3
    assert losses == [u_step(*local, i) for i in range(3)]
    assert all(same_state(a, b) for a, b in zip(local, served))
    # the activation (4 x 6) goes up once, the output (4 x 5) down, its gradient up, the input gradient down
    floats = 4 * B * (6 + 5 + 5 + 6)
    sent, received = middle.traffic[-1]
    assert floats < sent + received < floats + 2000


def test_two_part_split_with_labels_on_the_server() -> None:
    def run(top: Any, bottom: FakePart) -> list[float | None]:
        out = []
        for i in range(3):
            x, y = batch(i)
            a = bottom.forward(x)
            g, loss = top.step(a, labels=y)
            bottom.step(x, grad_out=g)
            out.append(loss)
        return out

    local = FakePart(0, 2, 3, 6), FakePart(1, 2, 6, 3, labels=True)
    served = FakePart(0, 2, 3, 6), FakePart(1, 2, 6, 3, labels=True)
    with serving(served[1]) as server, remote(server, served[1]) as top:
        losses = run(top, served[0])
        assert losses == run(local[1], local[0]) and all(isinstance(v, float) for v in losses)
        assert same_state(local[1], served[1]) and same_state(local[0], served[0])
        with pytest.raises(RemoteError, match="labels: values must lie") as ex:
            top.step(served[0].forward(batch(0)[0]), labels=np.full(B, 7, np.int64))
        assert ex.value.status == 400 and same_state(local[1], served[1])
        _, loss = top.step(np.full((B, 6), 1e30, np.float32), labels=batch(0)[1])  # diverged: said, not refused
        assert loss is not None and not np.isfinite(loss)


def test_two_clients_interleaved() -> None:
    ref_mid, ref_a, ref_b = FakePart(1, 3, 6, 5, seed=1), u_parts(10), u_parts(20)
    mid, parts_a, parts_b = FakePart(1, 3, 6, 5, seed=1), u_parts(10), u_parts(20)

    def interleave(middle_a: Any, middle_b: Any, a: tuple, b: tuple) -> list[float]:
        losses = []
        for i in range(2):  # A's forward, B's forward, A's backward, B's backward: B's gradient sees A's update
            xa, ya = batch(i)
            xb, yb = batch(i + 50)
            act_a, act_b = a[0].forward(xa), b[0].forward(xb)
            ha, hb = middle_a.forward(act_a), middle_b.forward(act_b)
            for parts, middle, act, x, h, y in ((a, middle_a, act_a, xa, ha, ya), (b, middle_b, act_b, xb, hb, yb)):
                g2, loss = parts[2].step(h, labels=y)
                parts[0].step(x, grad_out=middle.step(act, grad_out=g2)[0])
                losses.append(loss)
        return losses

    with serving(mid) as server, remote(server, mid, "A") as ra, remote(server, mid, "B") as rb:
        got = interleave(ra, rb, parts_a, parts_b)
    assert got == interleave(ref_mid, ref_mid, ref_a, ref_b)
    assert same_state(mid, ref_mid) and mid.trainer.steps == 4


@pytest.mark.parametrize("path,private", [("/v1/backward", False), ("/v1/forward", False), ("/v1/vjp", True),
                                          ("/v1/apply", True)])
def test_a_lost_answer_is_retried_and_applied_once(path: str, private: bool) -> None:
    parts, step = (private_parts, p_step) if private else (u_parts, u_step)
    local, served = parts(), parts()
    with serving(served[1]) as server:
        proxy = DroppingProxy(server.server_address[1], path)
        try:
            with remote(proxy, served[1], retries=2, backoff=0.01) as middle:
                losses = [step(served[0], middle, served[2], i) for i in range(3)]
        finally:
            proxy.close()
    assert proxy.dropped == 1
    assert losses == [step(*local, i) for i in range(3)]
    assert same_state(local[1], served[1]) and served[1].trainer.steps == 3


def test_stale_and_skipped_steps_are_refused() -> None:
    parts = u_parts()
    with serving(parts[1]) as server, remote(server, parts[1]) as middle:
        for i in range(2):
            u_step(parts[0], middle, parts[2], i)
        before = parts[1].trainer.state_dict()
        a = parts[0].forward(batch(9)[0])
        status, doc = post(server.url, "backward", meta(parts[1], step=2), {"grad": np.ones((B, 5), np.float32)})
        assert (status, doc["code"]) == (409, "stale") and "applied with other tensors" in doc["error"]
        with remote(server, parts[1], start_step=1) as old, pytest.raises(RemoteError, match="not after its last"):
            old.step(a, grad_out=np.ones((B, 5), np.float32))
        with remote(server, parts[1], start_step=5) as ahead, pytest.raises(RemoteError, match="after step 2") as ex:
            ahead.step(a, grad_out=np.ones((B, 5), np.float32))
        assert ex.value.code == "gap"
        status, doc = post(server.url, "backward", meta(parts[1], step=3), {"grad": np.ones((B, 5), np.float32)})
        assert (status, doc["code"]) == (409, "no_forward")
        assert parts[1].trainer.steps == 2 and all(np.array_equal(v, parts[1].trainer.state_dict()[k])
                                                   for k, v in before.items())


def meta(part: FakePart, client: str = "c0", step: int = 1, **kw: Any) -> dict[str, Any]:
    return {"client": client, "split_id": part.info.split_id, "digest": part.info.digest, "step": step} | kw


@pytest.mark.parametrize("kind,fields,tensors,status,match", [
    ("step", {"digest": "0" * 64}, None, 409, "another compile"),
    ("step", {"split_id": "other"}, None, 409, "hosts part 1 of split"),
    ("step", {}, {"x": np.ones((B, 7), np.float32), "grad": np.ones((B, 5), np.float32)}, 400, "expected float32[4, 6]"),
    ("step", {}, {"x": np.ones((B, 6), np.float64), "grad": np.ones((B, 5), np.float32)}, 400, "got float64"),
    ("forward", {}, {"x": np.full((B, 6), np.nan, np.float32)}, 400, "NaN or Inf"),
    ("step", {}, {"x": np.ones((B, 6), np.float32)}, 400, "carries tensors"),
    ("step", {"step": 0}, None, 400, "integer >= 1"),
    ("step", {"lr": -1.0}, None, 400, "finite number > 0"),
    ("step", {"client": ""}, None, 400, "client id"),
    ("nothing", {}, None, 404, "no such exchange"),
])
def test_bad_requests_change_nothing(kind: str, fields: dict, tensors: Any, status: int, match: str) -> None:
    part = FakePart(1, 3, 6, 5)
    before = part.trainer.state_dict()
    good = {"x": np.ones((B, 6), np.float32), "grad": np.ones((B, 5), np.float32)}
    with serving(part) as server:
        got, doc = post(server.url, kind, meta(part) | fields, good if tensors is None else tensors)
        assert got == status and match in doc["error"] or pytest.fail(f"{got}: {doc}")
        assert "\n" not in doc["error"]
        with remote(server, part) as client:
            assert client.next_step == 1  # the refused request left no session behind
    assert part.trainer.steps == 0 and all(np.array_equal(v, part.trainer.state_dict()[k]) for k, v in before.items())


def test_malformed_oversized_and_silent_requests() -> None:
    part = FakePart(1, 3, 6, 5)
    with serving(part, timeout=0.3) as server:
        port = server.server_address[1]
        with socket.create_connection(("127.0.0.1", port)) as s:  # a body far over what a step needs: refused unread
            s.sendall(b"POST /v1/step HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
            assert b" 413 " in s.recv(4096).split(b"\r\n")[0]
        with socket.create_connection(("127.0.0.1", port)) as s:
            body = b"PPT1garbage"
            s.sendall(b"POST /v1/step HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            assert b" 400 " in s.recv(4096).split(b"\r\n")[0]
        with socket.create_connection(("127.0.0.1", port)) as s:  # silent mid-request: closed after the timeout
            s.sendall(b"POST /v1/step HTTP/1.1\r\n")
            s.settimeout(5)
            start = time.monotonic()
            assert s.recv(4096) == b"" and time.monotonic() - start < 3
    with pytest.raises(RemoteUnavailable, match="2 tries"):
        RemotePart(f"http://127.0.0.1:{port}", "c0", part.info.split_id, part.info.digest, timeout=1, retries=1,
                   backoff=0.01)
    with serving(part) as server, pytest.raises(RemoteError, match="expected split 'fake-split', digest 000") as ex:
        RemotePart(server.url, "c0", part.info.split_id, "0" * 64)
    assert ex.value.code == "mismatch"


def test_restart_from_checkpoint_continues_bit_for_bit(tmp_path: Path) -> None:
    local, served = u_parts(), u_parts()
    ref = [u_step(*local, i) for i in range(6)]
    ckpt = str(tmp_path / "ckpt")
    with serving(served[1], ckpt, every=1) as server, remote(server, served[1]) as middle:
        got = [u_step(served[0], middle, served[2], i) for i in range(3)]
        middle.forward(served[0].forward(batch(3)[0]))  # a forward in flight when the server dies
    # killed: a fresh process rebuilds its part from the artifact and resumes from the directory
    restarted = u_parts()[1]
    with serving(restarted, ckpt, every=1, resume=True) as server, remote(server, restarted) as middle:
        assert middle.next_step == 4 and restarted.trainer.steps == 3
        got += [u_step(served[0], middle, served[2], i) for i in range(3, 6)]
    assert got == ref and same_state(restarted, local[1])
    assert sorted(os.listdir(ckpt)) == [".lock", "gen-00000006", POINTER]


def test_a_server_behind_the_client_says_so(tmp_path: Path) -> None:
    parts = u_parts()
    ckpt = str(tmp_path / "ckpt")
    with serving(parts[1], ckpt, every=2) as server, remote(server, parts[1]) as middle:
        for i in range(3):
            u_step(parts[0], middle, parts[2], i)
    restarted = u_parts()[1]
    with serving(restarted, ckpt, every=2, resume=True) as server, remote(server, restarted, start_step=4) as middle:
        with pytest.raises(RemoteError, match="resume the client from its step 2") as ex:
            middle.forward(parts[0].forward(batch(3)[0]))
        assert ex.value.code == "gap" and restarted.trainer.steps == 2


def _start(art: str, ckpt: str, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.runtime.serve_child", "serve", art, "--port", "0",
                             "--checkpoint", ckpt, "--timeout", "5", *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert " on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line


def test_cli_serves_and_stops_on_sigterm_with_a_checkpoint(tmp_path: Path) -> None:
    local, parts = u_parts(), u_parts()
    art, ckpt = parts[1].save(str(tmp_path / "part1.json")), str(tmp_path / "ckpt")
    proc, line = _start(art, ckpt)
    try:
        with RemotePart(line.split(" on ")[1].split(",")[0].strip(), "c0", parts[1].info.split_id,
                        parts[1].info.digest, timeout=5) as middle:
            got = [u_step(parts[0], middle, parts[2], i) for i in range(2)]
            second = subprocess.run([sys.executable, "-m", "tests.runtime.serve_child", "serve", art, "--port", "0",
                                     "--checkpoint", ckpt], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert second.returncode == 2 and "in use by another" in second.stderr  # one server per directory
            start = time.monotonic()  # the client's kept-alive connection must not hold the stop for --timeout
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert time.monotonic() - start < 4
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0 and "stopped; checkpoint" in err and "(step 2)" in err, err
    proc, line = _start(art, ckpt)
    try:
        assert "resumed at step 2" in line
        with RemotePart(line.split(" on ")[1].split(",")[0].strip(), "c0", parts[1].info.split_id,
                        parts[1].info.digest, timeout=5) as middle:
            got.append(u_step(parts[0], middle, parts[2], 2))
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted: checkpoint" in err and "(step 3)" in err, err
    assert got == [u_step(*local, i) for i in range(3)]


def test_cli_refuses_bad_arguments_in_one_line(tmp_path: Path) -> None:
    art = FakePart(1, 3, 6, 5).save(str(tmp_path / "part1.json"))
    for args, match in [(["--checkpoint-every", "2"], "--checkpoint-every needs --checkpoint"),
                        (["--checkpoint", art], "exists and is not a folder")]:
        r = subprocess.run([sys.executable, "-m", "tests.runtime.serve_child", "serve", art, "--port", "0", *args],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("error", [RemoteError("http://h:1/v1/step: 409: client 'c0': step 2 ...", 409, "stale"),
                                   RemoteUnavailable("http://h:1/v1/step: no answer after 4 tries")])
def test_client_errors_are_one_line_exit_2(error: Exception, capsys: pytest.CaptureFixture[str]) -> None:
    def command(_: Any) -> int:
        raise error

    assert cli._dispatch(argparse.Namespace(func=command, json=False), "pockprop split-train") == 2
    assert capsys.readouterr().err == f"pockprop split-train: error: {error}\n"


def test_a_checkpoint_of_another_part_or_a_broken_one_is_refused(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    part = FakePart(1, 3, 6, 5)
    with serving(part, ckpt, save_on_stop=True):
        pass
    other = Host(FakePart(1, 3, 6, 5, seed=7), ckpt)
    try:
        with pytest.raises(CheckpointError, match="made for split 'fake-split', part digest"):
            other.resume()
    finally:
        other.close()
    (tmp_path / "ckpt" / POINTER).write_text('{"format": "pockprop-serve", "version": 1, "generation": "../x"}')
    host = Host(FakePart(1, 3, 6, 5), ckpt)
    try:
        with pytest.raises(CheckpointError, match="not a readable serve checkpoint"):
            host.resume()
    finally:
        host.close()


# -- private backpropagation (vjp, apply) and the input gradient declined --------------------------------------
def test_private_steps_equal_local_ones_and_the_plain_step() -> None:
    local, served = private_parts(), private_parts()
    with serving(served[1]) as server, remote(server, served[1]) as middle:
        assert middle._exchange("GET", "/v1/info", None)["private"] is True
        losses = [p_step(served[0], middle, served[2], i) for i in range(3)]
        sent, received = middle.traffic[-1]
        assert middle.next_step == 4 and len(middle.traffic) == 3
        (gin, grads), = middle.vjp(served[0].forward(batch(3)[0]), [np.ones((B, 5), np.float32)])  # x sent along
        assert gin.shape == (B, 6) and sorted(grads) == ["b", "w"] and grads["w"].shape == (6, 5)
        with pytest.raises(DataError, match="one or more output gradients"):
            middle.vjp(gin, [])
    assert losses == [p_step(*local, i) for i in range(3)]
    assert all(same_state(a, b) for a, b in zip(local, served))
    # m = 3: the activation (4 x 6) and three output gradients (4 x 5) up, then the parameter gradients (35);
    # the output (4 x 5), three input gradients (4 x 6) and three parameter gradient sets (35) down
    floats = 4 * (B * 6 + 3 * B * 5 + 35 + B * 5 + 3 * (B * 6 + 35))
    assert floats < sent + received < floats + 2500
    # unmasked (m = 1), vjp then apply is the plain step bit for bit; masked, up to rounding
    plain, masked, exact = u_parts(), private_parts(), private_parts()
    for i in range(3):
        u_step(*plain, i), p_step(*masked, i), p_step(*exact, i, m=1)
    assert all(same_state(a, b) for a, b in zip(plain, exact))
    for name, v in plain[1].trainer.state_dict().items():
        np.testing.assert_allclose(masked[1].trainer.state_dict()[name], v, rtol=1e-5, atol=1e-6)


def test_bad_private_requests_change_nothing() -> None:
    part = FakePart(1, 3, 6, 5, private=True)
    now = {"steps": 0, "state": part.trainer.state_dict()}  # what every refusal must leave as it was
    x, g = np.ones((B, 6), np.float32), np.ones((2, B, 5), np.float32)
    grads = {"param/w": np.ones((6, 5), np.float32), "param/b": np.ones(5, np.float32)}

    def refused(kind: str, tensors: dict[str, np.ndarray], code: str, match: str, step: int = 1, **kw: Any) -> None:
        status, doc = post(server.url, kind, meta(part, step=step, **kw), tensors)
        assert (status // 100, doc.get("code")) == (4, code) and match in doc["error"] or pytest.fail(f"{status}: {doc}")
        assert "\n" not in doc["error"] and part.trainer.steps == now["steps"]
        assert all(np.array_equal(v, part.trainer.state_dict()[k]) for k, v in now["state"].items())

    with serving(part) as server:
        refused("apply", grads, "no_vjp", "apply follows its vjp")
        refused("vjp", {"grad": g}, "no_forward", "no forward of step 1")
        refused("vjp", {"x": x, "grad": np.ones((17, B, 5), np.float32)}, "bad_tensor", "m (1 to 16)")
        refused("vjp", {"x": x, "grad": np.ones((B, 5), np.float32)}, "bad_tensor", "got float32[4, 5]")
        refused("vjp", {"x": x, "grad": np.full((2, B, 5), np.nan, np.float32)}, "bad_tensor", "NaN or Inf")
        refused("vjp", {"x": x, "grads": g}, "bad_tensor", "expected ['grad', 'x'] (x optional)")
        refused("forward", {"x": x}, "bad_request", "want_grad", want_grad=False)
        status, answer = post(server.url, "vjp", meta(part), {"x": x, "grad": g})
        assert status == 200 and answer[1]["param/w"].shape == (2, 6, 5) and answer[0]["vectors"] == 2
        assert post(server.url, "vjp", meta(part), {"x": x, "grad": g})[1][0]["replayed"]  # a retry: the same answer
        refused("vjp", {"x": x, "grad": 2 * g}, "stale", "answered for other tensors")
        refused("forward", {"x": x}, "vjp_answered", "its apply comes next")
        refused("step", {"x": x, "grad": g[0]}, "vjp_answered", "its apply comes next")
        refused("apply", grads | {"param/v": grads["param/b"]}, "bad_tensor", "carries tensors")
        refused("apply", {"param/w": grads["param/w"].T.copy(), "param/b": grads["param/b"]}, "bad_tensor",
                "expected float32[6, 5]")
        refused("apply", grads | {"param/b": np.full(5, np.inf, np.float32)}, "bad_tensor", "NaN or Inf")
        refused("apply", grads, "gap", "after step 0", step=2)
        assert post(server.url, "apply", meta(part), grads)[0] == 200 and part.trainer.steps == 1
        now = {"steps": 1, "state": part.trainer.state_dict()}
        assert post(server.url, "apply", meta(part), grads)[1][0]["replayed"]  # a retry: not applied again
        refused("apply", {k: 2 * v for k, v in grads.items()}, "stale", "applied with other tensors")
        refused("vjp", {"x": x, "grad": g}, "stale", "not after its last applied step")
    plain = FakePart(1, 3, 6, 5)
    with serving(plain) as server:
        status, doc = post(server.url, "vjp", meta(plain), {"x": x, "grad": g})
        assert (status, doc["code"]) == (409, "no_gradients") and "--private-backprop" in doc["error"]
        with remote(server, plain) as client, pytest.raises(RemoteError, match="no private backpropagation"):
            client.apply({"w": grads["param/w"], "b": grads["param/b"]})


def test_a_restart_between_vjp_and_apply_continues_bit_for_bit(tmp_path: Path) -> None:
    local, served = private_parts(), private_parts()
    ref = [p_step(*local, i) for i in range(4)]
    ckpt = str(tmp_path / "ckpt")
    with serving(served[1], ckpt, every=1, save_on_stop=True) as server, remote(server, served[1]) as middle:
        got = [p_step(served[0], middle, served[2], i) for i in range(2)]
        x, y = batch(2)  # step 3 up to its vjp; then the server stops (a checkpoint holds the vjp answer)
        a = served[0].forward(x)
        g, loss = served[2].step(middle.forward(a), labels=y)
        r = np.random.default_rng(2).standard_normal((2, *g.shape)).astype(g.dtype)
        (gin, p0), (rin, p1), _ = middle.vjp(a, [g + r[0], *r])
    restarted = FakePart(1, 3, 6, 5, seed=1, private=True)
    with serving(restarted, ckpt, every=1, resume=True) as server, remote(server, restarted) as middle:
        assert middle.next_step == 3 and restarted.trainer.steps == 2
        with pytest.raises(RemoteError, match="its apply comes next"):
            middle.forward(a)
        status, (m, again) = post(server.url, "vjp", meta(served[1], step=3), {"grad": np.stack([g + r[0], *r])})
        assert status == 200 and m["replayed"] and np.array_equal(again["grad"][1], rin)  # the very same request
        assert all(np.array_equal(again["param/" + k][0], v) for k, v in p0.items())
        middle.apply({k: p0[k] - p1[k] for k in p0})
        served[0].step(x, grad_out=gin - rin)
        got += [loss, p_step(served[0], middle, served[2], 3)]
    assert got == ref and same_state(restarted, local[1]) and same_state(served[0], local[0])


def test_a_declined_input_gradient_is_not_sent() -> None:
    local, served = u_parts(), u_parts()
    with serving(served[1]) as server, remote(server, served[1]) as middle:
        for i, want in enumerate((True, True, False, False)):  # backward (after a forward), then step (x sent)
            a, ref_a = served[0].forward(batch(i)[0]), local[0].forward(batch(i)[0])
            h = middle.forward(a) if i < 3 else served[1].forward(a)
            g2, _ = served[2].step(h, labels=batch(i)[1])
            ref_g2, _ = local[2].step(local[1].forward(ref_a), labels=batch(i)[1])
            got, _ = middle.step(a, grad_out=g2, want_grad=want)
            ref, _ = local[1].step(ref_a, grad_out=ref_g2, want_grad=want)
            assert (got is None) == (ref is None) == (not want) and (not want or np.array_equal(got, ref))
    assert same_state(local[1], served[1]) and served[1].trainer.steps == 4
    # the same exchanges but the input gradient (4 x 6 float32) and its entry in the JSON header
    assert 4 * B * 6 < middle.traffic[1][1] - middle.traffic[2][1] < 4 * B * 6 + 100
