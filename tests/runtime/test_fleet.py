"""Federated fine-tuning on Flower (runtime/fleet.py, runtime/simulate.py, runtime/partition.py): FedAvg's global
tensors against the weighted mean of what the clients returned, what travels, the optimizer state kept on the
client, the messages a client refuses (its state unchanged), the partitions, and `pockprop fleet` end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported
pytest.importorskip("flwr")
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402

from pockprop.artifact.contract import StateRole  # noqa: E402
from pockprop.errors import ArtifactError, DataError  # noqa: E402
from pockprop.runtime import fleet, partition as parts  # noqa: E402
from pockprop.runtime.simulate import simulate  # noqa: E402
from pockprop.runtime.trainer import Trainer  # noqa: E402
from tests.runtime.conftest import ROOT, dataset_npz  # noqa: E402


@pytest.fixture
def setup(artifact: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
          ) -> tuple[fleet.ClientSettings, Trainer]:
    """The sliced artifact (a half-sliced weight, momentum SGD), 60 training samples for 3 clients."""
    art = str(artifact("sliced"))
    data = str(dataset_npz(tmp_path / "train.npz", n=60, seed=0))
    from flwr.supercore.task_identity import TaskIdentity  # a Message is made by a task of a run: as the server's

    for key in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, key, getattr(TaskIdentity, key) or 1)
    return fleet.ClientSettings(art, data, "dirichlet:0.5", seed=3), Trainer.load(art)


def _message(trainer: Trainer, tensors: dict[str, np.ndarray], rnd: int, **config: Any) -> Message:
    c = {"server-round": rnd, "artifact": trainer.digest, "local-epochs": 1, "lr": 0.1} | config
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in tensors.items()}), "config": ConfigRecord(c)})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _context(partition_id: int = 0) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition_id, "num-partitions": 3},
                   state=RecordDict(), run_config={})


def _params(trainer: Trainer) -> dict[str, np.ndarray]:
    names = {e.name for e in fleet.params(trainer)}
    return {k: v for k, v in trainer.state_dict().items() if k in names}


def _snapshot(ctx: Context) -> dict[str, Any]:
    arrays = {n: {k: v.numpy().copy() for k, v in r.items()} for n, r in ctx.state.array_records.items()}
    return {"arrays": arrays, "config": {n: dict(r) for n, r in ctx.state.config_records.items()}}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["config"] == b["config"] and a["arrays"].keys() == b["arrays"].keys() and all(
        a["arrays"][n].keys() == b["arrays"][n].keys()
        and all(np.array_equal(a["arrays"][n][k], b["arrays"][n][k]) for k in a["arrays"][n]) for n in a["arrays"])


def test_only_trainable_tensors_travel_and_optimizer_state_stays(setup: tuple[fleet.ClientSettings, Trainer]) -> None:
    settings, trainer = setup
    entries = fleet.params(trainer)
    assert any(e.slice is not None for e in entries)  # a slice travels as the slice, not its whole weight
    ctx = _context()
    reply = fleet.client_app(settings)(_message(trainer, _params(trainer), 1), ctx)
    sent = reply.content["arrays"]
    assert {k: v.numpy().shape for k, v in sent.items()} == {e.name: e.shape for e in entries}
    slots = {e.name for e in trainer.manifest.state if e.role != StateRole.PARAM}
    assert slots and not slots & set(sent)  # momentum never travels ...
    kept = {k: v.numpy() for k, v in ctx.state["pockprop.optimizer"].items()}
    assert set(kept) == slots and all(np.abs(v).max() > 0 for v in kept.values())  # ... it stays, nonzero
    assert reply.content["metrics"]["num-examples"] == len(fleet.shard(settings, ctx.node_config, trainer))

    # round 2 starts from the kept momentum: the same global tensors from a fresh context train differently
    globals_ = {k: v.numpy() for k, v in sent.items()}
    warm = fleet.train(settings, _message(trainer, globals_, 2), ctx).content["arrays"]
    cold = fleet.train(settings, _message(trainer, globals_, 2), _context()).content["arrays"]
    assert any(not np.allclose(warm[k].numpy(), cold[k].numpy()) for k in globals_)
    assert ctx.state["pockprop.client"]["round"] == 2


def test_deployment_apps_take_their_settings_from_the_run_and_node_config(
        setup: tuple[fleet.ClientSettings, Trainer], tmp_path: Path) -> None:
    settings, trainer = setup  # `flwr run` loads pockprop.runtime.fleet:clientapp / :serverapp
    assert type(fleet.clientapp).__name__ == "ClientApp" and type(fleet.serverapp).__name__ == "ServerApp"
    own = dataset_npz(tmp_path / "device.npz", n=10, seed=5)  # a device's own data file (node config `data`)
    ctx = Context(run_id=1, node_id=9, node_config={"data": str(own)}, state=RecordDict(),
                  run_config={"artifact": settings.artifact})
    reply = fleet.clientapp(_message(trainer, _params(trainer), 1), ctx)
    assert reply.content["metrics"]["num-examples"] == 10
    with pytest.raises(DataError, match="no `artifact`"):
        fleet.train(None, _message(trainer, _params(trainer), 2), _context())
    with pytest.raises(DataError, match="num-server-rounds"):
        fleet.ServerSettings.from_config({"artifact": settings.artifact, "test": str(own)})


def _bad_messages(trainer: Trainer, good: dict[str, np.ndarray]) -> list[tuple[str, Message, type, str]]:
    name = next(iter(good))
    wrong_shape = good | {name: np.zeros(tuple(d + 1 for d in good[name].shape), np.float32)}
    nan = good | {name: np.full_like(good[name], np.nan)}
    return [
        ("digest", _message(trainer, good, 5, artifact="0" * 64), ArtifactError, "this device holds"),
        ("shape", _message(trainer, wrong_shape, 5), DataError, f"tensor {name!r} is float32"),
        ("dtype", _message(trainer, good | {name: good[name].astype(np.float64)}, 5), DataError, "float64"),
        ("missing", _message(trainer, {k: v for k, v in good.items() if k != name}, 5), DataError, "missing"),
        ("unknown", _message(trainer, good | {"0.weight": np.zeros((8, 6), np.float32)}, 5), DataError, "unknown"),
        ("nan", _message(trainer, nan, 5), DataError, "NaN"),
        ("stale", _message(trainer, good, 1), DataError, "not newer than this client's last round 1"),
        ("replayed", _message(trainer, good, 0), DataError, "stale or replayed"),
    ]


def test_bad_messages_are_refused_and_leave_the_client_unchanged(setup: tuple[fleet.ClientSettings, Trainer]) -> None:
    settings, trainer = setup
    ctx = _context(1)
    good = _params(trainer)
    fleet.train(settings, _message(trainer, good, 1), ctx)
    before = _snapshot(ctx)
    for what, msg, error, text in _bad_messages(trainer, good):
        with pytest.raises(error, match=text) as ex:
            fleet.train(settings, msg, ctx)
        assert "\n" not in str(ex.value), what
        assert _same(_snapshot(ctx), before), what
    # and the client goes on: the next round is accepted
    assert fleet.train(settings, _message(trainer, good, 2), ctx).content["metrics"]["num-examples"] > 0


def _faulty_clients(settings: fleet.ClientSettings) -> Any:
    """The fleet's ClientApp, but client 0's connection drops in the middle of round 1 (a step has run when
    the error comes), and client 1 replies to round 2 with a tensor of the wrong shape (a buggy device)."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node, rnd = context.node_config["partition-id"], msg.content["config"]["server-round"]
        if (node, rnd) == (1, 2):
            reply = fleet.train(settings, msg, context)
            name = next(iter(reply.content["arrays"]))
            reply.content["arrays"][name] = Array(np.zeros((1, 2), np.float32))
            return reply
        if (node, rnd) != (0, 1):
            return fleet.train(settings, msg, context)
        step = Trainer.step

        def step_then_drop(self: Trainer, *args: Any, **kwargs: Any) -> Any:
            step(self, *args, **kwargs)
            raise ConnectionError("the device's connection dropped mid-step")

        Trainer.step = step_then_drop  # type: ignore[method-assign]
        try:
            return fleet.train(settings, msg, context)
        finally:
            Trainer.step = step  # type: ignore[method-assign]

    return app


