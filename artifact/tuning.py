"""The tuning formats: the kit the compiler writes and the profile the device's `pockprop tune` writes back.

numpy-free, stdlib only (the device imports it; the compiler reads profiles through it too), like
artifact/contract.py for the artifact. docs/tuning.md describes both formats for people.

A kit is a folder: `kit.json` (KIT_FILE) lists, for each distinct lowering key of a training step (the op,
its input types and attributes: `pockprop.ops.registry.lowering_key`) whose op offers several lowerings,
one tiny ONNX model per candidate lowering, default first, each file with its sha256. Float initializers
of `external.MIN_BYTES` and more are left out of the files (external data) and listed under "random": the
device fills them with noise, so a kit stays small however large the model's weights are, while the
lowering still sees them as constants (onnxruntime folds what depends on them, as in the real step).

A profile is one JSON document: where it was measured (machine, onnxruntime version, threads) and per
key the median time of each candidate and the winner. Names of lowerings are checked against the op
registry by the compiler (pockprop.compiler.target), which the device does not have.
"""
from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field
from typing import Any

from pockprop.artifact.contract import BY_NAME, is_plain_name
from pockprop.errors import ArtifactError

KIT_FORMAT = "pockprop-tune-kit"
PROFILE_FORMAT = "pockprop-tune-profile"
FORMAT_VERSION = 1
KIT_FILE = "kit.json"
_SHA = set("0123456789abcdef")


def machine() -> str:
    """This machine's architecture as profiles name it (x86_64, aarch64: platform.machine(), normalized)."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(m, m)


def op_of(key: str) -> str:
    """The IR op a lowering key is about (the key starts with it: 'conv2d_weight_grad(...)')."""
    return key.split("(", 1)[0]


@dataclass(frozen=True)
class Candidate:
    """One lowering of a key: its ONNX file in the kit, and the float initializers the device fills with noise."""

    lowering: str
    file: str
    sha256: str
    random: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # name -> (shape, dtype)

    def to_json(self) -> dict[str, Any]:
        return {"lowering": self.lowering, "file": self.file, "sha256": self.sha256,
                "random": {n: {"shape": list(s), "dtype": d} for n, (s, d) in self.random.items()}}


@dataclass(frozen=True)
class KitEntry:
    """A lowering key, where the model has it (module paths), and its candidates (the op's default first)."""

    key: str
    modules: tuple[str, ...]
    candidates: tuple[Candidate, ...]

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "modules": list(self.modules), "candidates": [c.to_json() for c in self.candidates]}


@dataclass(frozen=True)
class Kit:
    model: str
    entries: tuple[KitEntry, ...]

    def dumps(self) -> bytes:
        doc = {"format": KIT_FORMAT, "format_version": FORMAT_VERSION, "model": self.model,
               "entries": [e.to_json() for e in self.entries]}
        return (json.dumps(doc, indent=1) + "\n").encode()

    @classmethod
    def loads(cls, raw: bytes, where: str) -> "Kit":
        """Parse and check kit.json's structure; ArtifactError naming `where` and the field if wrong."""
        doc = _document(raw, where, KIT_FORMAT)
        entries, seen = [], set()
        if not isinstance(doc.get("entries"), list):
            raise ArtifactError(f"{where}: entries: expected a list")
        for i, e in enumerate(doc["entries"]):
            at = f"{where}: entries[{i}]"
            if not isinstance(e, dict) or not isinstance(e.get("key"), str) or e["key"] in seen:
                raise ArtifactError(f"{at}: expected an object with a key seen once")
            seen.add(e["key"])
            cands = e.get("candidates")
            if not isinstance(cands, list) or len(cands) < 2:
                raise ArtifactError(f"{at}: candidates: expected a list of two or more")
            modules = e.get("modules", [])
            if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
                raise ArtifactError(f"{at}: modules: expected a list of module paths")
            entries.append(KitEntry(e["key"], tuple(modules), tuple(_candidate(c, at) for c in cands)))
        return cls(doc.get("model") if isinstance(doc.get("model"), str) else "", tuple(entries))


def _candidate(c: Any, at: str) -> Candidate:
    if not isinstance(c, dict) or not all(isinstance(c.get(k), str) for k in ("lowering", "file", "sha256")):
        raise ArtifactError(f"{at}: a candidate needs lowering, file and sha256")
    if not is_plain_name(c["file"]) or len(c["sha256"]) != 64 or not set(c["sha256"]) <= _SHA:
        raise ArtifactError(f"{at}: candidate {c['lowering']!r}: a plain file name and a sha256 hex digest expected")
    random = {}
    for name, spec in (c.get("random") or {}).items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and spec.get("dtype") in BY_NAME):
            raise ArtifactError(f"{at}: candidate {c['lowering']!r}: random {name!r}: expected {{shape, dtype}}")
        random[name] = (tuple(shape), spec["dtype"])
    return Candidate(c["lowering"], c["file"], c["sha256"], random)


@dataclass(frozen=True)
class Measured:
    """One key of a profile: median milliseconds per candidate, and the one chosen."""

    times_ms: dict[str, float]
    winner: str


