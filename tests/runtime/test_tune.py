"""`pockprop tune` on a kit of a fake op with two lowerings: it picks what a fake timer says is fastest, writes
the profile, and a second tune times nothing (the cache). Timing is never a test: every runner here is fake,
but for one real onnxruntime run that only checks the candidates run."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import pytest

from pockprop.artifact.tuning import Candidate, Kit, Profile, machine
from pockprop.cli import main
from pockprop.compiler.tunekit import build_kit
from pockprop.ir import Graph, Node, TensorType
from pockprop.ops import registry
from pockprop.ops.registry import Op, lowering_of, same_as_input
from pockprop.runtime import tune as tuning
from pockprop.runtime.tune import Cache, load_kit, ort_runner, tune


class _TwoWays(Op):
    """relu, as Relu ("plain", the default) or as Max with 0 ("fancy")."""

    name = "test_two_ways"
    lowerings = ("plain", "fancy")
    shape = staticmethod(same_as_input)  # type: ignore[assignment]

    def lower(self, e: Any, node: Node) -> None:
        if lowering_of(node) == "fancy":
            e.node("Max", [node.inputs[0], e.const(0.0)], node.outputs)
        else:
            e.node("Relu", [node.inputs[0]], node.outputs)


@pytest.fixture()
def two_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._OPS, _TwoWays.name, _TwoWays())


def step_graph() -> Graph:
    """Two shapes of the fake op (two keys), one of them twice; one reads a frozen constant of 4 KiB."""
    g = Graph()
    g.add_input("x", TensorType((2, 8), "float32"))
    w = g.add_constant(np.ones((32, 32), np.float32), name="w")
    for v, t in (("a", (2, 8)), ("b", (2, 8)), ("c", (32, 32))):
        g.add_value(v, TensorType(t, "float32"))
    g.append(Node("test_two_ways", ("x",), ("a",), {}, "first"))
    g.append(Node("test_two_ways", ("a",), ("b",), {}, "second"))
    g.append(Node("test_two_ways", (w,), ("c",), {}, "third"))
    g.outputs = ["b", "c"]
    return g


def fake_runner(ms: dict[str, float], calls: list[str]) -> Callable[..., Callable[[], float]]:
    """A runner whose candidates take `ms[lowering]` milliseconds; each preparation and run is logged."""
    def make(model: bytes, c: Candidate, threads: int | None) -> Callable[[], float]:
        assert model[:2] and c.lowering in ms
        calls.append(f"prepare {c.lowering}")

        def once() -> float:
            calls.append(c.lowering)
            return ms[c.lowering] / 1e3
        return once
    return make


@pytest.fixture()
def kit_dir(tmp_path: Path, two_ways: None) -> Path:
    build_kit(step_graph(), str(tmp_path / "kit"), model="tiny")
    return tmp_path / "kit"


def test_tune_picks_the_measured_fastest_and_caches(kit_dir: Path, tmp_path: Path) -> None:
    kit, folder = load_kit(str(kit_dir))
    assert len(kit.entries) == 2 and [c.lowering for c in kit.entries[0].candidates] == ["plain", "fancy"]
    calls: list[str] = []
    cache = Cache(str(tmp_path / "cache.json"))
    profile = tune([(kit, folder)], threads=2, repeat=3, cache=cache, runner=fake_runner({"plain": 2.0, "fancy": 1.0}, calls))
    assert {m.winner for m in profile.keys.values()} == {"fancy"}
    assert profile.keys[kit.entries[0].key].times_ms == {"plain": 2.0, "fancy": 1.0}
    assert calls.count("fancy") == calls.count("plain") == 2 * 3  # two keys, three interleaved rounds
    assert profile.threads == 2 and profile.onnxruntime == ort.__version__ and profile.machine == machine()

    calls.clear()  # a second tune, from a cache read back from its file: nothing timed, nothing prepared
    again = tune([(kit, folder)], threads=2, repeat=3, cache=Cache(str(tmp_path / "cache.json")),
                 runner=fake_runner({"plain": 2.0, "fancy": 1.0}, calls))
    assert calls == [] and again.keys == profile.keys
    # the thread count is part of the cache key: 1 thread is timed anew
    tune([(kit, folder)], threads=1, repeat=1, cache=Cache(str(tmp_path / "cache.json")),
         runner=fake_runner({"plain": 2.0, "fancy": 1.0}, calls))
    assert calls.count("plain") == 2


def test_cache_key_names_everything_the_time_depends_on(kit_dir: Path) -> None:
    kit, _ = load_kit(str(kit_dir))
    c = kit.entries[0].candidates[0]
    key = json.loads(Cache.key(kit.entries[0].key, c, 2))
    assert key == [kit.entries[0].key, "plain", c.sha256, ort.__version__, 2, machine()]


def test_a_tie_keeps_the_default(kit_dir: Path) -> None:
    kit, folder = load_kit(str(kit_dir))
    profile = tune([(kit, folder)], repeat=1, runner=fake_runner({"plain": 1.01, "fancy": 1.0}, []))
    assert {m.winner for m in profile.keys.values()} == {"plain"}  # within MARGIN: noise
    assert tuning.winner({"plain": 1.0, "fancy": 1.0}, "plain") == "plain"
    assert tuning.winner({"plain": 1.0, "fancy": 0.5}, "plain") == "fancy"


def test_the_median_of_interleaved_rounds_decides(kit_dir: Path) -> None:
    kit, folder = load_kit(str(kit_dir))
    times = {"plain": iter([1.0, 9.0, 1.0] * 2), "fancy": iter([2.0, 2.0, 0.5] * 2)}  # one outlier each
    order: list[str] = []

    def runner(model: bytes, c: Candidate, threads: int | None) -> Callable[[], float]:
        return lambda: order.append(c.lowering) or next(times[c.lowering]) / 1e3  # type: ignore[func-returns-value]

    profile = tune([(kit, folder)], repeat=3, runner=runner)
    assert profile.keys[kit.entries[0].key].times_ms == {"plain": 1.0, "fancy": 2.0}
    assert order[:6] == ["plain", "fancy", "fancy", "plain", "plain", "fancy"]  # each round starts elsewhere


def test_candidates_really_run_on_onnxruntime(kit_dir: Path) -> None:
    kit, folder = load_kit(str(kit_dir))
    big = kit.entries[1]  # the 32x32 constant is left to the device to fill with noise
    assert all(list(c.random) == ["in0"] for c in big.candidates)
    for e in kit.entries:
        for c in e.candidates:
            seconds = ort_runner(tuning.read_candidate(folder, c), c, 1)()
            assert seconds >= 0.0


def test_a_changed_kit_file_is_refused(kit_dir: Path) -> None:
    kit, folder = load_kit(str(kit_dir))
    c = kit.entries[0].candidates[1]
    with open(os.path.join(folder, c.file), "ab") as f:
        f.write(b"\0")
    with pytest.raises(Exception, match="sha256"):
        tune([(kit, folder)], repeat=1, runner=fake_runner({"plain": 1.0, "fancy": 1.0}, []))


def test_tune_command_writes_the_profile(kit_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(tuning, "ort_runner", fake_runner({"plain": 3.0, "fancy": 1.0}, []))
    out = tmp_path / "profile.json"
    code = main(["tune", str(kit_dir), "--out", str(out), "--threads", "1", "--repeat", "2",
                 "--cache", str(tmp_path / "c.json")])
    assert code == 0, capsys.readouterr().err
    profile = Profile.loads(out.read_bytes(), str(out))
    assert profile.threads == 1 and {m.winner for m in profile.keys.values()} == {"fancy"}
    assert "4 of 4 candidates timed" in capsys.readouterr().err
    assert main(["tune", str(kit_dir), "--out", str(out), "--threads", "1", "--cache", str(tmp_path / "c.json")]) == 0
    assert "0 of 4 candidates timed, 4 from the cache" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["artifact", "nothing", "bad json"])
def test_tune_refuses_what_is_not_a_kit(tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str) -> None:
    d = tmp_path / "d"
    d.mkdir()
    if what == "artifact":
        (d / "manifest.json").write_text("{}")
    elif what == "bad json":
        (d / "kit.json").write_text("{")
    out = tmp_path / "p.json"
    assert main(["tune", str(d), "--out", str(out), "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    assert {"artifact": "--tune-kit", "nothing": "not a tuning kit", "bad json": "not valid JSON"}[what] in err


def test_tune_help() -> None:
    with pytest.raises(SystemExit) as ex:
        main(["tune", "--help"])
    assert ex.value.code == 0


def test_kit_format_round_trips(kit_dir: Path) -> None:
    kit, _ = load_kit(str(kit_dir))
    assert Kit.loads(kit.dumps(), "x") == kit


def test_one_key_is_one_file_whatever_the_model(two_ways: None, kit_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Another model with a layer of the same key: the same candidate file, so its times come from the cache;
    `pockprop tune` of both kits writes one profile of their keys."""
    g = Graph()
    g.add_input("other_input", TensorType((2, 8), "float32"))
    g.add_value("y", TensorType((2, 8), "float32"))
    g.append(Node("test_two_ways", ("other_input",), ("y",), {}, "elsewhere.layer"))
    g.outputs = ["y"]
    other = build_kit(g, str(tmp_path / "other"), model="other")
    mine, _ = load_kit(str(kit_dir))
    assert other.entries[0].candidates == mine.entries[0].candidates
    calls: list[str] = []
    cache = Cache(str(tmp_path / "c.json"))
    tune([load_kit(str(kit_dir))], repeat=1, cache=cache, runner=fake_runner({"plain": 1.0, "fancy": 2.0}, []))
    both = tune([load_kit(str(kit_dir)), load_kit(str(tmp_path / "other"))], repeat=1, cache=cache,
                runner=fake_runner({"plain": 1.0, "fancy": 2.0}, calls))
    assert calls == [] and set(both.keys) == {e.key for e in mine.entries}


