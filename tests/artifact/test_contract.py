"""The artifact contract: its dtype table agrees with onnx, onnxruntime and numpy; the manifest round-trips."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from pockprop.artifact import contract
from pockprop.artifact.contract import DTYPES, Manifest, StateRole, SliceSpec, StateSpec, TensorSpec
from pockprop.errors import ArtifactError


@pytest.mark.parametrize("d", DTYPES, ids=[d.name for d in DTYPES])
def test_dtype_table_matches_onnx_and_numpy(d: contract.DType) -> None:
    assert helper.np_dtype_to_tensor_dtype(np.dtype(d.name)) == d.onnx
    assert TensorProto.DataType.Name(d.onnx).lower() in (d.name, {"float32": "float", "float64": "double"}.get(d.name))


def test_dtype_table_matches_onnxruntime() -> None:
    """onnxruntime names each dtype of the table as the table says (an Identity per dtype)."""
    names = [f"x{i}" for i in range(len(DTYPES))]
    g = helper.make_graph([helper.make_node("Identity", [n], [f"y{i}"]) for i, n in enumerate(names)], "g",
                          [helper.make_tensor_value_info(n, d.onnx, [2]) for n, d in zip(names, DTYPES)],
                          [helper.make_tensor_value_info(f"y{i}", d.onnx, [2]) for i, d in enumerate(DTYPES)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [a.type for a in sess.get_inputs()] == [d.ort for d in DTYPES]


def _manifest() -> Manifest:
    w = StateSpec("fc.weight", StateRole.PARAM, "fc.weight", contract.updated("fc.weight"), (2, 3), "float32",
                  param="fc.weight", slice=SliceSpec(1, 0, 3), full_shape=(2, 6))
    m = StateSpec(contract.optimizer_slot("momentum", "fc.weight"), StateRole.OPTIMIZER,
                  contract.optimizer_slot("momentum", "fc.weight"), "new/optimizer.momentum.fc.weight", (2, 3),
                  "float32", param="fc.weight", slot="momentum")
    return Manifest(model="m", data=[TensorSpec("x", (4, 6), "float32", {"scale": 0.5})],
                    labels=TensorSpec(contract.LABELS, (4,), "int64"), lr=contract.LearningRate(contract.LR, 0.1),
                    outputs=contract.Outputs(contract.LOSS, "fc"), state=[w, m],
                    files={n: "0" * 64 for n in (contract.TRAIN_STEP_FILE, contract.INFER_FILE, contract.STATE_FILE)},
                    pockprop_version="0.1.0", onnx={"opset": 17, "ir_version": 8}, loss={"name": "cross_entropy"})


def test_manifest_round_trips_through_json() -> None:
    m = _manifest()
    raw = m.dumps()
    again = Manifest.loads(raw, "m.json")
    assert again == m and again.dumps() == raw
    doc = json.loads(raw)
    assert list(doc) == ["format", "format_version", "pockprop_version", "onnx", "model", "graphs", "state_file",
                         "data", "labels", "lr", "outputs", "state", "scheme", "loss", "files"]
    assert doc["state"][1]["output"] == "new/optimizer.momentum.fc.weight" and doc["state"][0]["role"] == "param"
    assert again.state[0].parameter == "fc.weight" and again.state[0].parameter_shape == (2, 6)


@pytest.mark.parametrize("change, needle", [
    (lambda d: d["state"][1].update(param=5), "state 'optimizer.momentum.fc.weight': param must be a name, got 5"),
    (lambda d: d.update(loss="mse"), "loss: expected an object, got 'mse'"),
    (lambda d: d.update(state_file=["x"]), "state_file: expected a file name"),
    (lambda d: d.update(model=3), "model: expected a string, got 3"),
    (lambda d: d["state"][0]["slice"].update(stop=7),
     "state 'fc.weight': slice {'axis': 1, 'start': 0, 'stop': 7} does not fit full_shape [2, 6]"),
    (lambda d: d["labels"].update(shape=[True]), "labels 'labels': bad shape [True]"),
])
def test_malformed_fields_are_artifact_errors_naming_them(change, needle: str) -> None:
    doc = _manifest().to_json()
    change(doc)
    with pytest.raises(ArtifactError, match=f"^m.json: {re.escape(needle)}"):
        Manifest.from_json(doc, "m.json")


def test_optional_fields_may_be_absent() -> None:
    doc = {k: v for k, v in _manifest().to_json().items()
           if k not in ("pockprop_version", "onnx", "model", "scheme", "loss")}
    m = Manifest.from_json(doc, "m.json")
    assert m.model is None and m.loss == {} and dataclasses.replace(m, loss={"name": "cross_entropy"}).loss


def _two_inputs() -> dict:
    doc = _manifest().to_json()
    doc["data"] = [{"name": "input_ids", "shape": [4, 6], "dtype": "int64", "range": [0, 99]},
                   {"name": "attention_mask", "shape": [4, 6], "dtype": "int64"}]
    return doc


def test_several_inputs_round_trip_with_their_ranges() -> None:
    m = Manifest.from_json(_two_inputs(), "m.json")
    assert [(d.name, d.dtype, d.range, d.preprocess) for d in m.data] == [
        ("input_ids", "int64", (0, 99), None), ("attention_mask", "int64", None, None)]
    assert Manifest.loads(m.dumps(), "m.json") == m and m.input.name == "input_ids"


@pytest.mark.parametrize("change, needle", [
    (lambda d: d.update(data=[]), "data: expected a non-empty list of inputs"),
    (lambda d: d["data"][1].update(name="input_ids"), "data: input names must be distinct from each other, the "
                                                      "labels and the lr; 'input_ids' repeat"),
    (lambda d: d["data"][1].update(name="lr"), "data: input names must be distinct from each other, the labels "
                                               "and the lr; 'lr' repeat"),
    (lambda d: d["data"][1].update(shape=[3, 6]), "data: the inputs have different batch sizes [3, 4]"),
    (lambda d: d["data"][0].update(preprocess={"scale": 0.5}),
     "data 'input_ids': preprocess applies to float inputs, this one is int64"),
    (lambda d: d["data"][0].update(range=[5, 2]), "data 'input_ids': range must be [lowest, highest] integers"),
    (lambda d: d["data"][0].update(range=[0, 1.5]), "data 'input_ids': range must be [lowest, highest] integers"),
    (lambda d: d["data"][1].update(dtype="float32", range=[0, 1]),
     "data 'attention_mask': range applies to integer inputs, this one is float32"),
    (lambda d: d["data"][1].update(shape=[0, 6]), "data 'attention_mask': the first dimension (batch size) must be"),
])
def test_malformed_inputs_are_artifact_errors(change, needle: str) -> None:
    doc = _two_inputs()
    change(doc)
    with pytest.raises(ArtifactError, match=f"^m.json: {re.escape(needle)}"):
        Manifest.from_json(doc, "m.json")
