"""Federated fine-tuning on Flower: a ClientApp that trains with the pockprop runtime, a ServerApp running
Flower's FedAvg over the scheme's trainable tensors (flwr, the `fleet` extra, imported inside the functions).

What travels: the artifact's `param` state entries only, by state name (a sliced parameter's slice, LoRA's A
and B, a soft prompt), as one ArrayRecord each way; never a frozen weight, never optimizer state. The reply
carries `num-examples` (the shard's size), FedAvg's weight. The averaging is Flower's.

What stays on the device: the optimizer state (momentum or AdamW slots and step), kept across rounds in
Flower's per-node `context.state` (an ArrayRecord beside a ConfigRecord with the last round and the step
count). That is Flower's own place for per-node state: the simulation engine keeps it per virtual node
between rounds, and a deployed SuperNode keeps it for the run, so neither engine needs a directory per
client. Each round starts from the artifact's state, with the node's kept optimizer state over it and the
global tensors over that: the global tensors replace the param entries only.

What a client refuses, before anything of its state changes: a message for another artifact (the manifest's
sha256, `Trainer.digest`), a tensor of the wrong shape or dtype, holding NaN/Inf, missing or unknown, and a
round not newer than its last one (a stale or replayed message). The error reaches the server as the reply's
error; FedAvg averages the other replies. The server likewise leaves out a reply that is not the artifact's
trainable tensors (`bad_reply`), so no client can corrupt the global tensors.

Deployment (`flwr run`): `pockprop.runtime.fleet:clientapp` and `:serverapp` read their settings from the run
config (`artifact`, `data`, `partition`, `seed`, `test`, `num-server-rounds`, `clients`, `local-epochs`, `lr`)
and the node config (`data`: the device's own data file; without it, `partition-id`/`num-partitions` cut
the run's `data`). docs/federated.md shows both engines.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from pockprop.artifact.contract import StateRole, StateSpec
from pockprop.errors import ArtifactError, DataError
from pockprop.runtime.data import Dataset
from pockprop.runtime.loop import fit
from pockprop.runtime.partition import partition
from pockprop.runtime.trainer import Trainer

if TYPE_CHECKING:  # flwr is an optional extra: imported where used
    from flwr.app import ArrayRecord, Context, Message
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"  # FedAvg's record keys (its defaults)
WEIGHT = "num-examples"  # FedAvg's weighted_by_key
OPTIMIZER, CLIENT = "pockprop.optimizer", "pockprop.client"  # the node's context.state records


def params(trainer: Trainer) -> list[StateSpec]:
    """The state entries that travel: the scheme's trainable tensors."""
    return [e for e in trainer.manifest.state if e.role == StateRole.PARAM]


def to_record(state: Mapping[str, np.ndarray], entries: list[StateSpec]) -> "ArrayRecord":
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({e.name: Array(np.ascontiguousarray(state[e.name])) for e in entries})


def tensor_bytes(record: "ArrayRecord") -> int:
    """The bytes of an ArrayRecord's tensors as Flower serializes them (each Array's data)."""
    return sum(len(a.data) for a in record.values())


def full_model_bytes(trainer: Trainer) -> int | None:
    """The bytes of every parameter of the model (float32 or the trainable tensors' dtype), had the whole
    model travelled instead of the trainable tensors; None if the manifest does not count them."""
    total = (trainer.manifest.trainable or {}).get("total")
    entries = params(trainer)
    itemsize = np.dtype(entries[0].dtype).itemsize if entries else 4
    return int(total) * itemsize if isinstance(total, int) else None


