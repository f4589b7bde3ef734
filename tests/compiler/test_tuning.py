"""The compiler's half of tuning: the kit of a real training step, compiling with a target profile, bad
profiles, the report's lowering column. conv2d_weight_grad is made to offer two lowerings, "plain" (its
default) and "alt", both emitting its real default: what is tested is the mechanism, whatever the lowerings."""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pockprop.artifact.tuning import KIT_FILE, Kit, machine, op_of
from pockprop.cli import main
from pockprop.compiler import target as target_mod
from pockprop.compiler.compile import compile
from pockprop.compiler.report import compile_report, format_report
from pockprop.compiler.target import load_target_profile, shipped
from pockprop.compiler.tunekit import build_kit
from pockprop.errors import CompileError
from pockprop.ops import get_op
from pockprop.ops.registry import LOWERING, lowering_key, lowering_of
from pockprop.passes.lowerings import with_choice
from pockprop.runtime.tune import ort_runner, read_candidate

OP = "conv2d_weight_grad"


def offer_two(monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    cls = type(get_op(op))
    lower = cls.lower
    monkeypatch.setattr(cls, "lowerings", ("plain", "alt"))
    monkeypatch.setattr(cls, "lowering_options", lambda self, types, node: ("plain", "alt"))
    monkeypatch.setattr(cls, "lower", lambda self, e, node: lower(
        self, e, node.replace(attrs={k: v for k, v in node.attrs.items() if k != LOWERING})))


@pytest.fixture()
def two_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    offer_two(monkeypatch, OP)


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.c = torch.nn.Conv2d(4, 4, 3, padding=1)  # b and c: one lowering key
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        return self.head(x.mean((2, 3)))


def tiny(**kw: Any) -> Any:
    torch.manual_seed(0)
    return compile(Tiny(), torch.randn(2, 3, 6, 6), **kw)


def keys_of(art: Any) -> dict[str, str]:
    g = art.train_graph
    return {n.module: lowering_key(g.types, n) for n in g.nodes if n.op == OP}


def profile(winners: dict[str, str], **over: Any) -> dict[str, Any]:
    return {"format": "pockprop-tune-profile", "format_version": 1, "machine": machine(),
            "onnxruntime": ort.__version__, "threads": 2,
            "keys": {k: {"times_ms": {"plain": 1.0, "alt": 0.5}, "winner": w} for k, w in winners.items()}} | over


def test_kit_has_one_hashed_file_per_candidate_of_each_key(two_ways: None, tmp_path: Path) -> None:
    art = tiny()
    kit = build_kit(art.train_graph, str(tmp_path), model="tiny")
    g = art.train_graph
    assert {e.key for e in kit.entries} == {k for _, _, k in with_choice(g)}  # other ops may offer choices too
    mine = [e for e in kit.entries if op_of(e.key) == OP]
    assert {e.key for e in mine} == set(keys_of(art).values()) and len(mine) == 2
    shared = next(e for e in mine if len(e.modules) == 2)
    assert set(shared.modules) == {"b", "c"}
    assert Kit.loads((tmp_path / KIT_FILE).read_bytes(), "kit") == kit
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted([KIT_FILE] + [c.file for e in kit.entries for c in e.candidates])
    for e in mine:
        assert [c.lowering for c in e.candidates] == ["plain", "alt"]
        for c in e.candidates:
            raw = (tmp_path / c.file).read_bytes()
            assert hashlib.sha256(raw).hexdigest() == c.sha256
            sess = ort.InferenceSession(raw)  # a standalone model: inputs only, no external file needed
            feeds = {i.name: np.ones([int(d) for d in i.shape], np.float32) for i in sess.get_inputs()}
            (dw,) = sess.run(None, feeds)
            assert dw.shape[0] == 4


def test_compile_takes_the_profiles_choice_and_falls_back_for_a_missing_key(two_ways: None) -> None:
    keys = keys_of(tiny())
    art = tiny(target_profile=profile({keys["b"]: "alt"}))
    got = {n.module: lowering_of(n) or "plain" for n in art.train_graph.nodes if n.op == OP}
    assert got == {"a": "plain", "b": "alt", "c": "alt"}  # a: missing from the profile -> fallback (default)
    rec = art.manifest().to_json()["lowerings"]
    assert rec["profile"]["machine"] == machine() and len(rec["profile"]["sha256"]) == 64
    assert {(n["module"], n["lowering"], n["by"]) for n in rec["nodes"] if n["op"] == OP} == {
        ("a", "plain", "fallback"), ("b", "alt", "profile"), ("c", "alt", "profile")}
    report = compile_report(art, tiny())
    assert report["scheme"]["layers"]["b"]["lowerings"][OP] == "alt"
    assert "conv2d_weight_grad=alt" in format_report(report).split("lowering per layer")[1]


def test_without_a_profile_the_fallback_decides_every_key(two_ways: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(target_mod, "fallback_chooser", lambda: lambda key, node, options, types: options[-1])
    art = tiny()
    assert {lowering_of(n) for n in art.train_graph.nodes if n.op == OP} == {"alt"}
    rec = art.manifest().to_json()["lowerings"]
    assert rec["profile"] is None and {n["by"] for n in rec["nodes"]} == {"fallback"}


def test_without_a_choice_artifacts_are_unchanged() -> None:
    torch.manual_seed(0)  # no conv and no product of two matrices (a linear layer's weight gradient is one)
    art = compile(torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.ReLU()), torch.randn(2, 4))
    assert "lowerings" not in art.manifest().to_json()


@pytest.mark.parametrize("doc,needle", [
    ("format", "not a pockprop-tune-profile"),
    ("keys", "unknown op"),
    ("lowering", "'fast' is not a lowering of conv2d_weight_grad"),
    ("winner", "is not one of the measured lowerings"),
])
def test_bad_profiles_refused(two_ways: None, doc: Any, needle: str) -> None:
    bad = {"format": {"format": "nope"}, "keys": profile({"nope(float32[1];)": "alt"}),
           "lowering": profile({f"{OP}(x)": "fast"}) | {"keys": {f"{OP}(x)": {"times_ms": {"fast": 1}, "winner": "fast"}}},
           "winner": profile({f"{OP}(x)": "other"})}[doc]
    with pytest.raises(Exception, match=needle):
        load_target_profile(bad)


@pytest.mark.parametrize("content", ["not json", json.dumps({"format": "pockprop-tune-profile", "format_version": 1}),
                                     json.dumps(profile({f"{OP}(x)": "fast"}))])
def test_compile_cli_bad_profile_exits_2_writing_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         content: str) -> None:
    bad = tmp_path / "p.json"
    bad.write_text(content)
    code = main(["compile", "models:mlp", "--input-shape", "4,64", "--target-profile", str(bad),
                 "--tune-kit", str(tmp_path / "kit"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "kit").exists()


def test_compile_cli_with_profile_and_kit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    offer_two(monkeypatch, OP)
    offer_two(monkeypatch, "conv2d_input_grad")  # reads frozen weights: constants the device fills with noise
    shipped_dir = tmp_path / "profiles"  # a shipped profile of this machine that knows only the fake lowerings
    shipped_dir.mkdir()
    (shipped_dir / f"{machine()}.json").write_text(json.dumps(profile({})))
    monkeypatch.setattr(target_mod, "PROFILES", str(shipped_dir))
    code = main(["compile", "models:mcunet", "--model-kwargs", '{"width_mult": 0.25}', "--num-classes", "3", "--input-shape", "2,3,32,32",
                 "--scheme", "sparse", "--target-profile", "default", "--report",
                 "--tune-kit", str(tmp_path / "kit"), "-o", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["lowerings"]["profile"]["source"] == f"shipped:{machine()}"
    kit = Kit.loads((tmp_path / "kit" / KIT_FILE).read_bytes(), "kit")
    assert {n["key"] for n in manifest["lowerings"]["nodes"]} == {e.key for e in kit.entries}
    assert "lowering per layer" in captured.out and "wrote tuning kit" in captured.err
    assert main(["inspect", str(tmp_path / "out")]) == 0
    assert f"chosen by target profile shipped:{machine()}" in capsys.readouterr().out
    assert any(c.random for e in kit.entries for c in e.candidates)
    for e in kit.entries:  # every candidate runs as the device runs it (nothing about its time)
        for c in e.candidates:
            assert ort_runner(read_candidate(str(tmp_path / "kit"), c), c, 1)() >= 0


def test_compile_help_names_the_tuning_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ex:
        main(["compile", "--help"])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    assert "--target-profile" in out and "--tune-kit" in out


def test_shipped_profiles_load_and_hold_only_measurements() -> None:
    assert {"x86_64", "aarch64"} <= set(shipped())
    for name in shipped():
        t = load_target_profile(name)
        assert t.source == f"shipped:{name}" and t.profile.machine == name
        assert t.profile.keys == {} or t.profile.repeat > 0  # nothing made up: measured, or empty
    assert not load_target_profile("aarch64").profile.keys  # emulated timings are not timings


def test_default_profile_is_this_machines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(target_mod, "machine", lambda: "riscv64")
    with pytest.raises(CompileError, match="no shipped target profile for this machine"):
        load_target_profile("default")


def test_training_with_another_setup_than_the_profiles_warns(tmp_path: Path) -> None:
    from pockprop.artifact.tuning import TuningMismatch
    from pockprop.runtime.trainer import Trainer

    tiny(target_profile=profile({})).save(str(tmp_path / "same"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TuningMismatch)
        Trainer.load(str(tmp_path / "same"), threads=2)
    tiny(target_profile=profile({}, machine="riscv64")).save(str(tmp_path / "other"))
    with pytest.warns(TuningMismatch, match="machine riscv64 there, .* here; threads 2 there, default here"):
        Trainer.load(str(tmp_path / "other"))
