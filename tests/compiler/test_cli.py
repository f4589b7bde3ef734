"""`pockprop compile` and `pockprop ops` from the command line (in-process, via pockprop.cli.main)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pockprop.compiler.cli import ops_markdown
from pockprop.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_compile_writes_a_complete_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mlp"
    code = main(["compile", "models:mlp", "--num-classes", "5", "--input-shape", "4,64", "--optimizer", "adamw",
                 "--lr", "0.002", "--trainable", "layers.4.*", "-o", str(out)])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["infer.onnx", "state.safetensors", "train_step.onnx"]
    assert manifest["trainable"]["parameters"] == ["layers.4.weight", "layers.4.bias"]
    assert manifest["optimizer"]["name"] == "adamw" and manifest["lr"]["initial"] == 0.002
    assert manifest["data"][0]["shape"] == [4, 64]
    assert "trainable tensors" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [
    (["models:nope"], "unknown"),
    (["models:mlp", "--trainable", "conv.*"], "matches no parameter"),
    (["models:mlp", "--input-shape", "4,x"], "--input-shape"),
    (["nomodule_here:fn"], "nomodule_here"),
])
def test_compile_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    code = main(["compile", *args, "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "x").exists(), "a failed compile writes nothing"


def test_docs_ops_md_is_in_sync_with_the_registry() -> None:
    assert (ROOT / "docs" / "ops.md").read_text() == ops_markdown(), "regenerate: pockprop ops --markdown > docs/ops.md"


def test_ops_lists_every_rule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ops"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert "aten.linear.default" in listed["aten"] and "conv2d" in listed["ir"]


def test_compile_report_is_part_of_the_artifact_and_inspect_shows_it(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mlp"
    assert main(["compile", "models:mlp", "--input-shape", "4,64", "--scheme", "sparse", "--report", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "scheme sparse:" in printed and "backward MACs" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert "report.json" in manifest["files"]  # hashed like every other file
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["ratio_to_full"]["backward_macs"] < 1
    assert report["scheme"]["layers"]["layers.4"]["update"] == "full"
    assert main(["inspect", str(out)]) == 0
    assert "compile report" in capsys.readouterr().out


def test_compile_output_is_checked_before_compiling(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").write_text("a file")
    code = main(["compile", "models:mlp", "-o", str(tmp_path / "taken")])
    err = capsys.readouterr().err
    assert code == 2 and err == f"pockprop compile: error: -o {tmp_path / 'taken'}: exists and is not a folder\n"
    assert (tmp_path / "taken").read_text() == "a file"
    assert main(["compile", "models:mlp", "-o", str(tmp_path / "taken" / "art")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_compile_a_zoo_model_of_token_ids(tmp_path: Path) -> None:
    """A zoo builder whose default_input_dtype is int64 (models/hf.py) is traced with token ids, and the artifact
    declares an int64 input that the device runtime trains on."""
    import numpy as np

    from pockprop.runtime.trainer import Trainer

    out = tmp_path / "llama"
    kwargs = '{"vocab_size": 32, "hidden": 16, "layers": 1, "heads": 2, "max_positions": 8}'
    assert main(["compile", "models:llama_small", "--model-kwargs", kwargs, "--input-shape", "2,8", "--scheme",
                 "last-k:1", "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["data"][0]["shape"], manifest["data"][0]["dtype"]) == ([2, 8], "int64")
    assert manifest["labels"]["shape"] == [2, 8]
    rng = np.random.default_rng(0)
    loss = Trainer.load(str(out)).step(rng.integers(0, 32, (2, 8)), rng.integers(0, 32, (2, 8)))
    assert loss is not None and np.isfinite(loss)


def test_compile_lora_and_its_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mlp"
    assert main(["compile", "models:mlp", "--input-shape", "4,64", "--lora", "r=2,alpha=4,targets=layers.0,layers.2",
                 "--trainable", "layers.4.*", "--report", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lora layers.0: linear r=2 scale=2" in printed and "lora layers.2" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert [a["weight"] for a in manifest["adapters"]] == ["layers.0.weight", "layers.2.weight"]
    assert manifest["trainable"]["parameters"] == ["layers.4.weight", "layers.4.bias", "layers.0.lora_A.weight",
                                                   "layers.0.lora_B.weight", "layers.2.lora_A.weight",
                                                   "layers.2.lora_B.weight"]


@pytest.mark.parametrize("spec,needle", [("r=0,targets=fc", "r must be a positive integer"),
                                         ("r=2", "targets"), ("r=2,targets=fc,dropout=0.1", "dropout"),
                                         ("targets=q,r=2,beta", "KEY=VALUE")])
def test_compile_lora_parse_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str,
                                          needle: str) -> None:
    code = main(["compile", "models:mlp", "--lora", spec, "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and needle in err[-1] and "--lora" in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "x").exists()