def check_arrays(entries: list[StateSpec], record: Any, where: str) -> dict[str, np.ndarray]:
    """The tensors of `record` (an ArrayRecord) as numpy, exactly the names of `entries` with their shapes
    and dtypes and finite values; DataError naming the first tensor that is not."""
    names = {e.name for e in entries}
    have = set(record.keys())
    if have - names:
        raise DataError(f"{where}: unknown tensors {sorted(have - names)} (not trainable tensors of this artifact)")
    if names - have:
        raise DataError(f"{where}: missing trainable tensors {sorted(names - have)}")
    out = {}
    for e in entries:
        try:
            a = record[e.name].numpy()
        except Exception as ex:  # noqa: BLE001 - Flower's deserialization raises several types; the data is bad
            raise DataError(f"{where}: tensor {e.name!r} cannot be read ({type(ex).__name__}: {ex})") from None
        if a.shape != e.shape or a.dtype.name != e.dtype:
            raise DataError(f"{where}: tensor {e.name!r} is {a.dtype}{list(a.shape)}, the artifact's is "
                            f"{e.dtype}{list(e.shape)}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise DataError(f"{where}: tensor {e.name!r} holds NaN or Inf")
        out[e.name] = a
    return out


@dataclass(frozen=True)
class Instructions:
    """What a train message asks of a client, once checked."""

    round: int
    params: dict[str, np.ndarray]
    epochs: int
    lr: float


def check_message(trainer: Trainer, content: Any, last_round: int) -> Instructions:
    """The checked instructions of a train message's content (a RecordDict) for this trainer's artifact;
    ArtifactError (another artifact) or DataError (stale round, bad tensors, bad config) otherwise."""
    config = content.config_records.get(CONFIG)
    record = content.array_records.get(ARRAYS)
    if config is None or record is None or len(content.array_records) != 1:
        raise DataError(f"the message must hold one ArrayRecord {ARRAYS!r} and a ConfigRecord {CONFIG!r}; it holds "
                        f"{sorted(content.array_records)} and {sorted(content.config_records)}")
    theirs = str(config.get("artifact", ""))
    if theirs != trainer.digest:
        raise ArtifactError(f"the server trains the artifact with manifest sha256 {theirs[:12] or '(none)'}..., this "
                            f"device holds {trainer.digest[:12]}... ({trainer.path}): refused")
    try:
        rnd, epochs, lr = int(config["server-round"]), int(config["local-epochs"]), float(config["lr"])
    except (KeyError, TypeError, ValueError) as ex:
        raise DataError(f"the message's config lacks a valid {ex} (server-round, local-epochs, lr)") from None
    if rnd <= last_round:
        raise DataError(f"round {rnd} is not newer than this client's last round {last_round}: a stale or replayed "
                        "message, refused")
    if epochs < 1 or not lr > 0:
        raise DataError(f"the message asks for {epochs} local epochs at lr {lr}: need >= 1 epoch and lr > 0")
    return Instructions(rnd, check_arrays(params(trainer), record, f"round {rnd}"), epochs, lr)


# -- the client ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientSettings:
    """Where a client's artifact and data are. `data` is cut into `num-partitions` shards by `partition`
    and `seed` (runtime.partition), the node taking shard `partition-id` (simulation); a node config
    `data` is the device's own file, used whole."""

    artifact: str
    data: str | None = None
    partition: str = "iid"
    seed: int = 0
    threads: int | None = 1

    @classmethod
    def from_config(cls, run_config: Mapping[str, Any]) -> "ClientSettings":
        if "artifact" not in run_config:
            raise DataError("the run config names no `artifact` (the path of the pockprop artifact on each device)")
        return cls(str(run_config["artifact"]), run_config.get("data"), str(run_config.get("partition", "iid")),
                   int(run_config.get("seed", 0)))


_TRAINERS: dict[tuple[str, int | None], tuple[Trainer, dict[str, np.ndarray]]] = {}  # per process: sessions reused
_SHARDS: dict[tuple[Any, ...], Dataset] = {}


def _trainer(path: str, threads: int | None) -> tuple[Trainer, dict[str, np.ndarray]]:
    """The process's Trainer of the artifact and the artifact's own state. One process serves many
    virtual nodes in turn, so a node's state lives in its context, never in the Trainer between messages."""
    key = (path, threads)
    if key not in _TRAINERS:
        trainer = Trainer.load(path, threads=threads)
        _TRAINERS[key] = trainer, trainer.state_dict()
    return _TRAINERS[key]


def shard(settings: ClientSettings, node_config: Mapping[str, Any], trainer: Trainer) -> Dataset:
    """This node's training data (see ClientSettings)."""
    own = node_config.get("data")
    key = (settings.data, own, settings.partition, settings.seed, node_config.get("partition-id"),
           node_config.get("num-partitions"), trainer.digest)
    if key in _SHARDS:
        return _SHARDS[key]
    if own is not None:
        ds = trainer.pipeline.load(str(own))
    elif settings.data is None or "partition-id" not in node_config:
        raise DataError("this node has no data: give the node config `data` (its own file), or the run config "
                        "`data` with the node's `partition-id` and `num-partitions`")
    else:
        full = trainer.pipeline.load(settings.data)
        trainer.pipeline.check(full)
        parts = partition(trainer.pipeline.labels(full.y, full.source), int(node_config["num-partitions"]),
                          settings.partition, settings.seed)
        k = int(node_config["partition-id"])
        ds = full.subset(parts[k], f"{full.source}[client {k} of {len(parts)}, {settings.partition}]")
    _SHARDS[key] = ds
    return ds


def train(settings: ClientSettings | None, msg: "Message", context: "Context") -> "Message":
    """A client's answer to a train message: its shard trained from the global tensors, the new trainable
    tensors with num-examples; the node's optimizer state and last round updated in `context.state` only
    after the round trained (any error before leaves them as they were)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    s = settings or ClientSettings.from_config(context.run_config)
    trainer, initial = _trainer(s.artifact, s.threads)
    meta = context.state.config_records.get(CLIENT)
    if meta is not None and meta.get("artifact") != trainer.digest:
        raise ArtifactError(f"this node's kept optimizer state belongs to another artifact "
                            f"(manifest sha256 {str(meta.get('artifact'))[:12]}...), not {trainer.path}")
    asked = check_message(trainer, msg.content, int(meta["round"]) if meta is not None else 0)
    data = shard(s, context.node_config, trainer)
    travel = {e.name for e in params(trainer)}
    kept = context.state.array_records.get(OPTIMIZER)
    local = {k: v.numpy() for k, v in kept.items()} if kept is not None else {}
    if set(local) - set(initial) or travel & set(local):
        raise ArtifactError(f"this node's kept optimizer state holds {sorted(local)}, not this artifact's slots")
    trainer.load_state(initial | local | asked.params)  # checks every tensor against the manifest
    trainer.steps = int(meta["steps"]) if meta is not None else 0
    trainer.progress, trainer.rounds, trainer.rejected = None, [], 0  # a fresh round for this node
    node = int(context.node_config.get("partition-id", context.node_id % 2**31))
    record = fit(trainer, data, asked.epochs, seed=(s.seed * 1_000_003 + asked.round * 7_919 + node) % 2**32,
                 last_batch="wrap", schedule={"name": "constant", "base_lr": asked.lr})
    new = trainer.state_dict()
    metrics = {WEIGHT: len(data), "steps": record["steps"], "rejected": record["rejected"]}
    losses = [v for v in record["epoch_losses"] if v is not None]
    if losses:
        metrics["train-loss"] = float(losses[-1])
    context.state[OPTIMIZER] = ArrayRecord({k: Array(v) for k, v in new.items() if k not in travel})
    context.state[CLIENT] = ConfigRecord({"round": asked.round, "steps": trainer.steps, "artifact": trainer.digest})
    reply = RecordDict({ARRAYS: to_record(new, params(trainer)), METRICS: MetricRecord(metrics)})
    return Message(reply, reply_to=msg)


def client_app(settings: ClientSettings | None = None) -> "ClientApp":
    """The ClientApp; without settings it reads them from the run config (deployment)."""
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(lambda msg, context: train(settings, msg, context))
    return app


# -- the server ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerSettings:
    """A federated run: the artifact and held-out data on the server, rounds, the clients each round waits for."""

    artifact: str
    test: str
    rounds: int
    clients: int
    local_epochs: int = 1
    lr: float | None = None  # default: the artifact's
    threads: int | None = None

    @classmethod
    def from_config(cls, c: Mapping[str, Any]) -> "ServerSettings":
        try:
            return cls(str(c["artifact"]), str(c["test"]), int(c["num-server-rounds"]), int(c.get("clients", 2)),
                       int(c.get("local-epochs", 1)), float(c["lr"]) if "lr" in c else None)
        except KeyError as ex:
            raise DataError(f"the run config lacks {ex} (artifact, test, num-server-rounds)") from None


@dataclass
class Rounds:
    """What a run measured, one row per round (round 0: the artifact before training); `replies` keeps what
    each client returned (node id, num-examples, tensors) and `globals` the aggregated tensors, when asked."""

    keep_tensors: bool = False
    on_row: Callable[[dict[str, Any]], None] | None = None
    full_bytes: int | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    replies: dict[int, list[tuple[int, float, dict[str, np.ndarray]]]] = field(default_factory=dict)
    globals: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    _now: dict[str, Any] = field(default_factory=dict)

    def sent(self, messages: list["Message"]) -> None:
        self._now = {"clients": len(messages), "bytes_down": sum(tensor_bytes(m.content[ARRAYS]) for m in messages)}

    def received(self, rnd: int, kept: list["Message"], failures: list[str], bytes_up: int) -> None:
        self._now |= {"replies": len(kept), "failures": failures, "bytes_up": bytes_up}
        if self.keep_tensors:
            self.replies[rnd] = [(m.metadata.src_node_id, float(m.content[METRICS][WEIGHT]),
                                  {k: v.numpy() for k, v in m.content[ARRAYS].items()}) for m in kept]

    def evaluated(self, rnd: int, arrays: dict[str, np.ndarray], metrics: dict[str, Any]) -> None:
        row = {"round": rnd, "clients": 0, "replies": 0, "failures": [], "bytes_up": 0, "bytes_down": 0} | self._now
        full = None if self.full_bytes is None else self.full_bytes * (row["clients"] + row["replies"])
        row |= {"bytes_full_model": full, "accuracy": metrics.get("accuracy"), "loss": metrics.get("loss")}
        self._now = {}
        self.rows.append(row)
        if self.keep_tensors:
            self.globals[rnd] = {k: v.copy() for k, v in arrays.items()}
        if self.on_row:
            self.on_row(row)


def bad_reply(entries: list[StateSpec], content: Any) -> str | None:
    """Why a client's reply must not be averaged (its tensors as check_arrays wants them, one ArrayRecord, a
    positive num-examples), or None."""
    metrics = content.metric_records.get(METRICS)
    weight = metrics.get(WEIGHT) if metrics is not None else None
    if not isinstance(weight, (int, float)) or not weight > 0:
        return f"the reply's {METRICS!r} record has no positive {WEIGHT!r}"
    if len(content.array_records) != 1 or ARRAYS not in content.array_records:
        return f"the reply holds ArrayRecords {sorted(content.array_records)}, not one {ARRAYS!r}"
    try:
        check_arrays(entries, content.array_records[ARRAYS], "the reply")
    except DataError as ex:
        return str(ex)
    return None


def _fedavg(rounds: Rounds, entries: list[StateSpec], **kwargs: Any) -> Any:
    """Flower's FedAvg, watched: what each round sends and receives is measured, and a reply that is not the
    artifact's trainable tensors (bad_reply) is left out as a failure, so no client can corrupt the global
    tensors; the averaging is FedAvg's."""
    from flwr.serverapp.strategy import FedAvg

    class Watched(FedAvg):
        def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
            messages = list(super().configure_train(server_round, arrays, config, grid))
            rounds.sent(messages)
            return messages

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            kept, failures, up = [], [], 0
            for m in replies:
                if not m.has_error():
                    up += sum(tensor_bytes(r) for r in m.content.array_records.values())
                why = m.error.reason if m.has_error() else bad_reply(entries, m.content)
                if why is None:
                    kept.append(m)
                else:
                    failures.append(f"node {m.metadata.src_node_id}: {' '.join(why.split())}")  # one line
            rounds.received(server_round, kept, failures, up)
            return super().aggregate_train(server_round, kept)

    return Watched(**kwargs)


