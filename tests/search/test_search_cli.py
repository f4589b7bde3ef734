"""`pockprop search` from the command line, and `pockprop compile --weights` (in-process, via pockprop.cli.main)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pockprop import models
from pockprop.models.data import digits_flat
from pockprop.artifact import safetensors
from pockprop.cli import main

FAST = ["--steps", "6", "--batch", "16", "--ratios", "1/2,1", "--no-progress"]


@pytest.fixture(scope="module")
def raw_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x, y = digits_flat("train")
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, x=x[:300] * 0.5 + 0.5, y=y[:300])  # raw pixels in [0, 1]; --preprocess normalizes them
    return path


def test_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ex:
        main(["search", "--help"])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    assert "--budget-memory" in out and "--drift" in out and "MODEL_OR_ARTIFACT" in out


@pytest.mark.parametrize("args,needle", [
    (["--budget-memory", "2 lightyears"], "expected a size like 2MB"),
    ([], "--budget-memory is required"),
    (["--budget-memory", "2MB", "--preprocess", "{nope"], "--preprocess"),
    (["--budget-memory", "2MB", "--preprocess", '{"sharpen": 1}'], "data preprocess: unknown steps ['sharpen']"),
    (["--budget-memory", "10", "--max-layers", "1"], "baseline alone needs"),
    (["--budget-memory", "2MB", "--lrs", "0.1,-1"], "--lrs"),
    (["--budget-memory", "2MB", "--budget-time", "0"], "--budget-time"),
    (["--budget-memory", "2MB", "--batchnorm", "sometimes"], "--batchnorm"),
])
def test_bad_input_exits_2(raw_npz: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    code = main(["search", "models:mlp", "--data", str(raw_npz), *FAST, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err


def test_missing_data_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["search", "models:mlp", "--data", str(tmp_path / "nope.npz"), "--budget-memory", "2MB"])
    err = capsys.readouterr().err
    assert code == 2 and "nope.npz" in err and "no such file" in err


def test_search_writes_a_scheme_that_compiles_with_weights(raw_npz: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(1)
    weights = tmp_path / "w.safetensors"
    safetensors.save(str(weights), {k: v.numpy() for k, v in models.mlp(hidden=(16, 8)).state_dict().items()})
    common = ["--model-kwargs", '{"hidden": [16, 8]}', "--weights", str(weights)]
    yaml_path, js, png = tmp_path / "s.yaml", tmp_path / "s.json", tmp_path / "s.png"
    code = main(["search", "models:mlp", *common, "--data", str(raw_npz), "--preprocess", '{"mean": 0.5, "std": 0.5}',
                 "--budget-memory", "5KB", *FAST, "-o", str(yaml_path), "--json", str(js), "--plot", str(png)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "chosen (budget 5.00KB)" in out and png.read_bytes()[:4] == b"\x89PNG"
    doc = json.loads(js.read_text())
    assert doc["estimate"]["memory_bytes"] <= 5 * 1024 and doc["probes_run"] >= 1
    art = tmp_path / "art"
    assert main(["compile", "models:mlp", *common, "--input-shape", "16,64", "--scheme", str(yaml_path),
                 "--report", "-o", str(art)]) == 0
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["scheme"]["name"] == doc["scheme"]["name"]
    assert manifest["source"]["model"] == "models:mlp" and manifest["source"]["kwargs"] == {"hidden": [16, 8]}
    assert manifest["source"]["weights"]["path"] == str(weights.resolve())

    # the artifact is a MODEL_OR_ARTIFACT too: its source, weights and shape are reused (drift probe here)
    capsys.readouterr()
    out_yaml = tmp_path / "drift.yaml"
    code = main(["search", str(art), "--data", str(raw_npz), "--drift", "--steps", "4", "--no-progress",
                 "-o", str(out_yaml)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "drift probe" in out and "mJ" in out
    assert main(["compile", "models:mlp", *common, "--input-shape", "16,64", "--scheme", str(out_yaml),
                 "-o", str(tmp_path / "art2")]) == 0


def test_longer_runs_options(raw_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--lrs, --final-epochs, --budget-time and --batchnorm reach the search: the JSON records the final candidates,
    each run at the given rates, the device-seconds spent, and the learning rate chosen."""
    js = tmp_path / "s.json"
    code = main(["search", "models:mlp", "--data", str(raw_npz), "--budget-memory", "20KB", *FAST, "--lrs",
                 "0.02,0.05", "--final-epochs", "1", "--budget-time", "600", "--batchnorm", "both", "--json", str(js)])
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads(js.read_text())
    assert doc["lr"] in (0.02, 0.05) and doc["budget_time"] == 600 and 0 < doc["probe_seconds"] < 600
    ran = [f for f in doc["finalists"] if f["accuracy"] is not None]
    assert ran and all(set(f["grid"]) == {"0.02", "0.05"} for f in ran)
    assert not any(f["name"].endswith("+bn") for f in doc["finalists"])  # an MLP has no batch norm: one mode
    assert "final candidates" in out and "device-seconds" in out
    capsys.readouterr()
    assert main(["search", "models:mlp", "--data", str(raw_npz), "--budget-memory", "20KB", *FAST,
                 "--no-validate", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["finalists"] == []


def test_artifact_without_source_exits_2(raw_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pockprop.compiler.compile import compile

    torch.manual_seed(0)
    compile(models.mlp(hidden=(8,)), (torch.zeros(4, 64),), scheme="classifier").save(str(tmp_path / "a"))
    code = main(["search", str(tmp_path / "a"), "--data", str(raw_npz), "--budget-memory", "1MB", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "does not record how to rebuild its model" in err


def test_compile_weights_errors_name_the_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = {k: v.numpy() for k, v in models.mlp().state_dict().items()}
    state["layers.0.weight"] = np.zeros((3, 3), np.float32)
    state["extra.bias"] = np.zeros(2, np.float32)
    del state["layers.4.bias"]
    path = tmp_path / "bad.safetensors"
    safetensors.save(str(path), state)
    code = main(["compile", "models:mlp", "--weights", str(path), "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    assert "layers.4.bias" in err and "extra.bias" in err and "layers.0.weight [3, 3]" in err
    assert main(["compile", "models:mlp", "--weights", str(tmp_path / "none.safetensors"), "-o", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err


def tiny_mlp_builder(num_classes: int = 10) -> torch.nn.Module:
    """A model that is not in the zoo, named by the user as tests.search.test_search_cli:tiny_mlp_builder."""
    return models.mlp(hidden=(16, 8), num_classes=num_classes)


tiny_mlp_builder.default_input_shape = (16, 64)  # type: ignore[attr-defined]


def _edit_source(art: Path, **source: object) -> None:
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["source"] = {**manifest["source"], **source}
    (art / "manifest.json").write_text(json.dumps(manifest))


def test_an_artifact_never_makes_search_import_code(raw_npz: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    art, marker = tmp_path / "art", tmp_path / "PWNED"
    spec = "tests.search.test_search_cli:tiny_mlp_builder"
    assert main(["compile", spec, "-o", str(art)]) == 0
    drift = ["--data", str(raw_npz), "--drift", "--steps", "2", "--no-progress"]

    _edit_source(art, model="os:system", kwargs={"command": f"touch {marker}"})
    for named in ([], ["--model", spec]):
        assert main(["search", str(art), *drift, *named]) == 2
        err = capsys.readouterr().err
        assert not marker.exists(), "the manifest's source ran a command"
        assert ("cannot make pockprop import code" in err if not named else "was compiled from 'os:system'" in err)
        assert "Traceback" not in err

    _edit_source(art, model=spec, kwargs={})
    assert main(["search", str(art), *drift]) == 2  # not a zoo model: the user must name it
    assert f"--model {spec}" in capsys.readouterr().err
    assert main(["search", str(art), *drift, "--model", spec]) == 0
    assert "drift probe" in capsys.readouterr().out

    _edit_source(art, kwargs={"num_classes": {"__class__": "os.system"}, "x": 1})
    assert main(["search", str(art), *drift, "--model", spec]) == 2  # JSON values reach the builder, nothing else
    assert "unexpected keyword argument 'x'" in capsys.readouterr().err
    _edit_source(art, kwargs={}, weights={"path": str(raw_npz), "sha256": "0" * 64})
    assert main(["search", str(art), *drift, "--model", spec]) == 2
    assert "is not the file the artifact was compiled from" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--budget-memory", "1e400"], "must be a finite size"),
    (["--ratios", "1/8,2"], "outside (0, 1]"),
    (["--budget-params", "150%"], "--budget-params '150%'"),
    (["--model", "models:mlp"], "--model applies to an artifact"),
    (["-o", "{tmp}"], "-o {tmp}: is a folder"),
    (["--json", "{tmp}/no/such.json"], "does not exist"),
])
def test_search_options_are_checked_before_any_work(raw_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    args: list[str], needle: str) -> None:
    args = [a.format(tmp=tmp_path) for a in args]
    code = main(["search", "models:mlp", "--data", str(raw_npz), "--budget-memory", "2MB", *FAST, *args])
    err = capsys.readouterr().err
    assert code == 2 and needle.format(tmp=tmp_path) in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_search_artifact_refuses_model_options_it_would_ignore(raw_npz: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    art = tmp_path / "a"
    assert main(["compile", "models:mlp", "--input-shape", "16,64", "-o", str(art)]) == 0
    capsys.readouterr()
    assert main(["search", str(art), "--data", str(raw_npz), "--drift", "--input-shape", "4,64", "--num-classes", "3"]) == 2
    assert "--num-classes --input-shape: apply to a model spec" in capsys.readouterr().err