def test_tune_runs_where_torch_and_onnx_cannot_be_imported(kit_dir: Path, tmp_path: Path) -> None:
    """The real runner on the device install: numpy + onnxruntime only (one repeat; nothing about its times)."""
    import subprocess
    import textwrap

    from tests.runtime.conftest import BLOCKER, PY, ROOT

    out = tmp_path / "p.json"
    script = textwrap.dedent(f"""
        from pockprop.cli import main
        assert main(["tune", {str(kit_dir)!r}, "--out", {str(out)!r}, "--threads", "1", "--repeat", "1",
                     "--no-cache"]) == 0
        banned = sorted(m for m in sys.modules if m.split(".")[0] in {{"torch", "onnx", "yaml"}})
        assert banned == [], banned
    """)
    run = subprocess.run([PY, "-c", BLOCKER + script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert len(Profile.loads(out.read_bytes(), str(out)).keys) == 2


def test_an_unreadable_cache_is_a_warning_and_rewritten(kit_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "c.json"
    bad.write_text("{")
    cache = Cache(str(bad))
    assert cache.problem and "unreadable" in cache.problem and cache.times == {}
    kit, folder = load_kit(str(kit_dir))
    tune([(kit, folder)], repeat=1, cache=cache, runner=fake_runner({"plain": 1.0, "fancy": 2.0}, []))
    assert len(Cache(str(bad)).times) == 4 and Cache(str(bad)).problem is None


def test_a_candidate_onnxruntime_cannot_run_is_left_out(kit_dir: Path) -> None:
    kit, folder = load_kit(str(kit_dir))
    ok = fake_runner({"plain": 2.0, "fancy": 1.0}, [])

    def runner(model: bytes, c: Candidate, threads: int | None) -> Callable[[], float]:
        if c.lowering == "fancy":
            raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation\nmore")
        return ok(model, c, threads)

    failed: list[str] = []
    profile = tune([(kit, folder)], repeat=2, runner=runner, failed=failed)
    assert {m.winner for m in profile.keys.values()} == {"plain"}
    assert all(set(m.times_ms) == {"plain"} for m in profile.keys.values())
    assert len(failed) == 2 and "fancy: RuntimeError: [ONNXRuntimeError] : 9 : NOT_IMPLEMENTED" in failed[0]
    assert "\n" not in failed[0]
    assert tuning.winner({"fancy": 1.0}, "plain") == "fancy"
