"""`pockprop split-train` (runtime/split_cli.py): the device's side of a split from the command line."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from pockprop.cli import main
from pockprop.compiler.split import compile_local_head, compile_split, default_head, save_split
from pockprop.runtime.split import Part

from tests.runtime.serve_util import serving


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    arts = compile_split(model, torch.zeros(4, 8), ["1"], optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9})
    save_split(arts, str(d / "s"), local_head=compile_local_head(default_head((4, 6), 3), arts[0]))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 8)).astype(np.float32)
    np.savez(d / "train.npz", x=x, y=(x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0))
    return d


def test_trains_here_and_over_http_alike(split_dir, tmp_path, capsys):
    s, data = str(split_dir / "s"), str(split_dir / "train.npz")
    assert main(["split-train", s, "--data", data, "--epochs", "2", "--checkpoint", str(tmp_path / "a")]) == 0
    here = capsys.readouterr()
    with serving(Part.load(f"{s}/part1")) as server:
        assert main(["split-train", s, "--data", data, "--epochs", "2", "--server", server.url,
                     "--checkpoint", str(tmp_path / "b")]) == 0
    remote = capsys.readouterr()
    assert "trained 12 steps (12 with the server)" in here.out and here.err == remote.err  # the same losses
    a, b = Part.load(f"{s}/part0").trainer, Part.load(f"{s}/part0").trainer
    a.resume(str(tmp_path / "a" / "part0"))
    b.resume(str(tmp_path / "b" / "part0"))
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[k])


def test_local_loss_sends_less(split_dir, capsys):
    s, data = str(split_dir / "s"), str(split_dir / "train.npz")
    assert main(["split-train", s, "--data", data, "--epochs", "2", "--local-loss", "--send-every", "2",
                 "--prune-keep", "0.5"]) == 0
    out = capsys.readouterr().out
    # epoch 1 all 6 batches (3 sent), epoch 2 half of each class: 12 samples, 3 batches (1 or 2 sent)
    assert "trained 9 steps" in out and "received 0 bytes" in out


@pytest.mark.parametrize("extra, message", [
    (["--prune-keep", "0.5"], "apply with --local-loss"),
    (["--server", "http://127.0.0.1:9"], "127.0.0.1:9"),
])
def test_bad_input_is_one_line(split_dir, capsys, extra, message):
    code = main(["split-train", str(split_dir / "s"), "--data", str(split_dir / "train.npz"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1]
