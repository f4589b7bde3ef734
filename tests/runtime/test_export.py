"""export_inference: a self-contained ONNX model (checked by onnx's checker) whose outputs equal predict;
sliced parameters are written back into their full tensors; the wire-format editor on its own."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pockprop.artifact import onnx_wire
from pockprop.artifact.contract import StateRole
from pockprop.runtime.trainer import Trainer


def _train(art: Path, steps: int = 5) -> Trainer:
    trainer = Trainer.load(str(art))
    shape = trainer.manifest.input.shape
    rng = np.random.default_rng(1)
    for i in range(steps):
        x = rng.standard_normal(shape).astype(np.float32)
        assert trainer.step(x, rng.integers(0, 3, shape[0])) is not None
    return trainer


def _run(path: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]  # the weights are baked in, not inputs
    return sess.run(None, {"input": x})[0]


@pytest.mark.parametrize("name", ["mlp", "mlp_adamw", "cnn", "sliced"])
def test_exported_model_equals_predict(artifact, tmp_path: Path, name: str) -> None:
    art = artifact(name)
    trainer = _train(art)
    before = (art / "infer.onnx").read_bytes()
    path = trainer.export_inference(str(tmp_path / "model.onnx"))
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert not any(i.HasField("data_location") and i.data_location == TensorProto.EXTERNAL
                   for i in model.graph.initializer)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["pockprop.steps"] == "5" and meta["pockprop.artifact_sha256"] == trainer.digest
    shape = trainer.manifest.input.shape
    x = np.random.default_rng(2).standard_normal([9, *shape[1:]]).astype(np.float32)
    want = trainer.predict(x)
    got = np.concatenate([_run(path, x[i:i + shape[0]]) for i in (0, 4)] +
                         [_run(path, np.concatenate([x[8:], x[8:].repeat(shape[0] - 1, 0)]))[:1]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (art / "infer.onnx").read_bytes() == before  # the artifact itself is untouched
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for e in trainer.manifest.state:
        if e.role == StateRole.PARAM and e.slice is None:
            np.testing.assert_array_equal(weights[e.name], trainer.state[e.name])


def test_slices_are_written_back_into_the_full_tensor(artifact, tmp_path: Path) -> None:
    art = artifact("sliced")
    trainer = _train(art)
    entry = next(e for e in trainer.manifest.state if e.slice is not None)
    sl = entry.slice
    idx = list(sl.index(len(entry.full_shape)))
    rest = list(idx)
    rest[sl.axis] = slice(sl.stop, None)
    frozen = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(art / "infer.onnx")).graph.initializer}
    model = onnx.load(trainer.export_inference(str(tmp_path / "m.onnx")))
    full = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}[entry.parameter]
    assert full.shape == entry.full_shape
    np.testing.assert_array_equal(full[tuple(idx)], trainer.state[entry.name])  # trained part
    np.testing.assert_array_equal(full[tuple(rest)], frozen[entry.parameter][tuple(rest)])  # frozen part
    assert not np.array_equal(full[tuple(idx)], frozen[entry.parameter][tuple(idx)])  # it did train


# -- the wire-format editor ----------------------------------------------------------------------
def _model(weight: TensorProto, extra_inputs: bool = True) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    shift = numpy_helper.from_array(np.array([1, 2], np.int64), "shift")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]),
                               helper.make_node("Cast", ["shift"], ["s"], to=TensorProto.FLOAT),
                               helper.make_node("Add", ["m", "s"], ["y"])],
                              "g", [x, w] if extra_inputs else [x], [y], [weight, shift])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


@pytest.mark.parametrize("storage", ["raw_data", "float_data"])
def test_wire_reads_and_replaces_initializers(storage: str) -> None:
    w0 = np.arange(6, dtype=np.float32).reshape(3, 2)
    weight = numpy_helper.from_array(w0, "w") if storage == "raw_data" else \
        helper.make_tensor("w", TensorProto.FLOAT, [3, 2], w0.ravel().tolist())
    model = _model(weight)
    got = onnx_wire.initializers(model)
    np.testing.assert_array_equal(got["w"], w0)
    np.testing.assert_array_equal(got["shift"], [1, 2])
    assert onnx_wire.graph_inputs(model) == ["x", "w"]
    w1 = -w0 * 0.5
    new = onnx_wire.replace_initializers(model, {"w": w1}, metadata={"k": "v"})
    proto = onnx.load_from_string(new)
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["x"]
    np.testing.assert_array_equal(numpy_helper.to_array(proto.graph.initializer[0]), w1)
    assert {p.key: p.value for p in proto.metadata_props} == {"k": "v"}
    x = np.ones((2, 3), np.float32)
    out = ort.InferenceSession(new, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, x @ w1 + [1, 2])


def test_wire_errors() -> None:
    model = _model(numpy_helper.from_array(np.zeros((3, 2), np.float32), "w"))
    with pytest.raises(onnx_wire.WireError, match="shape \\[3, 2\\], new value has shape \\[2, 3\\]"):
        onnx_wire.replace_initializers(model, {"w": np.zeros((2, 3), np.float32)})
    with pytest.raises(onnx_wire.WireError, match="ONNX data type 1, new value is float64"):
        onnx_wire.replace_initializers(model, {"w": np.zeros((3, 2))})
    with pytest.raises(onnx_wire.WireError, match="no initializer named nope"):
        onnx_wire.replace_initializers(model, {"nope": np.zeros(1, np.float32)})
    with pytest.raises(onnx_wire.WireError):
        onnx_wire.initializers(model[: len(model) - 7])
    external = numpy_helper.from_array(np.zeros((3, 2), np.float32), "w")
    external.ClearField("raw_data")
    external.data_location = TensorProto.EXTERNAL
    external.external_data.add(key="location", value="weights.bin")
    with pytest.raises(onnx_wire.WireError, match="external file"):
        onnx_wire.initializers(_model(external))


def test_wire_varints_round_trip() -> None:
    for n in [0, 1, 127, 128, 300, 2**31, 2**63 - 1, 2**64 - 1]:
        enc = onnx_wire._encode_varint(n)
        assert onnx_wire._varint(enc, 0) == (n, len(enc))
    neg = onnx.load_from_string(_model(numpy_helper.from_array(np.zeros((3, 2), np.float32), "w")))
    neg.graph.initializer.append(numpy_helper.from_array(np.array([-5, 2**40], np.int64), "big"))
    t = helper.make_tensor("ints", TensorProto.INT64, [2], [-3, 7])
    neg.graph.initializer.append(t)
    got = onnx_wire.initializers(neg.SerializeToString(), {"big", "ints"})
    assert got["big"].tolist() == [-5, 2**40] and got["ints"].tolist() == [-3, 7]