def serve(s: ServerSettings, grid: Any, rounds: Rounds) -> Rounds:
    """Run FedAvg over the artifact's trainable tensors for `s.rounds` rounds, evaluating the global tensors
    on `s.test` before the first round and after each (a server-side Trainer)."""
    from flwr.app import ConfigRecord, MetricRecord

    trainer = Trainer.load(s.artifact, threads=s.threads)
    test = trainer.pipeline.load(s.test)
    trainer.pipeline.check(test)
    initial, entries = trainer.state_dict(), params(trainer)
    rounds.full_bytes = full_model_bytes(trainer)

    def evaluate(rnd: int, record: Any) -> Any:
        tensors = check_arrays(entries, record, f"the global tensors of round {rnd}")
        trainer.load_state(initial | tensors)
        m = trainer.evaluate(test)
        rounds.evaluated(rnd, tensors, m)
        return MetricRecord({k: float(v) for k, v in m.items() if k in ("accuracy", "loss")})

    lr = s.lr if s.lr is not None else float(trainer.manifest.lr.initial)
    strategy = _fedavg(rounds, entries, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=s.clients,
                       min_available_nodes=s.clients)
    config = ConfigRecord({"artifact": trainer.digest, "local-epochs": s.local_epochs, "lr": lr})
    strategy.start(grid=grid, initial_arrays=to_record(initial, entries), num_rounds=s.rounds, train_config=config,
                   evaluate_fn=evaluate)
    return rounds


def server_app(settings: ServerSettings | None = None, rounds: Rounds | None = None) -> "ServerApp":
    """The ServerApp; without settings it reads them from the run config (deployment)."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        serve(settings or ServerSettings.from_config(context.run_config), grid, rounds or Rounds())

    return app


def __getattr__(name: str) -> Any:
    """`clientapp` and `serverapp` for Flower's deployment engine (`flwr run`), made on first access so that
    importing this module needs no flwr."""
    if name == "clientapp":
        return client_app()
    if name == "serverapp":
        return server_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
