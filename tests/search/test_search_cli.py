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
