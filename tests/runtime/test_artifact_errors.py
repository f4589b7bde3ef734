"""Damaged artifacts: every kind is an ArtifactError naming the file, and exit code 2 from the CLI."""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import Callable

import pytest

from pockprop.cli import main
from pockprop.errors import ArtifactError
from pockprop.artifact.manifest import pack
from pockprop.runtime.trainer import Trainer


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _write_manifest(art: Path, m: dict) -> None:
    (art / "manifest.json").write_text(json.dumps(m, indent=2))


def _edit(art: Path, change: Callable[[dict], object]) -> None:
    m = _manifest(art)
    change(m)
    _write_manifest(art, m)


def _rehash(art: Path, name: str) -> None:
    """Make the manifest agree with a modified file, so the damage must be caught by a deeper check."""
    m = _manifest(art)
    m["files"][name] = hashlib.sha256((art / name).read_bytes()).hexdigest()
    _write_manifest(art, m)


def truncated_onnx(art: Path) -> str:
    p = art / "train_step.onnx"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return "train_step.onnx: sha256 mismatch"


def truncated_onnx_rehashed(art: Path) -> str:
    truncated_onnx(art)
    _rehash(art, "train_step.onnx")
    return "train_step.onnx: not a readable ONNX model"


def unknown_op_rehashed(art: Path) -> str:
    p = art / "train_step.onnx"
    p.write_bytes(p.read_bytes().replace(b'"\x04Relu', b'"\x04Reku'))  # NodeProto.op_type, same length
    _rehash(art, "train_step.onnx")
    return "train_step.onnx: onnxruntime cannot load it"


def flipped_weight_byte(art: Path) -> str:
    p = art / "state.safetensors"
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0x40
    p.write_bytes(bytes(raw))
    return "state.safetensors: sha256 mismatch"


def truncated_weights_rehashed(art: Path) -> str:
    p = art / "state.safetensors"
    p.write_bytes(p.read_bytes()[:-8])
    _rehash(art, "state.safetensors")
    return "state.safetensors: tensor"


def missing_file(art: Path) -> str:
    os.unlink(art / "infer.onnx")
    return "infer.onnx: missing"


def missing_manifest(art: Path) -> str:
    os.unlink(art / "manifest.json")
    return "manifest.json: missing"


def future_version(art: Path) -> str:
    _edit(art, lambda m: m.update(format_version=2))
    return "manifest.json: format version 2; this runtime reads version 1"


def manifest_not_json(art: Path) -> str:
    (art / "manifest.json").write_text('{"format": "pockprop-artifact", ')
    return "manifest.json: not valid JSON"


def edited_state_shape(art: Path) -> str:
    _edit(art, lambda m: m["state"][0].update(shape=[3, 9]))
    return "state.safetensors: state tensor '2.weight' should be float32[3, 9], is float32[3, 8]"


def edited_input_name(art: Path) -> str:
    _edit(art, lambda m: m["lr"].update(name="learning_rate"))
    return "train_step.onnx: the manifest names input 'learning_rate', which the graph does not have"


def edited_data_shape(art: Path) -> str:
    _edit(art, lambda m: m["data"][0].update(shape=[4, 7]))
    return "train_step.onnx: input 'input' is float32[4, 6] in the graph, float32[4, 7] in the manifest"


def dropped_state_entry(art: Path) -> str:
    _edit(art, lambda m: m.update(state=[s for s in m["state"] if s["name"] != "optimizer.momentum.2.bias"]))
    return "train_step.onnx: the graph needs inputs ['optimizer.momentum.2.bias'] that the manifest does not describe"


def unknown_preprocess(art: Path) -> str:
    _edit(art, lambda m: m["data"][0].update(preprocess={"sharpen": 2}))
    return "manifest.json: data preprocess: unknown steps ['sharpen']"


def non_finite_preprocess_scale(art: Path) -> str:
    _edit(art, lambda m: m["data"][0].update(preprocess={"scale": float("nan"), "antialias": True}))
    return "manifest.json: data preprocess: scale must be a finite non-zero number, got nan"


def resize_to_another_size(art: Path) -> str:
    _edit(art, lambda m: m["data"][0].update(preprocess={"resize": [32, 32], "mean": [0.1, 0.2]}))
    return "manifest.json: preprocess resize [32, 32] does not give the model's input [6]"


def path_in_files(art: Path) -> str:
    _edit(art, lambda m: m["files"].update({"../outside": "0" * 64}))
    return "manifest.json: files: '../outside' is not a plain file name"


