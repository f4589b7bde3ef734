"""Large models: initializers in external data files, listed and hashed, shared by both graphs, streamed.

The external path is forced on tiny models with a low threshold (POCKPROP_EXTERNAL_DATA_BYTES) and must
behave exactly like the single-file artifact of the same compile: the same losses, states, predictions
and exported model, from a directory and from a pack.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pockprop.artifact import external, onnx_wire
from pockprop.artifact.durable import write_atomic
from pockprop.artifact.manifest import open_artifact, pack
from pockprop.compiler.compile import compile, compile_traced, trace_model
from pockprop.errors import ArtifactError
from pockprop.runtime.trainer import Trainer

transformers = pytest.importorskip("transformers")
VOCAB, T, N = 64, 8, 2


@pytest.fixture(scope="module")
def llama() -> object:
    """A tiny Llama (4 blocks, so the sparse preset slices a weight in each), traced once."""
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                                   num_hidden_layers=4, vocab_size=VOCAB, max_position_embeddings=T, use_cache=False)
    torch.manual_seed(0)
    return trace_model(transformers.LlamaForCausalLM(cfg), (torch.randint(0, VOCAB, (N, T)),))


def _batch(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    y = rng.integers(0, VOCAB, (N, T))
    y[0, :3] = -100  # padded labels
    return rng.integers(0, VOCAB, (N, T)), y


def _initializers(path: str) -> dict[str, np.ndarray]:
    model = onnx.load(path)  # external data resolved beside the file
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


def test_forced_external_data_behaves_like_the_single_file_artifact(llama, tmp_path: Path, monkeypatch) -> None:
    opt = {"name": "adamw", "lr": 1e-2}
    single = compile_traced(llama, scheme="sparse", optimizer=opt)
    assert single.external is None
    ref = Trainer.load(single.save(str(tmp_path / "single")))
    losses = [ref.step(*_batch(i)) for i in range(3)]
    x = _batch(9)[0]
    want = ref.predict(x)
    exported = ref.export_inference(str(tmp_path / "single.onnx"))  # one self-contained file
    assert not (tmp_path / "single.onnx.data").exists()

    monkeypatch.setenv(external.THRESHOLD_ENV, "0")
    monkeypatch.setattr(external, "FILE_BYTES", 8192)  # several weights files
    art = compile_traced(llama, scheme="sparse", optimizer=opt)
    d_ext = art.save(str(tmp_path / "ext"))
    manifest = json.loads((tmp_path / "ext" / "manifest.json").read_text())
    weights = sorted(f for f in os.listdir(d_ext) if f.startswith("weights-"))
    assert len(weights) > 1 and set(weights) < set(manifest["files"])
    files = art.files()
    for f in manifest["files"]:  # every file listed and hashed, and save wrote what files() holds
        data = (tmp_path / "ext" / f).read_bytes()
        assert hashlib.sha256(data).hexdigest() == manifest["files"][f] and files[f] == data, f
    for g in ("train_step.onnx", "infer.onnx"):
        model = onnx.load(os.path.join(d_ext, g), load_external_data=False)
        assert all(len(i.raw_data) < external.MIN_BYTES for i in model.graph.initializer)
    # a frozen weight read by both graphs is stored once, at an aligned offset
    refs = {g: {r.name: r for r in onnx_wire.external_tensors((tmp_path / "ext" / g).read_bytes())}
            for g in ("train_step.onnx", "infer.onnx")}
    shared = "model.layers.0.self_attn.q_proj.weight"
    assert refs["train_step.onnx"][shared] == refs["infer.onnx"][shared]
    assert all(r.offset % external.ALIGN_SMALL == 0 for g in refs.values() for r in g.values())

    for path in (d_ext, pack(d_ext, str(tmp_path / "ext.pockprop"))):
        t = Trainer.load(path)
        assert [t.step(*_batch(i)) for i in range(3)] == losses
        for k, v in ref.state.items():
            np.testing.assert_array_equal(t.state[k], v, err_msg=k)
        np.testing.assert_array_equal(t.predict(x), want)
        out = t.export_inference(str(tmp_path / "model.onnx"))  # above the threshold: model.onnx + model.onnx.data
        assert (tmp_path / "model.onnx.data").is_file()
        got, expect = _initializers(out), _initializers(exported)
        assert got.keys() == expect.keys()
        for k in expect:
            np.testing.assert_array_equal(got[k], expect[k], err_msg=k)
        sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(sess.run(None, {sess.get_inputs()[0].name: x})[0], want)


def _mlp_artifact(tmp_path: Path, monkeypatch) -> Path:
    """A tiny compiled MLP forced onto external data (weights-0.bin) by a zero threshold."""
    monkeypatch.setenv(external.THRESHOLD_ENV, "0")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 300), torch.nn.ReLU(), torch.nn.Linear(300, 3))
    return Path(compile(model, (torch.randn(4, 6),), trainable=["2.*"]).save(str(tmp_path / "a")))


def test_onnxruntime_reads_a_directory_s_external_files_and_they_are_checked_after(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    """From a directory onnxruntime reads the listed files itself (no values handed over); a file changed
    before that read is caught by the check after it."""
    from pockprop.runtime import trainer as trainer_mod

    d = _mlp_artifact(tmp_path, monkeypatch)
    weights = d / "weights-0.bin"
    real = trainer_mod._session

    def tamper(model, where, threads, ext=None, *rest):
        assert isinstance(model, str) and not ext
        weights.write_bytes(bytes(weights.stat().st_size))
        return real(model, where, threads, ext, *rest)

    monkeypatch.setattr(trainer_mod, "_session", tamper)
    with pytest.raises(ArtifactError, match="weights-0.bin: sha256 mismatch"):
        Trainer.load(str(d))


def test_layout_bounds_files_aligns_and_stores_an_array_once() -> None:
    layout = external.ExternalArrays(lambda k: f"w{k}", file_bytes=4096)
    a, b, big = np.arange(300, dtype=np.float32), np.ones(10, np.int64), np.zeros((3, 1 << 18), np.float32)
    pa, pb = layout.add(a), layout.add(b)
    assert layout.add(a) == pa and (pa.location, pa.offset, pa.length) == ("w0", 0, 1200)
    assert pb.offset == 1216 and pb.offset % external.ALIGN_SMALL == 0
    pbig = layout.add(big)  # over file_bytes: a file of its own
    assert (pbig.location, pbig.offset) == ("w1", 0)
    pc = layout.add(np.full(2000, 2, np.float32))  # does not fit in w1: the next file
    assert pc.location == "w2"
    blob = b"".join(layout.file_chunks("w0"))
    assert len(blob) == layout.sizes["w0"] == 1296
    np.testing.assert_array_equal(np.frombuffer(blob, np.float32, 300), a)
    np.testing.assert_array_equal(np.frombuffer(blob, np.int64, 10, 1216), b)


def test_pack_refuses_a_member_too_big_for_ustar_and_streams_checked_files(artifact, tmp_path: Path,
                                                                           monkeypatch) -> None:
    from pockprop.artifact import manifest as manifest_mod

    d = artifact()
    monkeypatch.setattr(manifest_mod, "USTAR_MAX", 100)
    with pytest.raises(ArtifactError, match=r"bytes: a packed artifact's files are smaller than 8 GiB each"):
        pack(str(d), str(tmp_path / "p.pockprop"))
    monkeypatch.undo()
    out = tmp_path / "out" / "p.pockprop"
    out.parent.mkdir()
    out.write_bytes(b"previous")
    bundle = open_artifact(str(d))  # verified; then a file changes before pack reads it
    (d / "state.safetensors").write_bytes(b"changed")
    monkeypatch.setattr(manifest_mod, "open_artifact", lambda p: bundle)
    with pytest.raises(ArtifactError, match="state.safetensors: sha256 mismatch"):
        pack(str(d), str(out))
    assert out.read_bytes() == b"previous" and os.listdir(out.parent) == ["p.pockprop"]


def test_write_atomic_streams_chunks_and_returns_their_sha256(tmp_path: Path) -> None:
    path = tmp_path / "f"
    assert write_atomic(str(path), iter([b"ab", memoryview(b"cd")])) == hashlib.sha256(b"abcd").hexdigest()

    def broken():
        yield b"xy"
        raise ValueError("producer failed")

    with pytest.raises(ValueError, match="producer failed"):
        write_atomic(str(path), broken())
    assert path.read_bytes() == b"abcd" and os.listdir(tmp_path) == ["f"]


def test_a_compiled_artifact_s_external_files_are_checked_like_every_file(tmp_path: Path, monkeypatch) -> None:
    d = _mlp_artifact(tmp_path, monkeypatch)
    weights = d / "weights-0.bin"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # tampered
    with pytest.raises(ArtifactError, match="weights-0.bin: sha256 mismatch"):
        Trainer.load(str(d))
    weights.write_bytes(good)
    Trainer.load(str(d))

    manifest = json.loads((d / "manifest.json").read_text())
    extra = tmp_path / "extra.pockprop"  # a pack with one external file more than the manifest lists
    with tarfile.open(extra, "w:", format=tarfile.USTAR_FORMAT) as tar:
        for name in ["manifest.json", *manifest["files"]]:
            tar.add(d / name, name)
        info = tarfile.TarInfo("weights-1.bin")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(ArtifactError, match="holds 'weights-1.bin', which the manifest does not list"):
        Trainer.load(str(extra))

    del manifest["files"]["weights-0.bin"]  # unlisted: the graphs' references to it are refused
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="keeps its data in 'weights-0.bin', which is not a file the manifest lists"):
        Trainer.load(str(d))


def test_export_command_writes_and_self_checks_external_data(tmp_path: Path, monkeypatch, capsys) -> None:
    from pockprop.cli import main

    d = _mlp_artifact(tmp_path, monkeypatch)
    out = tmp_path / "m.onnx"
    assert main(["export", str(d), "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data = tmp_path / "m.onnx.data"
    assert doc["data"] == str(data) and doc["bytes"] == out.stat().st_size + data.stat().st_size
    assert doc["max_abs_diff_vs_predict"] < 1e-5
    monkeypatch.setenv(external.THRESHOLD_ENV, str(1 << 30))  # below the threshold: one file, no data reported
    assert main(["export", str(d), "-o", str(tmp_path / "s.onnx"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["data"] is None and doc["bytes"] == (tmp_path / "s.onnx").stat().st_size


def test_a_weights_file_changed_in_place_after_load_is_refused_and_a_replaced_one_is_harmless(tmp_path: Path,
                                                                                               monkeypatch) -> None:
    """onnxruntime maps a directory's external files and reads them as it runs: a file written in place
    would change the model under a running trainer, so the trainer refuses to go on; a file replaced by a
    new one (rename) leaves the mapped one intact."""
    d = _mlp_artifact(tmp_path, monkeypatch)
    weights = d / "weights-0.bin"
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    y = np.array([0, 1, 2, 0])
    ref = Trainer.load(str(d))
    want = [ref.step(x, y), ref.step(x, y)]

    t = Trainer.load(str(d))
    t.predict(x)  # both sessions made
    good = weights.read_bytes()
    os.replace(weights, tmp_path / "old.bin")
    weights.write_bytes(bytes(len(good)))  # a new file under the name: the mapped one is unchanged
    assert [t.step(x, y), t.step(x, y)] == want

    os.replace(tmp_path / "old.bin", weights)
    t = Trainer.load(str(d))
    assert t.step(x, y) == want[0]
    t.predict(x)
    with open(weights, "r+b") as f:  # in place: the mapped file itself changes
        f.write(bytes(len(good)))
    for run in (lambda: t.step(x, y), lambda: t.predict(x)):
        with pytest.raises(ArtifactError, match="weights-0.bin: changed in place since the artifact was loaded"):
            run()