def test_fedavg_global_is_the_weighted_mean_of_the_good_replies(setup: tuple[fleet.ClientSettings, Trainer],
                                                           tmp_path: Path) -> None:
    settings, trainer = setup
    test = str(dataset_npz(tmp_path / "test.npz", n=24, seed=1))
    server = fleet.ServerSettings(settings.artifact, test, rounds=2, clients=3, local_epochs=1, lr=0.05)
    rounds = simulate(_faulty_clients(settings), server, fleet.Rounds(keep_tensors=True), parallel=2)
    names = {e.name for e in fleet.params(trainer)}
    labels = np.load(settings.data)["y"]
    sizes = [len(p) for p in parts.partition(labels, 3, settings.partition, settings.seed)]
    # client 0 dropped mid-step in round 1, client 1 sent a bad tensor in round 2: each left out of FedAvg
    # (the global tensors are the others' weighted mean), its failure on the round's record
    assert len(rounds.rows[1]["failures"]) == 1 and "dropped mid-step" in rounds.rows[1]["failures"][0]
    assert len(rounds.rows[2]["failures"]) == 1 and "float32[1, 2]" in rounds.rows[2]["failures"][0]
    for rnd, want in ((1, sorted(sizes[1:])), (2, sorted([sizes[0], sizes[2]]))):
        replies = rounds.replies[rnd]
        assert sorted(w for _, w, _ in replies) == want
        assert all(set(t) == names for _, _, t in replies)  # only the trainable tensors came back
        total = sum(w for _, w, _ in replies)
        for k in names:
            mean = sum(w * t[k].astype(np.float64) for _, w, t in replies) / total
            np.testing.assert_allclose(rounds.globals[rnd][k], mean, rtol=1e-5, atol=1e-6)
        assert not all(np.allclose(rounds.globals[rnd][k], rounds.globals[rnd - 1][k]) for k in names)
        row = rounds.rows[rnd]
        up = sum(len(Array(t[k]).data) for _, _, t in replies for k in t)
        assert (row["clients"], row["replies"]) == (3, len(want)) and row["bytes_up"] >= up
        assert row["bytes_up"] == up or rnd == 2  # round 2's bad reply travelled too
        assert row["bytes_down"] == 3 * sum(len(Array(v).data) for v in rounds.globals[rnd - 1].values())
        assert 0 <= row["accuracy"] <= 1 and row["bytes_full_model"] == (3 + len(want)) * 4 * trainer.manifest.trainable["total"]


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.1", "dirichlet:100", "labels:1", "labels:2"])
def test_partitions_cover_every_sample_once_and_every_client(spec: str) -> None:
    y = np.random.default_rng(0).integers(0, 5, 97)
    shards = parts.partition(y, 12, spec, seed=4)
    assert len(shards) == 12 and all(len(s) for s in shards)
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(97))
    assert all(np.array_equal(a, b) for a, b in zip(shards, parts.partition(y, 12, spec, seed=4)))
    if spec.startswith("labels:"):  # a client holds K classes, or one more sample given to fill it
        k = int(spec.split(":")[1])
        assert all(len(np.unique(y[s])) <= k or len(s) == 1 for s in shards)


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    y = np.repeat(np.arange(10), 50)

    def classes(spec: str) -> float:
        return float(np.mean([len(np.unique(y[s])) for s in parts.partition(y, 20, spec, seed=0)]))

    assert classes("dirichlet:0.05") < classes("dirichlet:1") < classes("iid")


