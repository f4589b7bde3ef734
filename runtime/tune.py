"""`pockprop tune`: time each candidate lowering of a tuning kit on this machine and write a target profile.

Runs on the device (numpy + onnxruntime only). Each candidate is a one-node ONNX model (the kit's format:
pockprop.artifact.tuning); it runs in a session made exactly as the trainer makes its step's
(pockprop.runtime.session, same thread count), on noise. Per key the candidates are timed in interleaved
rounds, one run of each per round, after a warm-up run each, so a drift of the machine's speed (another
process, the CPU clock) falls on all of them alike; a candidate's time is its median over the rounds. The
winner is the fastest, unless the op's default is within MARGIN of it: a difference that small is noise,
and the default is the lowering every artifact was tested with longest.

A cache (CACHE_ENV, else ~/.cache/pockprop/tune.json) keeps each median by lowering key, candidate, the
candidate file's sha256, onnxruntime version, threads and machine, so tuning a model again, or another
model with the same layer shapes, times nothing already timed. It is only a cache: an unreadable one is
ignored (with a warning line) and rewritten.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from pockprop import args as cli_args
from pockprop.artifact.contract import BY_ORT, MANIFEST_FILE
from pockprop.artifact.durable import check_writable, write_atomic
from pockprop.artifact.tuning import KIT_FILE, Candidate, Kit, KitEntry, Measured, Profile, kit_path, machine
from pockprop.errors import EXIT_OK, ArtifactError
from pockprop.runtime.progress import Progress
from pockprop.runtime.session import session

MARGIN = 0.02  # a candidate must beat the default by more than this fraction of its time to win
REPEAT = 10
CACHE_ENV = "POCKPROP_TUNE_CACHE"
CACHE_FORMAT = "pockprop-tune-cache"

# A runner factory: given a candidate's ONNX bytes, the candidate and the thread count, it prepares the
# candidate (session, inputs, a warm-up run) and returns a function that runs it once and returns the
# seconds taken. Tests pass a fake one; timing is never a test.
Runner = Callable[[bytes, Candidate, "int | None"], Callable[[], float]]


def default_cache_path() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "pockprop", "tune.json")


def load_kit(path: str) -> tuple[Kit, str]:
    """The kit at `path` (its folder or its kit.json) and its folder; ArtifactError if it is not one."""
    index = kit_path(path)
    folder = os.path.dirname(index)
    if not os.path.exists(index):
        if os.path.exists(os.path.join(path, MANIFEST_FILE)):
            raise ArtifactError(f"{path}: an artifact, not a tuning kit; write its kit with `pockprop compile ... "
                                f"--tune-kit DIR` and tune that")
        raise ArtifactError(f"{path}: no {KIT_FILE} here: not a tuning kit")
    with open(index, "rb") as f:
        return Kit.loads(f.read(), index), folder


def read_candidate(folder: str, c: Candidate) -> bytes:
    """The candidate's ONNX bytes, checked against the kit's sha256 (nothing unchecked runs)."""
    path = os.path.join(folder, c.file)
    with open(path, "rb") as f:
        raw = f.read()
    if hashlib.sha256(raw).hexdigest() != c.sha256:
        raise ArtifactError(f"{path}: sha256 differs from {KIT_FILE}'s (a changed or damaged kit)")
    return raw


def ort_runner(model: bytes, c: Candidate, threads: int | None) -> Callable[[], float]:
    """The real runner: a session as the trainer makes it, inputs and big constants filled with noise
    (integers with zeros, valid indices of any size), one warm-up run."""
    rng = np.random.default_rng(0)

    def noise(shape: tuple[int, ...], dtype: str) -> np.ndarray:
        if dtype.startswith("float"):
            return rng.standard_normal(shape).astype(dtype)
        return np.zeros(shape, dtype)

    external = {name: noise(shape, dtype) for name, (shape, dtype) in c.random.items()}
    sess = session(model, threads, external=external, mem_pattern=False)
    feeds = {i.name: noise(tuple(i.shape), BY_ORT[i.type].name) for i in sess.get_inputs()}
    sess.run(None, feeds)

    def once() -> float:
        t0 = time.perf_counter()
        sess.run(None, feeds)
        return time.perf_counter() - t0

    return once


class Cache:
    """Medians (ms) by (key, candidate, sha256, onnxruntime, threads, machine), in one JSON file."""

    def __init__(self, path: str | None) -> None:
        self.path, self.times = path, {}
        self.problem: str | None = None  # why an existing cache file was not read (then it is rewritten)
        if path is None or not os.path.exists(path):
            return
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read())
            if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT or not isinstance(doc.get("times"), dict):
                raise ValueError("not a tuning cache")
            self.times = {k: float(v) for k, v in doc["times"].items()}
        except (OSError, ValueError, TypeError) as ex:
            self.problem = f"tuning cache {path} unreadable ({ex}); starting a new one"

    @staticmethod
    def key(key: str, c: Candidate, threads: int | None) -> str:
        return json.dumps([key, c.lowering, c.sha256, ort.__version__, threads, machine()])

    def save(self) -> None:
        if self.path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            write_atomic(self.path, (json.dumps({"format": CACHE_FORMAT, "times": self.times}, indent=0) + "\n").encode())


def winner(times: dict[str, float], default: str, margin: float = MARGIN) -> str:
    """The fastest candidate, or `default` unless something beats it by more than `margin` of its time."""
    fastest = min(times, key=lambda n: times[n])
    return default if default in times and times[default] <= times[fastest] * (1 + margin) else fastest


def entries(kits: Sequence[tuple[Kit, str]]) -> list[tuple[KitEntry, str]]:
    """The entries of several kits with the folder each came from, a key met again kept once (its first)."""
    seen: dict[str, tuple[KitEntry, str]] = {}
    for kit, folder in kits:
        for e in kit.entries:
            seen.setdefault(e.key, (e, folder))
    return list(seen.values())


def pending(kits: Sequence[tuple[Kit, str]], cache: Cache, threads: int | None) -> list[tuple[KitEntry, str, list[Candidate]]]:
    """Each entry of `kits` with its folder and its candidates that `cache` has no time for."""
    return [(e, folder, [c for c in e.candidates if Cache.key(e.key, c, threads) not in cache.times])
            for e, folder in entries(kits)]


def tune(kits: Sequence[tuple[Kit, str]], threads: int | None = None, repeat: int = REPEAT, cache: Cache | None = None,
         runner: Runner = ort_runner, show_progress: bool = False, failed: list[str] | None = None) -> Profile:
    """Measure every candidate of `kits` ((kit, its folder) pairs, as `load_kit` gives them) not in `cache`
    (median of `repeat` interleaved runs) and return the profile of all their keys; the cache gains the new
    medians (saved after each key, so an interrupted tune keeps them).

    A candidate this onnxruntime cannot load or run is left out of its key's times (it cannot win) and
    named in `failed`; a key none of whose candidates ran is left out of the profile (the fallback decides)."""
    cache = cache or Cache(None)
    todo = pending(kits, cache, threads)
    progress = Progress(sum(len(cs) for _, _, cs in todo) * repeat, "tune ", enabled=show_progress)
    done, keys = 0, {}
    for entry, folder, missing in todo:
        runs = {}
        for c in missing:
            raw = read_candidate(folder, c)  # a changed kit is refused, not skipped
            try:
                runs[c.lowering] = runner(raw, c, threads)
            except Exception as ex:  # noqa: BLE001 - onnxruntime's errors have no common public base
                (failed if failed is not None else []).append(f"{entry.key}: {c.lowering}: {type(ex).__name__}: "
                                                              f"{(str(ex).splitlines() or [''])[0]}")
                done += repeat
        samples: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for r in range(repeat if names else 0):
            for name in names[r % len(names):] + names[:r % len(names)]:  # each round starts elsewhere
                samples[name].append(runs[name]())
                done += 1
                progress.update(done)
        for name, values in samples.items():
            cache.times[Cache.key(entry.key, next(c for c in missing if c.lowering == name), threads)] = \
                1e3 * statistics.median(values)
        if runs:
            cache.save()
        times = {c.lowering: cache.times[k] for c in entry.candidates
                 if (k := Cache.key(entry.key, c, threads)) in cache.times}
        if times:
            keys[entry.key] = Measured(times, winner(times, entry.candidates[0].lowering))
    progress.close()
    models = ", ".join(dict.fromkeys(k.model for k, _ in kits if k.model))
    return Profile(machine(), ort.__version__, threads, keys, repeat,
                   note=f"measured by pockprop tune on the kits of {models}" if models else "")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="time each candidate lowering of a tuning kit here and write a target profile "
                                    "(numpy + onnxruntime only)",
                       description="Time the candidate lowerings of a tuning kit (written by `pockprop compile "
                                   "--tune-kit DIR`) with this machine's onnxruntime and thread count, and write "
                                   "the profile that `pockprop compile --target-profile` reads. Medians of "
                                   "interleaved runs; a cache makes a second tune of the same shapes time nothing.",
                       epilog="Exit codes: 0 written; 2 bad input (arguments, a kit that is not one or was "
                              "changed, an output path); 1 internal error.")
    p.add_argument("kits", nargs="+", metavar="KIT", help="tuning kit folders (or their kit.json): one profile of "
                                                          "all their keys")
    p.add_argument("--out", required=True, help="profile to write (JSON)")
    cli_args.add_threads(p, help="onnxruntime intra-op threads, as many as training will use")
    p.add_argument("--repeat", type=cli_args.positive_int, default=REPEAT, help="interleaved timed runs per candidate")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cache", help=f"tuning cache file (default: ${CACHE_ENV}, else ~/.cache/pockprop/tune.json)")
    where.add_argument("--no-cache", action="store_true", help="time everything and keep no cache")
    p.set_defaults(func=tune_command)


def tune_command(args: argparse.Namespace) -> int:
    cli_args.check_output_file(args.out, "--out")
    check_writable(args.out)
    kits = [load_kit(path) for path in args.kits]
    cache = Cache(None if args.no_cache else (args.cache or default_cache_path()))
    if cache.problem:
        print(f"pockprop tune: warning: {cache.problem}", file=sys.stderr)
    every = [e for e, _ in entries(kits)]
    total = sum(len(e.candidates) for e in every)
    timed = sum(len(cs) for _, _, cs in pending(kits, cache, args.threads))
    failed: list[str] = []
    profile = tune(kits, args.threads, args.repeat, cache, ort_runner, show_progress=True, failed=failed)
    write_atomic(args.out, profile.dumps())
    for line in failed:
        print(f"pockprop tune: warning: left out, onnxruntime {ort.__version__} cannot run it: {line}", file=sys.stderr)
    changed = 0
    for e in every:
        m = profile.keys.get(e.key)
        if m is None:
            continue
        default = e.candidates[0].lowering
        if m.winner != default:
            changed += 1
            print(f"{e.key}: {m.winner} {m.times_ms[m.winner]:.3f} ms, default {default} "
                  f"{m.times_ms[default]:.3f} ms ({', '.join(e.modules[:3])}{', ...' if len(e.modules) > 3 else ''})")
    print(f"wrote {args.out}: {len(profile.keys)} keys, {changed} with a faster lowering than the default; "
          f"{timed - len(failed)} of {total} candidates timed, {total - timed} from the cache, {len(failed)} failed "
          f"(onnxruntime {ort.__version__}, {args.threads or 'default'} threads, {machine()})", file=sys.stderr)
    return EXIT_OK
