"""Trainer: IO-binding steps equal the documented plain-onnxruntime loop, the guard, schedules, bad data."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import onnxruntime as ort
import pytest

from pockprop.runtime import data
from pockprop.artifact import safetensors
from pockprop.errors import ArtifactError, DataError
from pockprop.runtime.schedule import Schedule
from pockprop.runtime.trainer import Trainer
from tests.runtime.conftest import batch


def _plain_loop(art, steps: int, lr: float) -> tuple[list[float], dict[str, np.ndarray]]:
    """docs/artifact.md's loop: sess.run with numpy feeds, state replaced by the outputs."""
    m = json.loads((art / "manifest.json").read_text())
    sess = ort.InferenceSession(str(art / "train_step.onnx"), providers=["CPUExecutionProvider"])
    state, _ = safetensors.load(str(art / "state.safetensors"))
    outputs = [m["outputs"]["loss"]] + [s["output"] for s in m["state"]]
    losses = []
    for i in range(steps):
        x, y = batch(i)
        feeds = {m["data"][0]["name"]: x, m["labels"]["name"]: y, m["lr"]["name"]: np.array(lr, np.float32)}
        feeds |= {s["input"]: state[s["name"]] for s in m["state"]}
        loss, *new = sess.run(outputs, feeds)
        state = {s["name"]: v for s, v in zip(m["state"], new)}
        losses.append(float(loss))
    return losses, state


@pytest.mark.parametrize("name", ["mlp", "mlp_adamw"])
def test_io_binding_steps_equal_the_plain_loop_bit_for_bit(artifact, name: str) -> None:
    art = artifact(name)
    trainer = Trainer.load(str(art))
    lr = float(trainer.manifest.lr.initial)
    losses = [trainer.step(*batch(i)) for i in range(6)]
    ref_losses, ref_state = _plain_loop(art, 6, lr)
    assert losses == ref_losses
    for k, v in ref_state.items():
        np.testing.assert_array_equal(trainer.state[k], v, err_msg=k)
    assert trainer.steps == 6 and trainer.rejected == 0


def test_state_lives_in_two_swapped_onnxruntime_buffers(artifact) -> None:
    trainer = Trainer.load(str(artifact()))
    ptrs = [[v.data_ptr() for v in bufs] for bufs in trainer._bufs]
    seen = set()
    for i in range(5):
        trainer.step(*batch(i))
        current = trainer._bufs[trainer._cur]
        seen.add(tuple(v.data_ptr() for v in current))
        # the numpy views used by the guard alias those buffers: no copy of the weights per step
        assert all(view.ctypes.data == v.data_ptr() for view, v in zip(trainer._views[trainer._cur], current))
    assert seen == {tuple(p) for p in ptrs}  # exactly the two preallocated sets, alternating
    assert [[v.data_ptr() for v in bufs] for bufs in trainer._bufs] == ptrs


def test_state_property_is_a_copy(artifact) -> None:
    trainer = Trainer.load(str(artifact()))
    before = trainer.state["2.weight"]
    kept = before.copy()
    trainer.step(*batch(0))
    trainer.step(*batch(1))
    np.testing.assert_array_equal(before, kept)  # a caller's array is not overwritten by later steps


def test_loss_falls_and_predict_any_batch_count(artifact, tmp_path) -> None:
    from tests.runtime.conftest import dataset_npz

    trainer = Trainer.load(str(artifact()))
    ds = data.load(str(dataset_npz(tmp_path / "d.npz", n=40)))
    before = trainer.evaluate(ds)
    for epoch in range(15):
        for xb, yb in data.batches(ds.x, ds.y, trainer.batch_size, seed=epoch):
            trainer.step(xb, yb)
    after = trainer.evaluate(ds)
    assert after["loss"] < before["loss"] and after["accuracy"] > before["accuracy"]
    # 10 rows: two full batches and one padded; equals running batch by batch
    pred = trainer.predict(ds.x[:10])
    assert pred.shape == (10, 3)
    np.testing.assert_array_equal(pred[:8], np.concatenate([trainer.predict(ds.x[:4]), trainer.predict(ds.x[4:8])]))
    assert trainer.evaluate(ds.x, ds.y) == after  # arrays and Dataset agree (no preprocessing here)
    assert trainer.evaluate(zip(np.split(ds.x, 10), np.split(ds.y, 10))) == after


