"""ONNX external data: listed files are hashed and used, whatever the working directory; nothing else is.

onnx's own converter writes the graphs' initializers to side files; the manifest lists those files. The
loader reads them through the verified bundle and hands their values to onnxruntime, so a graph cannot
pull in an unlisted file of the artifact folder, nor resolve a file against the process's working directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data, set_external_data

from pockprop.artifact import onnx_wire
from pockprop.artifact.manifest import pack
from pockprop.errors import ArtifactError
from pockprop.runtime.trainer import Trainer
from tests.runtime.conftest import batch


def _list(art: Path, *names: str) -> None:
    m = json.loads((art / "manifest.json").read_text())
    for name in names:
        m["files"][name] = hashlib.sha256((art / name).read_bytes()).hexdigest()
    (art / "manifest.json").write_text(json.dumps(m, indent=2))


def externalize(art: Path, graph: str, location: str, listed: bool = True) -> None:
    """Move the graph's bigger initializers (the weights; not the small shape constants that onnxruntime's
    shape inference must read) to the side file `location`, and rehash (listing the side file or not)."""
    model = onnx.load(str(art / graph))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=location, size_threshold=64)
    onnx.save(model, str(art / graph))
    assert any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
    _list(art, graph, *([location] if listed else []))


@pytest.mark.parametrize("name", ["mlp", "sliced"])
def test_listed_external_data_trains_predicts_and_exports_from_any_directory(artifact, tmp_path: Path,
                                                                            monkeypatch, name: str) -> None:
    ref_art, art = artifact(name), tmp_path / "ext"
    shutil.copytree(ref_art, art)
    externalize(art, "train_step.onnx", "train.bin")
    externalize(art, "infer.onnx", "infer.bin")
    packed = pack(str(art), str(tmp_path / "ext.pockprop"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "infer.bin").write_bytes(b"decoy" * 100)  # what a working-directory lookup would find
    monkeypatch.chdir(elsewhere)
    ref = Trainer.load(str(ref_art))
    losses = [ref.step(*batch(i)) for i in range(3)]
    x = batch(9)[0]
    want = ref.predict(x)
    for path in (str(art), packed):
        t = Trainer.load(path)
        assert [t.step(*batch(i)) for i in range(3)] == losses
        for k, v in ref.state.items():
            np.testing.assert_array_equal(t.state[k], v, err_msg=k)
        np.testing.assert_array_equal(t.predict(x), want)
        exported = onnx.load(t.export_inference(str(tmp_path / "model.onnx")))  # self-contained
        assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in exported.graph.initializer)
        sess = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(sess.run(None, {"input": x})[0], want, rtol=1e-6, atol=1e-6)


def test_unlisted_external_data_is_refused(artifact) -> None:
    art = artifact()
    externalize(art, "train_step.onnx", "side.bin", listed=False)
    with pytest.raises(ArtifactError, match=r"train_step.onnx: initializer '.*' keeps its data in 'side.bin', which is "
                                            "not a file the manifest lists"):
        Trainer.load(str(art))


def test_external_data_outside_the_artifact_is_refused(artifact, tmp_path: Path) -> None:
    art = artifact()
    externalize(art, "infer.onnx", "w.bin", listed=False)
    model = onnx.load(str(art / "infer.onnx"), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../w.bin"
    os.replace(art / "w.bin", tmp_path / "w.bin")
    onnx.save(model, str(art / "infer.onnx"))
    _list(art, "infer.onnx")
    with pytest.raises(ArtifactError, match=r"infer.onnx: initializer '.*' keeps its data in '../w.bin', which is not"):
        Trainer.load(str(art))


def test_external_data_that_does_not_fit_its_tensor_is_refused(artifact) -> None:
    art = artifact()
    externalize(art, "train_step.onnx", "train.bin")
    (art / "train.bin").write_bytes((art / "train.bin").read_bytes()[:-4])
    _list(art, "train.bin")
    with pytest.raises(ArtifactError, match=r"train_step.onnx: initializer '.*': \d+ bytes at offset \d+ of 'train.bin'"):
        Trainer.load(str(art))


def test_external_tensors_outside_main_initializers_are_refused() -> None:
    """A Constant node's value kept externally would be read by onnxruntime itself: refused."""
    value = numpy_helper.from_array(np.ones(4, np.float32), "c")
    set_external_data(value, location="c.bin")
    value.data_location = onnx.TensorProto.EXTERNAL
    value.ClearField("raw_data")
    g = helper.make_graph([helper.make_node("Constant", [], ["y"], value=value)], "g", [],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])])
    with pytest.raises(onnx_wire.WireError, match="a tensor in a node attribute keeps its data in an external file"):
        onnx_wire.external_tensors(helper.make_model(g).SerializeToString())
