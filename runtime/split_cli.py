"""`pockprop split-train`: the device's side of split training, from the command line (runtime/split_train.py).

The device loads the parts it holds from the split directory (split.json says which) and reaches the
server's part at `--server URL` (`pockprop serve`); without `--server` the server's part is loaded from the
same directory, in this process: a dry run of the whole split on one machine. Data is read and preprocessed
as `pockprop train` does, by the first part's manifest; labels are checked by the part that holds the loss.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

from pockprop import args as cli_args
from pockprop.errors import EXIT_OK, DataError, UsageError
from pockprop.runtime.loop import model_inputs
from pockprop.runtime.schedule import Schedule
from pockprop.runtime.split import Part, load_index
from pockprop.runtime.split_train import fit


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("split-train", help="train the device's parts of a split model, the server's over HTTP",
                       description="Train a split compile (`pockprop compile --split-at`) from the device: its parts "
                                   "run here, the server's part at --server (`pockprop serve`), or here too without "
                                   "it. docs/split.md.")
    p.add_argument("split", help="the split directory (with split.json)")
    p.add_argument("--data", required=True, help="training data: .npz (x, y), CSV or image folder, as `pockprop train`")
    p.add_argument("--server", metavar="URL", help="the server's part, e.g. http://127.0.0.1:8080 (none: run it here)")
    p.add_argument("--client-id", default="device", help="this device's name on the server")
    p.add_argument("--epochs", type=cli_args.integer(1), default=1, help="passes over the data")
    p.add_argument("--lr", type=cli_args.learning_rate, help="learning rate, cosine to 0 over the run (else each "
                                                              "part's compiled one, constant)")
    p.add_argument("--seed", type=cli_args.seed, default=0, help="batch order")
    p.add_argument("--local-loss", action="store_true", help="train the device's part through its local head "
                                                             "(compile --local-head) without waiting for the server")
    p.add_argument("--send-every", type=cli_args.integer(1), default=1,
                   help="with --local-loss: send one batch in N to the server")
    p.add_argument("--prune-keep", type=cli_args.number(0, 1, lo_open=True), default=1.0,
                   help="with --local-loss: from the second epoch, train on this fraction of each class, the "
                        "samples the local head scores hardest")
    p.add_argument("--checkpoint", help="directory to save the device's parts in after training (one "
                                        "checkpoint per part)")
    cli_args.add_threads(p)
    p.set_defaults(func=split_train_command)


def split_train_command(args: argparse.Namespace) -> int:
    if not args.local_loss and (args.send_every != 1 or args.prune_keep < 1.0):
        raise UsageError("--send-every and --prune-keep apply with --local-loss")
    if args.checkpoint:
        cli_args.check_output_dir(args.checkpoint, "--checkpoint")
    doc = load_index(args.split)
    entries = doc["parts"]
    if len(entries) not in (2, 3):
        raise UsageError(f"{args.split}: a device-server split has 2 or 3 parts, this one {len(entries)}")
    local = [Part.load(os.path.join(args.split, e["path"]), args.threads) if e["holder"] == "device" or not args.server
             else None for e in entries]
    server: Any = local[1]
    if args.server:
        from pockprop.runtime.remote import RemotePart

        assert local[0] is not None
        server = RemotePart(args.server, args.client_id, local[0].info.split_id, entries[1]["manifest_sha256"])
    parts = [local[0], server] + ([local[2]] if len(entries) == 3 else [])
    head = None
    if args.local_loss:
        if "local_head" not in doc:
            raise UsageError(f"{args.split}: no local head (compile with --local-head)")
        head = Part.load(os.path.join(args.split, doc["local_head"]["path"]), args.threads)
    first = parts[0]
    pipe = first.trainer.pipeline
    data = pipe.load(args.data)
    if data.y is None:
        raise DataError(f"{args.data}: no labels")
    x = model_inputs(pipe, data.x, data.source)
    x = x[pipe.specs[0].name] if len(x) == 1 else x
    labeller = (parts[-1] if isinstance(parts[-1], Part) else head)
    y = labeller.trainer.pipeline.labels(data.y, data.source) if labeller is not None else np.asarray(data.y)
    batch = first.trainer.batch_size
    steps = args.epochs * (len(y) // batch)
    schedule = Schedule("cosine", args.lr, total_steps=max(steps, 1)) if args.lr else None

    def progress(epoch: int, loss: float) -> None:
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}", file=sys.stderr, flush=True)

    result = fit(parts, x, y, args.epochs, batch=batch, seed=args.seed, local_head=head, send_every=args.send_every,
                 prune_keep=args.prune_keep, schedule=schedule, progress=progress)
    t = result.traffic
    print(f"trained {t.steps} steps ({t.server_steps} with the server): sent {t.up:,} and received {t.down:,} "
          f"bytes of tensors, {t.device_seconds:.1f}s in the device's parts")
    if args.checkpoint:
        for e, part in zip(entries, local):
            if part is not None and e["holder"] == "device":
                part.trainer.save_checkpoint(os.path.join(args.checkpoint, e["path"]))
        if head is not None:
            head.trainer.save_checkpoint(os.path.join(args.checkpoint, "local_head"))
        print(f"saved the device's parts in {args.checkpoint}")
    return EXIT_OK
