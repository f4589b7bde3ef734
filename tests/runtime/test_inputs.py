"""A model with several integer inputs on the device: token ids and a mask fed by position or name, checked
(dtype, shape, the embedding's id range) with one-line errors; evaluation of padded sequences exactly as
the training graph's loss; .npz data naming the inputs; export and its self-check with both inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from pockprop.cli import main
from pockprop.errors import DataError
from pockprop.runtime.loop import fit
from pockprop.runtime.trainer import Trainer, metrics
from tests.compiler.token_models import CLASSES, VOCAB, padded_batch


def _batch(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(t.numpy() for t in padded_batch(seed))  # type: ignore[return-value]


def test_step_takes_a_tuple_or_a_dict(artifact) -> None:
    by_position, by_name = (Trainer.load(str(artifact("tagger")), threads=1) for _ in range(2))
    for seed in range(3):
        ids, mask, y = _batch(seed)
        a = by_position.step((ids.astype(np.int32), mask.astype(bool)), y)  # integer and bool arrays are cast
        b = by_name.step({"mask": mask, "ids": ids}, y)
        assert a == b and a is not None
    for k, v in by_position.state.items():
        np.testing.assert_array_equal(v, by_name.state[k], err_msg=k)


def test_bad_inputs_are_one_line_errors_and_change_nothing(artifact) -> None:
    trainer = Trainer.load(str(artifact("tagger")), threads=1)
    ids, mask, y = _batch(0)
    high, low = ids.copy(), ids.copy()
    high[1, 2], low[2, 0] = VOCAB, -1
    cases = [(ids, r"data: the model takes 2 inputs \(ids, mask\); give a tuple in that order or a dict by name"),
             ({"ids": ids}, r"data: the model's inputs are ids, mask; missing mask$"),
             ({"ids": ids, "mask": mask, "extra": ids}, "unknown extra"),
             ((ids, mask, mask), r"the model takes 2 inputs \(ids, mask\), got 3"),
             ((ids.astype(np.float32), mask), "data 'ids': expected dtype int64, got float32"),
             ((ids, mask[:, :2]), r"data 'mask': expected shape \[3, 5\] \(int64\), got \[3, 2\]"),
             ((high, mask), r"data 'ids': value 11 at sample 1, position \[2\] is outside 0\.\.10, .*'ids'"),
             ((low, mask), r"data 'ids': value -1 at sample 2, position \[0\] is outside 0\.\.10")]
    before = trainer.state
    for given, pattern in cases:
        with pytest.raises(DataError, match=pattern) as info:
            trainer.step(given, y)
        assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="different numbers of samples"):
        trainer.predict((ids, mask[:2]))
    wrong = y.copy()
    wrong[2, 1] = CLASSES
    with pytest.raises(DataError, match=rf"^labels: label {CLASSES} at sample 2, position \[1\] is outside "
                                        rf"0\.\.{CLASSES - 1} \(-100 is ignored\)$"):
        trainer.step((ids, mask), wrong)
    for k, v in before.items():
        np.testing.assert_array_equal(trainer.state[k], v, err_msg=k)
    assert trainer.steps == 0 and trainer.rejected == 0


def _torch_metrics(logits: np.ndarray, y: np.ndarray, smoothing: float = 0.0) -> tuple[float, float]:
    z, t = torch.from_numpy(logits).double(), torch.from_numpy(y)
    loss = F.cross_entropy(z.reshape(-1, z.shape[-1]), t.reshape(-1), label_smoothing=smoothing).item()
    counted = t != -100
    return loss, float((z.argmax(-1) == t)[counted].double().mean())


def test_evaluate_counts_tokens_as_the_step_does(artifact) -> None:
    trainer = Trainer.load(str(artifact("tagger")), threads=1)
    parts = [_batch(s) for s in range(3)]
    ids, mask, y = (np.concatenate([p[i] for p in parts])[:7] for i in range(3))  # 7 rows: a padded last batch
    logits = trainer.predict({"ids": ids, "mask": mask})
    assert logits.shape == (7, ids.shape[1], CLASSES)
    np.testing.assert_allclose(logits[3:6], trainer.predict((ids[3:6], mask[3:6])), rtol=1e-6)
    m = trainer.evaluate((ids, mask), y)
    loss, accuracy = _torch_metrics(logits, y)
    assert m["samples"] == 7 and m["tokens"] == int((y != -100).sum()) < y.size
    np.testing.assert_allclose([m["loss"], m["accuracy"]], [loss, accuracy], rtol=1e-12)
    # the training graph's loss is the same number on a batch of the compiled size, before it steps
    step_loss = trainer.step((ids[:3], mask[:3]), y[:3])
    np.testing.assert_allclose(metrics(trainer.manifest.loss, logits[:3], y[:3])["loss"], step_loss, rtol=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_metrics_ignore_labels_like_torch(smoothing: float) -> None:
    rng = np.random.default_rng(0)
    loss = {"name": "cross_entropy", "ignore_index": -100} | ({"label_smoothing": smoothing} if smoothing else {})
    for shape in ((6, 5), (3, 4, 5)):
        z = rng.standard_normal(shape)
        y = rng.integers(0, 5, shape[:-1])
        y.reshape(-1)[::3] = -100
        m = metrics(loss, z, y)
        np.testing.assert_allclose([m["loss"], m["accuracy"]], _torch_metrics(z, y, smoothing), rtol=1e-12)
        assert ("tokens" in m) == (len(shape) == 3)
    assert np.isnan(metrics(loss, z, np.full((3, 4), -100))["loss"])  # none counted: NaN, as torch and the step


def test_npz_arrays_are_named_by_the_inputs(artifact, tmp_path: Path) -> None:
    trainer = Trainer.load(str(artifact("tagger")), threads=1)
    parts = [_batch(s) for s in range(4)]
    ids, mask, y = (np.concatenate([p[i] for p in parts]) for i in range(3))
    np.savez(tmp_path / "d.npz", ids=ids, mask=mask, labels=y)
    record = fit(trainer, trainer.pipeline.load(str(tmp_path / "d.npz")), epochs=2)
    assert record["steps"] == 8 and trainer.evaluate(str(tmp_path / "d.npz"))["tokens"] == int((y != -100).sum())

    np.savez(tmp_path / "missing.npz", ids=ids, y=y)
    np.savez(tmp_path / "both.npz", ids=ids, mask=mask, y=y, labels=y)
    np.savez(tmp_path / "extra.npz", ids=ids, mask=mask, token_type_ids=mask, y=y)
    bad = ids.copy()
    bad[-1, -1] = VOCAB + 3
    np.savez(tmp_path / "bad.npz", ids=bad, mask=mask, y=y)
    (tmp_path / "d.csv").write_text("a,b,label\n1,2,0\n")
    for name, pattern in [("missing.npz", r"missing.npz: the model's inputs are ids, mask; no array named mask "
                                          r"\(found ids, y\)"),
                          ("both.npz", "both 'y' and 'labels'"),
                          ("extra.npz", r"extra.npz: the model's inputs are ids, mask; it takes no token_type_ids"),
                          ("d.csv", r"d.csv: the model takes 2 inputs \(ids, mask\); give an .npz")]:
        with pytest.raises(DataError, match=pattern):
            trainer.pipeline.load(str(tmp_path / name))
    steps = trainer.steps
    with pytest.raises(DataError, match=r"bad.npz 'ids': value 14 at sample 11, position \[4\] is outside 0..10"):
        fit(trainer, trainer.pipeline.load(str(tmp_path / "bad.npz")), epochs=1)  # refused before the first step
    assert trainer.steps == steps


def test_one_input_npz_takes_x_or_the_input_name(artifact, tmp_path: Path) -> None:
    trainer = Trainer.load(str(artifact("mlp")), threads=1)
    x = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    for key in ("x", trainer.manifest.input.name):
        np.savez(tmp_path / f"{key}.npz", **{key: x}, labels=np.zeros(8, np.int64))
        ds = trainer.pipeline.load(str(tmp_path / f"{key}.npz"))
        np.testing.assert_array_equal(ds.x, x)
        assert ds.y is not None
    np.savez(tmp_path / "other.npz", features=x)
    with pytest.raises(DataError, match=r"expected an array named 'input' or 'x' \(and 'y' for labels\)"):
        trainer.pipeline.load(str(tmp_path / "other.npz"))


def test_export_and_its_self_check_feed_both_inputs(artifact, tmp_path: Path, capsys) -> None:
    art = artifact("tagger")
    trainer = Trainer.load(str(art), threads=1)
    ids, mask, y = _batch(1)
    trainer.step((ids, mask), y)
    path = trainer.export_inference(str(tmp_path / "m.onnx"))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["ids", "mask"]
    got = sess.run(None, {"ids": ids, "mask": mask})[0]
    np.testing.assert_allclose(got, trainer.predict((ids, mask)), rtol=1e-5, atol=1e-6)
    assert main(["export", str(art), "-o", str(tmp_path / "cli.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_diff_vs_predict"] < 1e-5
    assert main(["inspect", str(art)]) == 0
    out = capsys.readouterr().out
    assert "input  ids: int64[3, 5], values 0..10" in out and "input  mask: int64[3, 5]\n" in out


LINES = ["the cat sat on the mat", "the dog sat on the rug", "a cat ran to the dog", "a dog ran to the cat",
         "the bird sat on the cat", "a bird ran to the mat", "the dog ran to the rug", "a cat sat on a dog"] * 3


def test_text_to_npz_and_training_without_torch(artifact, tmp_path: Path) -> None:
    """runtime.text on the device: a tokenizer trained on the text at hand, padded ids, mask and next-token
    labels in an .npz named by the inputs, `pockprop train` on it; torch and onnx never imported."""
    pytest.importorskip("tokenizers")
    from tests.runtime.test_no_torch import _run

    art, corpus = artifact("token_lm"), tmp_path / "corpus.txt"
    corpus.write_text("\n".join(LINES) + "\n")
    out = _run(f"""
        import json, numpy as np
        from pockprop.cli import main
        from pockprop.runtime import text
        from pockprop.runtime.trainer import Trainer
        t = Trainer.load({str(art)!r})
        ids_spec = t.manifest.data[0]
        lines = open({str(corpus)!r}).read().splitlines()
        tok = text.train_tokenizer(lines, vocab_size=ids_spec.range[1] + 1, kind="wordlevel")
        tok.save({str(tmp_path / "tokenizer.json")!r})
        tok = text.load_tokenizer({str(tmp_path / "tokenizer.json")!r})
        ids, mask = text.encode(tok, lines, length=ids_spec.shape[1])
        labels = text.next_token_labels(ids, mask)
        np.savez({str(tmp_path / "d.npz")!r}, ids=ids, mask=mask, labels=labels)
        before = t.evaluate({str(tmp_path / "d.npz")!r})
        assert main(["train", {str(art)!r}, "--data", {str(tmp_path / "d.npz")!r}, "--epochs", "15",
                     "--no-progress", "--export", {str(tmp_path / "m.onnx")!r}]) == 0
        banned = sorted(m for m in sys.modules if m.split(".")[0] in {{"torch", "onnx", "yaml", "transformers"}})
        print(json.dumps({{"before": before, "banned": banned, "padded": int((mask == 0).sum()),
                          "ignored": int((labels == -100).sum())}}))
    """)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["banned"] == [] and res["padded"] > 0 and res["ignored"] > res["padded"]
    trainer = Trainer.load(str(art), threads=1)
    model = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    d = np.load(tmp_path / "d.npz")
    logits = np.concatenate([model.run(None, {"ids": d["ids"][i:i + 4], "mask": d["mask"][i:i + 4]})[0]
                             for i in range(0, len(LINES), 4)])
    after = metrics(trainer.manifest.loss, logits, d["labels"])
    assert after["tokens"] == res["before"]["tokens"] and after["loss"] < 0.3 * res["before"]["loss"], (res, after)


def test_text_helpers(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    from pockprop.runtime import text

    tok = text.train_tokenizer(LINES, vocab_size=40, kind="bpe")
    assert tok.get_vocab_size() <= 40 and text.pad_id(tok) == 0 and tok.token_to_id(text.UNK) == 1
    ids, mask = text.encode(tok, ["the cat sat on the mat and ran", "a dog"], length=4)
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == (2, 4)
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [1, 1, 0, 0]])  # the first is truncated
    assert (ids[1, 2:] == 0).all()
    np.testing.assert_array_equal(text.next_token_labels(ids, mask),
                                  [[ids[0, 1], ids[0, 2], ids[0, 3], -100], [ids[1, 1], -100, -100, -100]])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="bad.json: not a readable tokenizer.json"):
        text.load_tokenizer(str(tmp_path / "bad.json"))
    with pytest.raises(DataError, match="vocab_size must be at least 3"):
        text.train_tokenizer(LINES, vocab_size=2)


def test_class_labels_at_ignore_index_do_not_count(artifact) -> None:
    """Per-sample class labels too: a sample labelled -100 is skipped by the step and by evaluate alike."""
    trainer = Trainer.load(str(artifact("mlp")), threads=1)
    x = np.random.default_rng(1).standard_normal((trainer.batch_size, 6)).astype(np.float32)
    y = np.arange(trainer.batch_size) % 3
    y[1] = -100
    m = trainer.evaluate(x, y)
    np.testing.assert_allclose(trainer.step(x, y), m["loss"], rtol=1e-5)
    y[1] = 99
    with pytest.raises(DataError, match=r"^labels: label 99 at sample 1 is outside 0\.\.\d+ \(-100 is ignored\)$"):
        trainer.step(x, y)