def test_guard_rejects_nonfinite_batches_and_updates(artifact) -> None:
    trainer = Trainer.load(str(artifact()))
    trainer.step(*batch(0))
    good = trainer.state
    x, y = batch(1)
    for bad_x, lr, reason in [(np.where(np.arange(24).reshape(4, 6) == 5, np.nan, x), None, "NaN or Inf"),
                              (np.full_like(x, np.inf), None, "NaN or Inf"),
                              (x, float("nan"), "non-finite"),
                              (x, 1e38, "too large for its dtype"),  # its squared norm overflows float32
                              (x * 1e30, 1e30, "times the largest recent loss"),
                              (x, 1e6, "times its norm (limit 4")]:  # finite, but far beyond the weights
        assert trainer.step(bad_x.astype(np.float32), y, lr=lr) is None
        assert reason in trainer.last_rejection
        for k, v in good.items():
            np.testing.assert_array_equal(trainer.state[k], v, err_msg=k)
    assert trainer.rejected == 6 and trainer.steps == 1
    assert trainer.step(x, y) is not None  # and training goes on from the last good state
    assert trainer.steps == 2


def test_bad_data_names_expected_and_received(artifact) -> None:
    trainer = Trainer.load(str(artifact()))
    x, y = batch(0)
    before = trainer.state
    cases = [((x[:, :5], y), r"data: expected shape \[4, 6\] \(float32\), got \[4, 5\]"),
             ((x[:3], y), r"expected shape \[4, 6\].*got \[3, 6\]"),
             ((x.astype(np.int32), y), "data: expected dtype float32, got int32"),
             ((x, y[:3]), r"labels: expected shape \[4\] \(int64\), got \[3\]"),
             ((x, y.astype(np.float32)), "labels: expected dtype int64, got float32")]
    for args, pattern in cases:
        with pytest.raises(DataError, match=pattern):
            trainer.step(*args)
    with pytest.raises(DataError, match=r"expected shape \['N', 6\]"):
        trainer.predict(x[:, :2])
    for k, v in before.items():
        np.testing.assert_array_equal(trainer.state[k], v)
    assert trainer.steps == 0 and trainer.rejected == 0
    trainer.step(x.astype(np.float64), y.astype(np.int32))  # same-kind casts are fine


def test_step_checks_labels_and_names_the_sample(artifact, tmp_path) -> None:
    trainer = Trainer.load(str(artifact()))  # 3 classes, cross-entropy with ignore_index -100
    x, y = batch(0)
    before = trainer.state
    for label, message in ((-1, "label -1 at sample 2 is outside 0..2 (-100 is ignored)"),
                           (3, "label 3 at sample 2 is outside 0..2"), (-7, "label -7 at sample 2")):
        bad = y.copy()
        bad[2] = label
        with pytest.raises(DataError, match=re.escape(f"labels: {message}")):
            trainer.step(x, bad)
    assert trainer.steps == trainer.rejected == 0
    for k, v in before.items():
        np.testing.assert_array_equal(trainer.state[k], v)
    padded = y.copy()
    padded[1] = -100  # a position the loss ignores: trains on the others
    assert trainer.step(x, padded) is not None
    assert trainer.step(x, np.full(4, -100)) is None and "ignore_index" in trainer.last_rejection


