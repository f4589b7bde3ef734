"""`pockprop fleet ARTIFACT`: federated fine-tuning of N virtual devices on Flower's simulation engine
(runtime.fleet's ClientApp and ServerApp under `flwr.simulation.run_simulation`), and its per-round table.

Each round's row: the clients sent to and those that replied, the bytes of the trainable tensors down
(server to clients) and up (the replies), the bytes had the whole model travelled both ways instead, and the
global tensors' accuracy and loss on the held-out data. fleet.json and fleet.md in --out are rewritten after
each round, so an interrupted run keeps the rounds it finished.

Ray runs the clients: one CPU and one onnxruntime thread each, --parallel of them at a time. Flower's and
Ray's logs are kept to errors, and Flower's telemetry is off unless the environment turns it on.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from typing import Any, Iterator

from pockprop import args as cli_args
from pockprop.artifact.durable import write_atomic
from pockprop.errors import TrainingFailed, UsageError
from pockprop.runtime import fleet
from pockprop.runtime.partition import KINDS, parse, partition
from pockprop.runtime.trainer import Trainer

TABLE_JSON, TABLE_MD = "fleet.json", "fleet.md"


@contextlib.contextmanager
def _quiet_flower() -> Iterator[Any]:
    """Flower's `run_simulation`, with its telemetry off (read when flwr is first imported) and its logs at
    errors only; Ray's PYTHONPATH change (its backend sets this process's, for the workers) undone afterwards."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # a FutureWarning at every ray.init
    try:
        from flwr.simulation import run_simulation
    except ImportError:
        raise UsageError("federated runs need Flower: pip install 'pockprop[fleet]'") from None
    pythonpath = os.environ.get("PYTHONPATH")
    logger = logging.getLogger("flwr")  # set to DEBUG by flwr's import: after it
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield run_simulation
    finally:
        logger.setLevel(level)
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath


def simulate(client: Any, server: fleet.ServerSettings, rounds: fleet.Rounds, parallel: int = 2) -> fleet.Rounds:
    """Run `server.clients` virtual devices of the ClientApp `client` (runtime.fleet.client_app) for
    `server.rounds` rounds; the measured rounds. What the ServerApp raises (a bad artifact or test set) is
    raised here; a client's error is a failed reply."""
    with _quiet_flower() as run_simulation:
        backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                   "init_args": {"num_cpus": parallel, "num_gpus": 0, "include_dashboard": False,
                                 "logging_level": logging.ERROR, "log_to_driver": False}}
        run_simulation(server_app=fleet.server_app(server, rounds), client_app=client,
                       num_supernodes=server.clients, backend_config=backend)
    if len(rounds.rows) != server.rounds + 1:
        raise UsageError(f"the simulation stopped after {max(len(rounds.rows) - 1, 0)} of {server.rounds} rounds "
                         "(Flower's log has the reason)")
    return rounds


