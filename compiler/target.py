"""Target profiles on the compiler's side: each node's lowering from times measured on the device.

A profile (pockprop.artifact.tuning's format, written by `pockprop tune` on the device) names per lowering
key the fastest candidate there. `ProfileChooser` is the `Chooser` (passes/lowerings.py) that looks each key
up; a key the profile lacks (another scheme, a shape never tuned) goes to `fallback_chooser()`, the one
place that decides without measurements. The artifact records which profile decided what (`record`).

Shipped profiles (compiler/profiles/ARCH.json, package data) hold only what was measured on such a machine
with `pockprop tune`; `--target-profile default` picks the compiling machine's, or name one: `x86_64`,
`aarch64`. A profile is only used when asked for: the machine that compiles is often not the target.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from pockprop.artifact.tuning import Profile, machine, op_of
from pockprop.errors import CompileError
from pockprop.ir import Graph, Node, TensorType
from pockprop.compiler.lowering_cost import cost_model_lowering
from pockprop.ops.registry import get_op, lowering_of
from pockprop.passes.lowerings import Chooser, with_choice

PROFILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")
DEFAULT = "default"  # --target-profile default: the shipped profile of the compiling machine's architecture


def fallback_chooser() -> Chooser:
    """What picks a lowering where no measurement says: the cost model (compiler/lowering_cost.py), fitted to
    standalone timings on x86-64 and never slower on whole steps there (docs/benchmarks.md)."""
    return cost_model_lowering


def shipped() -> list[str]:
    """Names of the profiles shipped with the package (their architectures)."""
    return sorted(f[:-5] for f in os.listdir(PROFILES) if f.endswith(".json"))


@dataclass(frozen=True)
class TargetProfile:
    """A checked profile, with the sha256 of its bytes and where it came from (a path, or shipped:ARCH)."""

    profile: Profile
    sha256: str
    source: str

    def describe(self) -> dict[str, Any]:
        p = self.profile
        return {"source": self.source, "sha256": self.sha256, "machine": p.machine, "onnxruntime": p.onnxruntime,
                "threads": p.threads}


def load_target_profile(spec: "str | Mapping[str, Any] | TargetProfile") -> TargetProfile:
    """A profile given as a path, `default`, a shipped name, or a parsed document (dict). ArtifactError if
    it is not a profile, CompileError if it names an op or a lowering this compiler does not have."""
    if isinstance(spec, TargetProfile):
        return spec
    if isinstance(spec, Mapping):
        raw, where = json.dumps(spec, sort_keys=True).encode(), "target profile"
    else:
        name = machine() if spec == DEFAULT else spec
        if name in shipped():
            path, where = os.path.join(PROFILES, f"{name}.json"), f"shipped:{name}"
        elif spec == DEFAULT:
            raise CompileError(f"no shipped target profile for this machine ({name}); shipped: {', '.join(shipped())}")
        else:
            path = where = str(spec)
        with open(path, "rb") as f:
            raw = f.read()
    profile = Profile.loads(raw, where)
    for key, m in profile.keys.items():
        op = op_of(key)
        try:
            known = get_op(op).lowerings
        except CompileError:
            raise CompileError(f"{where}: key {key!r}: unknown op {op!r}") from None
        unknown = [n for n in m.times_ms if n not in known]
        if unknown:
            raise CompileError(f"{where}: key {key!r}: {', '.join(map(repr, unknown))} is not a lowering of {op} "
                               f"(it has: {', '.join(known) or 'one lowering only'})")
    return TargetProfile(profile, hashlib.sha256(raw).hexdigest(), where)


class ProfileChooser:
    """The Chooser of a target profile: its winner for a key it has (if valid for the node), else the fallback."""

    def __init__(self, target: TargetProfile, fallback: Chooser | None = None) -> None:
        self.target = target
        self.fallback = fallback or fallback_chooser()

    def decides(self, key: str, options: tuple[str, ...]) -> bool:
        m = self.target.profile.keys.get(key)
        return m is not None and m.winner in options

    def __call__(self, key: str, node: Node, options: tuple[str, ...], types: Mapping[str, TensorType]) -> str:
        if self.decides(key, options):
            return self.target.profile.keys[key].winner
        return self.fallback(key, node, options, types)


def chooser_for(target: TargetProfile | None) -> Chooser:
    """The profile's chooser, or with no profile the fallback alone."""
    return ProfileChooser(target) if target is not None else fallback_chooser()


def record(graph: Graph, target: TargetProfile | None) -> dict[str, Any] | None:
    """What the manifest records: the profile used (None: none) and, per node with a choice, its lowering and
    whether the profile or the fallback decided it. None when there was neither a profile nor a choice."""
    chooser = ProfileChooser(target) if target is not None else None
    nodes = [{"module": node.module, "op": node.op, "lowering": lowering_of(node) or options[0],
              "by": "profile" if chooser is not None and chooser.decides(key, options) else "fallback", "key": key}
             for node, options, key in with_choice(graph)]
    if target is None and not nodes:
        return None
    return {"profile": None if target is None else target.describe(), "nodes": nodes}