@pytest.mark.parametrize("spec,error", [("dirichlet:0", "expected one of"), ("labels:1.5", "expected one of"),
                                        ("noniid", "expected one of"), ("labels:1", "must cover every class")])
def test_bad_partitions(spec: str, error: str) -> None:
    with pytest.raises(Exception, match=error):
        parts.partition(np.arange(40) % 5, 3, spec, seed=0)


def _fleet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pockprop", "fleet", *args], cwd=ROOT, capture_output=True, text=True,
                          env=os.environ | {"FLWR_TELEMETRY_ENABLED": "0"}, timeout=240)


def test_cli_runs_a_fleet_and_writes_its_table(artifact: Callable[[str], Path], tmp_path: Path) -> None:
    art = str(artifact("mlp"))
    train, test = dataset_npz(tmp_path / "train.npz", n=48, seed=0), dataset_npz(tmp_path / "test.npz", n=24, seed=1)
    out = tmp_path / "out"
    common = [art, "--data", str(train), "--test", str(test), "--out", str(out)]
    r = _fleet(*common, "--clients", "4", "--rounds", "2", "--partition", "labels:2", "--lr", "0.1", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert [ln for ln in r.stderr.splitlines() if "round 2/2: 4/4 clients" in ln]
    doc = json.loads((out / "fleet.json").read_text())
    rows = doc["rounds_table"]
    assert [row["round"] for row in rows] == [0, 1, 2] and doc["trainable_tensors"] == ["2.weight", "2.bias"]
    assert all(row["replies"] == 4 and row["bytes_up"] > 0 and row["failures"] == [] for row in rows[1:])
    assert (out / "fleet.md").read_text().count("\n") == 5 and "| 2 | 4 | 4 |" in r.stdout

    for bad, text in ((["--partition", "dirichlet:-1"], "--partition"), (["--clients", "100"], "100 clients"),
                      (["--test", str(tmp_path / "none.npz")], "none.npz")):
        r = _fleet(*common, *bad)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and text in r.stderr, r.stderr
