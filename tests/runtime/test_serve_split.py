"""`pockprop serve` with real compiled parts (compiler/split.py, runtime/split.py): a U-shaped split trained
over loopback equals the same split trained in one process bit for bit, through a server killed and restarted,
with plain steps and with private backpropagation (vjp, apply)."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pockprop.runtime.remote import RemotePart
from pockprop.runtime.split import Part, SplitModel
from tests.runtime.serve_util import private_step, serving, u_step

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    from pockprop.compiler.split import compile_split, save_split

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3))
    out = tmp_path_factory.mktemp("split") / "mlp"
    save_split(compile_split(model, (torch.randn(4, 6),), ["1", "3"], labels=torch.tensor([0, 1, 2, 0]),
                             optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}, private=True), str(out))
    return out


def batches(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((4, 6)).astype(np.float32), rng.integers(0, 3, 4).astype(np.int64)) for _ in range(n)]


def client_parts(split_dir: Path) -> tuple[Part, Part]:
    return Part.load(str(split_dir / "part0")), Part.load(str(split_dir / "part2"))


def test_remote_middle_equals_the_local_split(split_dir: Path) -> None:
    local = SplitModel.load(str(split_dir))
    want = [local.step(x, y) for x, y in batches(3)]
    bottom, head = client_parts(split_dir)
    middle = Part.load(str(split_dir / "part1"))
    with serving(middle) as server, RemotePart(server.url, "dev0", middle.info.split_id, middle.info.digest) as r:
        assert r.info.boundary_in == middle.info.boundary_in and r.info.boundary_out == middle.info.boundary_out
        remote = SplitModel([bottom, r, head])  # the loop of a local split, a remote part in it
        got = [remote.step(x, y) for x, y in batches(3)]
        sent, received = r.traffic[-1]
    assert got == want
    for mine, theirs in zip((bottom, middle, head), local.parts):
        state = theirs.trainer.state_dict()
        assert all(np.array_equal(v, state[k]) for k, v in mine.trainer.state_dict().items())
    assert 4 * 4 * (8 + 8 + 8 + 8) < sent + received < 4 * 4 * 32 + 2000  # a and h up and down, with their grads


def same_states(mine: list[Part], theirs: list[Part]) -> bool:
    return all(a.trainer.steps == b.trainer.steps and all(np.array_equal(v, b.trainer.state_dict()[k])
                                                          for k, v in a.trainer.state_dict().items())
               for a, b in zip(mine, theirs))


def test_private_backprop_over_the_network_equals_local(split_dir: Path) -> None:
    local = SplitModel.load(str(split_dir))
    want = [private_step(*local.parts, x, y, np.random.default_rng(i)) for i, (x, y) in enumerate(batches(3))]
    bottom, head = client_parts(split_dir)
    middle = Part.load(str(split_dir / "part1"))
    with serving(middle) as server, RemotePart(server.url, "dev0", middle.info.split_id, middle.info.digest) as r:
        got = [private_step(bottom, r, head, x, y, np.random.default_rng(i)) for i, (x, y) in enumerate(batches(3))]
        sent, received = r.traffic[-1]
    assert got == want and same_states([bottom, middle, head], local.parts)
    plain = SplitModel.load(str(split_dir))  # the plain step, up to the rounding of the masks
    assert np.allclose(want, [plain.step(x, y) for x, y in batches(3)], rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(local.parts, plain.parts):
        for k, v in theirs.trainer.state_dict().items():
            np.testing.assert_allclose(mine.trainer.state_dict()[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    # m = 3, a and h 4 x 8: a up; h down; 3 output gradients up; 3 input gradients and 3 x 72 parameter
    # gradients down; 72 combined parameter gradients up
    floats = 4 * 8 + 4 * 8 + 3 * 4 * 8 + 3 * (4 * 8 + 72) + 72
    assert 4 * floats < sent + received < 4 * floats + 2500


def test_private_backprop_through_a_restart_between_vjp_and_apply(split_dir: Path, tmp_path: Path) -> None:
    local = SplitModel.load(str(split_dir))
    data = batches(3)
    want = [private_step(*local.parts, x, y, np.random.default_rng(i)) for i, (x, y) in enumerate(data)]
    bottom, head = client_parts(split_dir)
    middle = Part.load(str(split_dir / "part1"))
    ckpt = str(tmp_path / "ckpt")
    info = middle.info
    with serving(middle, ckpt, every=1, save_on_stop=True) as server, \
            RemotePart(server.url, "dev0", info.split_id, info.digest) as r:
        got = [private_step(bottom, r, head, *data[0], np.random.default_rng(0))]
        (x, y), rng = data[1], np.random.default_rng(1)  # the second step, up to its vjp: then a stop
        a = bottom.forward(x)
        g, loss = head.step(r.forward(a), labels=y)
        z = rng.standard_normal((2, *g.shape)).astype(g.dtype)
        (gin, p0), (rin, p1), _ = r.vjp(a, [g + z[0], *z])
    middle = Part.load(str(split_dir / "part1"))  # a fresh process: the artifact, then the checkpoint
    with serving(middle, ckpt, every=1, resume=True) as server, \
            RemotePart(server.url, "dev0", info.split_id, info.digest) as r:
        assert r.next_step == 2 and middle.trainer.steps == 1
        r.apply({k: p0[k] - p1[k] for k in p0})
        bottom.step(x, grad_out=gin - rin)
        got += [loss, private_step(bottom, r, head, *data[2], np.random.default_rng(2))]
    assert got == want and same_states([bottom, middle, head], local.parts)


def test_a_declined_input_gradient_on_a_real_part(split_dir: Path) -> None:
    (x, y), = batches(1)
    local, served = Part.load(str(split_dir / "part2")), Part.load(str(split_dir / "part2"))
    h = np.random.default_rng(5).standard_normal((4, 8)).astype(np.float32)
    assert local.step(h, labels=y, want_grad=False)[0] is None
    with serving(served) as server, RemotePart(server.url, "dev0", served.info.split_id, served.info.digest) as r:
        grad, loss = r.step(h, labels=y, want_grad=False)  # the local-loss mode: nothing to wait for
    assert grad is None and loss is not None and same_states([served], [local])


def _serve(split_dir: Path, ckpt: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "pockprop", "serve", str(split_dir / "part1"), "--port", "0",
                             "--checkpoint", str(ckpt), "--checkpoint-every", "1"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " on http://" not in line:
        proc.kill()
        pytest.fail(f"no startup line: {line!r} {proc.communicate()[1]}")
    return proc, line.split(" on ")[1].split(",")[0].strip()


def test_cli_serves_a_part_through_a_restart(split_dir: Path, tmp_path: Path) -> None:
    local = SplitModel.load(str(split_dir))
    want = [local.step(x, y) for x, y in batches(3)]
    bottom, head = client_parts(split_dir)
    info = Part.load(str(split_dir / "part1")).info
    got = []
    for run in range(2):  # two steps, killed (-9); restarted from the checkpoint, the third step, SIGTERM
        proc, url = _serve(split_dir, tmp_path / "ckpt")
        try:
            with RemotePart(url, "dev0", info.split_id, info.digest) as r:
                assert r.next_step == 1 + 2 * run
                got += [u_step(bottom, r, head, x, y) for x, y in batches(3)[2 * run:2 + run]]
        finally:
            proc.send_signal(signal.SIGTERM if run else signal.SIGKILL)
            _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "(step 3)" in err, err
    assert got == want


@pytest.mark.parametrize("part,message", [("part0", "takes the raw data"), ("nothing", "nothing")])
def test_cli_refuses_a_part_it_cannot_serve(split_dir: Path, part: str, message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pockprop", "serve", str(split_dir / part), "--port", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