@dataclass(frozen=True)
class Profile:
    """Where the times were measured, and per lowering key what was measured and chosen."""

    machine: str
    onnxruntime: str
    threads: int | None  # None: onnxruntime's default (all cores), as `pockprop train` without --threads
    keys: dict[str, Measured]
    repeat: int = 0
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"format": PROFILE_FORMAT, "format_version": FORMAT_VERSION, "machine": self.machine,
                               "onnxruntime": self.onnxruntime, "threads": self.threads, "repeat": self.repeat}
        if self.note:
            doc["note"] = self.note
        doc["keys"] = {k: {"times_ms": {n: round(t, 4) for n, t in m.times_ms.items()}, "winner": m.winner}
                       for k, m in sorted(self.keys.items())}
        return doc

    def dumps(self) -> bytes:
        return (json.dumps(self.to_json(), indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, doc: Any, where: str) -> "Profile":
        """Check a profile document's structure; ArtifactError naming `where` and the field if wrong."""
        doc = _checked(doc, where, PROFILE_FORMAT)
        for k in ("machine", "onnxruntime"):
            if not isinstance(doc.get(k), str):
                raise ArtifactError(f"{where}: {k}: expected a string")
        threads = doc.get("threads")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ArtifactError(f"{where}: threads: expected an integer >= 1 or null, got {threads!r}")
        if not isinstance(doc.get("keys"), dict):
            raise ArtifactError(f"{where}: keys: expected an object")
        keys = {}
        for key, m in doc["keys"].items():
            times = m.get("times_ms") if isinstance(m, dict) else None
            if not isinstance(times, dict) or not times or not all(
                    isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0
                    for t in times.values()):
                raise ArtifactError(f"{where}: keys[{key!r}]: times_ms: expected {{lowering: milliseconds}}")
            if m.get("winner") not in times:
                raise ArtifactError(f"{where}: keys[{key!r}]: winner {m.get('winner')!r} is not one of the "
                                    f"measured lowerings {', '.join(times)}")
            keys[key] = Measured({n: float(t) for n, t in times.items()}, m["winner"])
        repeat = doc.get("repeat", 0)
        return cls(doc["machine"], doc["onnxruntime"], threads, keys, repeat if isinstance(repeat, int) else 0,
                   doc.get("note", "") if isinstance(doc.get("note"), str) else "")

    @classmethod
    def loads(cls, raw: bytes, where: str) -> "Profile":
        """Parse and check a profile's bytes; ArtifactError naming `where` and the field if wrong."""
        return cls.from_json(_parse(raw, where), where)


def _parse(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as ex:
        raise ArtifactError(f"{where}: not valid JSON ({ex})") from None


def _checked(doc: Any, where: str, fmt: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise ArtifactError(f"{where}: not a {fmt} document (its \"format\" must be {fmt!r})")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{where}: format version {doc.get('format_version')!r}; this pockprop reads "
                            f"version {FORMAT_VERSION}")
    return doc


def _document(raw: bytes, where: str, fmt: str) -> dict[str, Any]:
    return _checked(_parse(raw, where), where, fmt)


class TuningMismatch(UserWarning):
    """The artifact's lowerings were chosen from times measured elsewhere: it trains the same, maybe slower."""


def mismatch(lowerings: Any, threads: int | None, onnxruntime: str) -> str | None:
    """One line saying how this machine differs from where the artifact's target profile was measured
    (architecture, onnxruntime version, threads), or None: the same, or no profile (manifest "lowerings")."""
    profile = lowerings.get("profile") if isinstance(lowerings, dict) else None
    if not isinstance(profile, dict):
        return None
    here = {"machine": machine(), "onnxruntime": onnxruntime, "threads": threads}
    differ = [f"{k} {profile.get(k) or 'default'} there, {v or 'default'} here" for k, v in here.items()
              if profile.get(k) != v]
    if not differ:
        return None
    return (f"the lowerings were tuned with another setup ({'; '.join(differ)}): training is the same, its speed "
            f"may not be; `pockprop tune` here gives a profile for this machine")


def describe_lowerings(record: Any) -> str:
    """A manifest's "lowerings" in one line: how many nodes had a choice, and who decided them."""
    nodes = record.get("nodes") if isinstance(record, dict) else None
    if not isinstance(nodes, list):
        return "not recorded"
    profile = record.get("profile")
    if not isinstance(profile, dict):
        return f"{len(nodes)} nodes with a choice, all chosen by the fallback (no target profile)"
    by_profile = sum(1 for n in nodes if isinstance(n, dict) and n.get("by") == "profile")
    where = (f"target profile {profile.get('source')} (sha256 {str(profile.get('sha256'))[:12]}, {profile.get('machine')}, "
             f"onnxruntime {profile.get('onnxruntime')}, {profile.get('threads') or 'default'} threads)")
    return f"{len(nodes)} nodes with a choice, {by_profile} chosen by {where}, {len(nodes) - by_profile} by the fallback"


def kit_path(path: str) -> str:
    """The kit folder's kit.json, given the folder or the file itself."""
    return os.path.join(path, KIT_FILE) if os.path.isdir(path) else path