def test_bce_targets_must_be_probabilities(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from pockprop.compiler.compile import compile

    torch.manual_seed(0)
    art = compile(torch.nn.Linear(6, 3), (torch.randn(4, 6),), labels=torch.rand(4, 3), loss="bce_with_logits",
                  name="tags").save(str(tmp_path / "tags"))
    trainer = Trainer.load(art)
    x = batch(0)[0]
    t = np.full((4, 3), 0.5, np.float32)
    assert trainer.step(x, t) is not None
    t[3, 1] = 1.5
    with pytest.raises(DataError, match=re.escape("labels: label 1.5 at sample 3, position [1] is outside [0, 1]")):
        trainer.step(x, t)
    t[3, 1] = np.nan  # like NaN data: the guard rejects the batch
    assert trainer.step(x, t) is None and "NaN" in trainer.last_rejection


def test_schedules() -> None:
    const = Schedule("constant", 0.1)
    assert [const.lr(s) for s in (0, 5, 500)] == [0.1, 0.1, 0.1]
    warm = Schedule("warmup", 0.1, warmup_steps=4)
    assert [round(warm.lr(s), 6) for s in range(6)] == [0.025, 0.05, 0.075, 0.1, 0.1, 0.1]
    cos = Schedule("cosine", 0.1, total_steps=10, min_lr=0.0)
    assert cos.lr(0) == 0.1 and math.isclose(cos.lr(5), 0.05) and cos.lr(10) == 0.0 and cos.lr(50) == 0.0
    cos_w = Schedule("cosine", 0.1, total_steps=12, warmup_steps=2)
    assert cos_w.lr(0) == 0.05 and cos_w.lr(2) == 0.1 and math.isclose(cos_w.lr(7), 0.05)
    step = Schedule("step", 0.1, step_size=3, gamma=0.5)
    assert [step.lr(s) for s in (0, 2, 3, 6)] == [0.1, 0.1, 0.05, 0.025]
    assert Schedule.from_json(step.to_json()) == step
    for bad in [dict(name="linear"), dict(name="cosine", total_steps=0), dict(name="step"), dict(name="warmup"),
                dict(name="constant", base_lr=float("nan"))]:
        with pytest.raises(ValueError):
            Schedule(**({"base_lr": 0.1} | bad))


def test_schedule_drives_the_step_lr(artifact) -> None:
    art = artifact()
    a, b = Trainer.load(str(art)), Trainer.load(str(art))
    a.schedule = Schedule("step", 0.1, step_size=2, gamma=0.5)
    for i in range(4):
        assert a.step(*batch(i)) == b.step(*batch(i), lr=0.1 * 0.5 ** (i // 2))
    np.testing.assert_array_equal(a.state["2.weight"], b.state["2.weight"])


@pytest.mark.parametrize("name", ["mlp", "sliced"])
def test_infer_signature_from_the_protobuf_matches_onnxruntime(artifact, name: str) -> None:
    """The load-time check of infer.onnx reads its signature with onnx_wire; it must be what onnxruntime sees."""
    from pockprop.artifact import onnx_wire

    raw = (artifact(name) / "infer.onnx").read_bytes()
    sess = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
    ins, outs, over = onnx_wire.signature(raw)
    for ours, theirs in ((ins, sess.get_inputs()), (outs, sess.get_outputs()), (over, sess.get_overridable_initializers())):
        assert [(a.name, list(a.shape)) for a in ours] == [(a.name, list(a.shape)) for a in theirs]
        assert [a.type for a in ours] == [{"tensor(float)": "float32", "tensor(int64)": "int64"}[a.type] for a in theirs]
    assert over, "the trainable parameters are overridable initializers"


def test_inference_session_is_made_on_first_use_from_the_verified_files(artifact) -> None:
    art = artifact("mlp")
    trainer = Trainer.load(str(art))
    assert trainer._infer_session is None  # training alone never loads a second copy of the weights
    trainer.step(*batch(0))
    x, _ = batch(1)
    first = trainer.predict(x)
    assert trainer._infer_session is not None and first.shape == (4, 3)
    again = Trainer.load(str(art))
    (art / "infer.onnx").write_bytes((art / "infer.onnx").read_bytes() + b"\x00")  # changed after loading
    with pytest.raises(ArtifactError, match="infer.onnx"):
        again.predict(x)