def bad_slice(art: Path) -> str:
    _edit(art, lambda m: m["state"][0].update(param="2.weight", slice={"axis": 1, "start": 0, "stop": 9},
                                              full_shape=[3, 8]))
    return "manifest.json: state '2.weight': slice {'axis': 1, 'start': 0, 'stop': 9} does not fit full_shape [3, 8]"


def lr_initial_nan(art: Path) -> str:
    _edit(art, lambda m: m["lr"].update(initial=float("nan")))
    return "manifest.json: lr: initial must be a finite number >= 0, got nan"


def loss_a_string(art: Path) -> str:
    _edit(art, lambda m: m.update(loss="cross_entropy"))
    return "manifest.json: loss: expected an object, got 'cross_entropy'"


def loss_unknown(art: Path) -> str:
    _edit(art, lambda m: m.update(loss={"name": "hinge"}))
    return "manifest.json: loss: name 'hinge' is not one of cross_entropy, bce_with_logits, mse"


def loss_bad_smoothing(art: Path) -> str:
    _edit(art, lambda m: m["loss"].update(label_smoothing="lots"))
    return "manifest.json: loss: label_smoothing must be a number in [0, 1), got 'lots'"


DAMAGE: list[Callable[[Path], str]] = [
    truncated_onnx, truncated_onnx_rehashed, unknown_op_rehashed, flipped_weight_byte, truncated_weights_rehashed, missing_file,
    missing_manifest, future_version, manifest_not_json, edited_state_shape, edited_input_name, edited_data_shape,
    dropped_state_entry, unknown_preprocess, non_finite_preprocess_scale, resize_to_another_size, path_in_files, bad_slice,
    lr_initial_nan, loss_a_string, loss_unknown, loss_bad_smoothing]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__ for d in DAMAGE])
def test_damaged_artifact_is_an_artifact_error_naming_the_file(artifact, damage, capsys) -> None:
    art = artifact()
    needle = damage(art)
    with pytest.raises(ArtifactError) as info:
        Trainer.load(str(art))
    assert needle in str(info.value)
    assert str(art) in str(info.value)
    capsys.readouterr()
    assert main(["inspect", str(art)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_packed_artifact_loads_and_damage_is_caught(artifact, tmp_path: Path) -> None:
    art = artifact()
    packed = pack(str(art), str(tmp_path / "m.pockprop"))
    a, b = Trainer.load(str(art)), Trainer.load(packed)
    assert a.digest == b.digest
    raw = Path(packed).read_bytes()
    (tmp_path / "cut.pockprop").write_bytes(raw[:1700])
    with pytest.raises(ArtifactError, match="cut.pockprop"):
        Trainer.load(str(tmp_path / "cut.pockprop"))
    with tarfile.open(tmp_path / "evil.pockprop", "w") as tar:
        tar.add(str(art / "manifest.json"), arcname="../manifest.json")
    with pytest.raises(ArtifactError, match="not a plain file"):
        Trainer.load(str(tmp_path / "evil.pockprop"))
    with pytest.raises(ArtifactError, match="no such artifact"):
        Trainer.load(str(tmp_path / "nothing"))


def test_cli_json_error_and_exit_code(artifact, capsys) -> None:
    art = artifact()
    future_version(art)
    assert main(["inspect", str(art), "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["exit_code"] == 2 and "format version 2" in doc["error"]


def test_directory_files_are_checked_again_when_read_later(artifact) -> None:
    """A directory artifact's bytes are not kept after loading; a file changed afterwards fails its later read."""
    from pockprop.artifact.manifest import DirectoryFiles, open_artifact

    art = artifact()
    bundle = open_artifact(str(art))
    assert isinstance(bundle.files, DirectoryFiles) and set(bundle.files) == set(bundle.manifest.files)
    assert bundle.files["state.safetensors"] == (art / "state.safetensors").read_bytes()
    raw = bytearray((art / "state.safetensors").read_bytes())
    raw[-3] ^= 0x40
    (art / "state.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="state.safetensors: sha256 mismatch"):
        bundle.files["state.safetensors"]
    with pytest.raises(KeyError):
        bundle.files["not-listed.bin"]


@pytest.mark.parametrize("report, needle", [(b"{not json", "JSONDecodeError"), (b'{"scheme": 3}', "KeyError: 'full'"),
                                             (b"[1, 2]", "TypeError")], ids=["not-json", "no-fields", "a-list"])
def test_malformed_compile_report_is_one_line(artifact, capsys, report: bytes, needle: str) -> None:
    art = artifact()
    (art / "report.json").write_bytes(report)
    _edit(art, lambda m: m["files"].update({"report.json": hashlib.sha256(report).hexdigest()}))
    assert main(["inspect", str(art)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pockprop inspect: error: {art / 'report.json'}: not a readable compile report ({needle}")
    assert err.count("\n") == 1