def _cell(v: Any) -> str:
    return "-" if v is None else f"{v:,}" if isinstance(v, int) else f"{100 * v:.1f}%" if isinstance(v, float) else str(v)


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The rounds as a markdown table (accuracy in percent, bytes exact)."""
    lines = ["| round | clients | replies | bytes down | bytes up | bytes up+down | full model up+down | "
             "test accuracy | test loss |", "|" + "---:|" * 9]
    for r in rows:
        loss = "-" if r.get("loss") is None else f"{r['loss']:.4f}"
        lines.append(f"| {r['round']} | {r['clients']} | {r['replies']} | {_cell(r['bytes_down'])} | "
                     f"{_cell(r['bytes_up'])} | {_cell(r['bytes_down'] + r['bytes_up'])} | "
                     f"{_cell(r['bytes_full_model'])} | {_cell(r['accuracy'])} | {loss} |")
    return lines


def add_parser(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("fleet", help="federated fine-tuning of virtual devices on Flower (extra [fleet])",
                       description="Simulate a fleet with Flower's simulation engine: each client trains its shard "
                                   "of --data with the pockprop runtime and sends only the scheme's trainable "
                                   "tensors; Flower's FedAvg averages them (weighted by samples), the optimizer state "
                                   "stays on each client, and the global tensors are evaluated on --test after each "
                                   "round. Writes fleet.json and fleet.md (per round: clients, bytes down and up, "
                                   "bytes had the full model travelled, test accuracy) to --out. A real fleet runs "
                                   "the same apps on Flower's deployment engine: docs/federated.md.",
                       epilog="Exit codes: 0 done; 2 bad input (arguments, artifact, data, a partition that leaves a "
                              "client without data, Flower not installed); 3 a round in which no client trained (the first "
                              "client error is shown); 1 internal error.")
    f.add_argument("artifact", help="artifact directory or packed .pockprop file (every client and the server load it)")
    f.add_argument("--data", required=True, help="training data (.npz, .csv or image folder), cut into one shard "
                                                 "per client by --partition")
    f.add_argument("--test", required=True, help="held-out data the server evaluates the global tensors on")
    f.add_argument("--clients", type=cli_args.positive_int, default=20, help="virtual devices (all train each round)")
    f.add_argument("--rounds", type=cli_args.positive_int, default=5, help="federated rounds")
    f.add_argument("--local-epochs", type=cli_args.positive_int, default=1,
                   help="epochs each client trains on its shard per round")
    f.add_argument("--partition", default="iid", metavar="|".join(KINDS),
                   help="how --data is split: iid; dirichlet:ALPHA (label skew, smaller ALPHA = more skewed); "
                        "labels:K (K classes per client). Seeded; every client gets data")
    f.add_argument("--lr", type=cli_args.learning_rate, help="clients' learning rate (default: the artifact's)")
    f.add_argument("--seed", type=cli_args.seed, default=0, help="partition and shuffling seed")
    f.add_argument("--parallel", type=cli_args.positive_int, default=2,
                   help="clients trained at the same time (Ray CPUs; one onnxruntime thread each)")
    f.add_argument("--out", required=True, help="folder for fleet.json and fleet.md")
    f.add_argument("--no-progress", action="store_true", help="no line per round on stderr")
    cli_args.add_json_flag(f)
    f.set_defaults(func=fleet_command)


def fleet_command(args: argparse.Namespace) -> int:
    parse(args.partition)
    cli_args.check_output_dir(args.out, "--out")
    cli_args.check_not_inside(args.out, args.artifact, "--out")
    # everything a client or the server would refuse, refused here before Ray starts
    trainer = Trainer.load(args.artifact, threads=1)
    data, test = trainer.pipeline.load(args.data), trainer.pipeline.load(args.test)
    trainer.pipeline.check(data)
    trainer.pipeline.check(test)
    partition(trainer.pipeline.labels(data.y, data.source), args.clients, args.partition, args.seed)
    if not fleet.params(trainer):
        raise UsageError(f"{args.artifact}: the artifact trains no tensor; nothing would travel")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    head = {"artifact": args.artifact, "digest": trainer.digest, "data": args.data, "test": args.test,
            "clients": args.clients, "rounds": args.rounds, "local_epochs": args.local_epochs,
            "partition": args.partition, "lr": args.lr, "seed": args.seed,
            "trainable_tensors": [e.name for e in fleet.params(trainer)]}

    def on_row(row: dict[str, Any]) -> None:
        rows = rounds.rows
        write_atomic(os.path.join(args.out, TABLE_JSON), json.dumps(head | {"rounds_table": rows}, indent=1).encode())
        write_atomic(os.path.join(args.out, TABLE_MD), ("\n".join(table(rows)) + "\n").encode())
        if not args.no_progress:
            failed = f", {len(row['failures'])} failed: {row['failures'][0]}" if row["failures"] else ""
            what = "before training" if row["round"] == 0 else (
                f"round {row['round']}/{args.rounds}: {row['replies']}/{row['clients']} clients{failed}, "
                f"{row['bytes_down'] + row['bytes_up']:,} bytes")
            print(f"pockprop fleet: {what}, test accuracy {_cell(row['accuracy'])} ({time.perf_counter() - t0:.0f}s)",
                  file=sys.stderr, flush=True)

    rounds = fleet.Rounds(on_row=on_row)
    simulate(fleet.client_app(fleet.ClientSettings(args.artifact, args.data, args.partition, args.seed)),
             fleet.ServerSettings(args.artifact, args.test, args.rounds, args.clients, args.local_epochs, args.lr),
             rounds, parallel=args.parallel)
    dead = next((r for r in rounds.rows[1:] if r["replies"] == 0), None)
    if dead is not None:
        raise TrainingFailed(f"round {dead['round']}: no client trained; the first error: "
                             f"{dead['failures'][0] if dead['failures'] else 'none reported'}")
    last = rounds.rows[-1]
    if args.json:
        print(json.dumps({"ok": True, "out": args.out} | head | {"rounds_table": rounds.rows}))
    else:
        print("\n".join(table(rounds.rows)))
        print(f"wrote {os.path.join(args.out, TABLE_JSON)} and {TABLE_MD}; test accuracy "
              f"{_cell(rounds.rows[0]['accuracy'])} -> {_cell(last['accuracy'])} after {args.rounds} rounds")
    return 0
