"""`pockprop search` on a model taking one integer input (a tiny Hugging Face BERT on token ids), and the
refusals of what it does not support: several data inputs, per-token labels, out-of-vocabulary ids."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn

from pockprop.cli import main
from pockprop.runtime.trainer import Trainer
from pockprop.search import FinetuneConfig, SearchData
from pockprop.search.options import SearchError
from pockprop.search.select import prepare
from tests.search import tiny_bert

pytest.importorskip("transformers")
BERT = ["tests.search.tiny_bert:build", "--num-classes", "3"]
IDS = ["--input", f"input_ids:int64:8,{tiny_bert.T}"]
FAST = ["--steps", "2", "--batch", "8", "--max-layers", "2", "--ratios", "1", "--no-progress"]


@pytest.fixture(scope="module")
def ids_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ids, y = tiny_bert.ids_and_labels()
    path = tmp_path_factory.mktemp("data") / "ids.npz"
    np.savez(path, input_ids=ids, y=y)  # named by the input, as the runtime reads it
    return path


def test_search_on_token_ids_writes_a_scheme_that_compiles_and_trains(ids_npz: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    scheme, js = tmp_path / "s.yaml", tmp_path / "s.json"
    code = main(["search", *BERT, *IDS, "--data", str(ids_npz), "--budget-memory", "50KB", *FAST,
                 "-o", str(scheme), "--json", str(js)])
    out = capsys.readouterr()
    assert code == 0, out.err
    doc = json.loads(js.read_text())
    assert doc["estimate"]["memory_bytes"] <= 50 * 1024 and doc["probes_run"] >= 3
    assert "model.classifier" in scheme.read_text()

    art = tmp_path / "art"
    assert main(["compile", *BERT, *IDS, "--scheme", str(scheme), "-o", str(art)]) == 0
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["scheme"]["name"] == doc["scheme"]["name"]
    data = manifest["data"][0]
    assert (data["name"], data["dtype"], data["range"]) == ("input_ids", "int64", [0, tiny_bert.VOCAB - 1])
    trainer = Trainer.load(str(art))
    before = trainer.full_parameters()
    ids, y = tiny_bert.ids_and_labels()
    assert np.isfinite(trainer.step(ids[:8], y[:8]))
    after = trainer.full_parameters()
    assert not np.array_equal(before["model.classifier.weight"], after["model.classifier.weight"])


def test_searching_the_artifact_reuses_its_int64_input(ids_npz: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    art = tmp_path / "art"
    assert main(["compile", *BERT, *IDS, "--scheme", "classifier", "-o", str(art)]) == 0
    code = main(["search", str(art), "--model", BERT[0], "--data", str(ids_npz), "--drift", "--steps", "1",
                 "--batch", "8", "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "tbft-rear" in out.out


@pytest.mark.parametrize("args,needle", [
    ([*IDS, "--input", "mask:int64:8,8"], "--input declares 2 data inputs (input_ids, mask); pockprop search "
                                          "supports models with one data input only"),
    ([*IDS, "--input-shape", "8,8"], "either --input or --input-shape"),
    (["--input", "input_ids:int65:8,8"], "dtype 'int65'"),
])
def test_bad_input_declarations_exit_2(ids_npz: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                       needle: str) -> None:
    code = main(["search", *BERT, *args, "--data", str(ids_npz), "--budget-memory", "50KB", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_bad_ids_and_per_token_labels_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids, y = tiny_bert.ids_and_labels()
    bad = ids.copy()
    bad[5, 3] = tiny_bert.VOCAB  # one past the embedding's rows: refused before any probe, as on the device
    for arrays, needle in (({"input_ids": bad, "y": y}, f"value {tiny_bert.VOCAB} at sample 5, position [3] is "
                                                        f"outside 0..{tiny_bert.VOCAB - 1}"),
                           ({"input_ids": ids, "y": ids % 3}, "per-token labels are not supported")):
        path = tmp_path / "d.npz"
        np.savez(path, **arrays)
        code = main(["search", *BERT, *IDS, "--data", str(path), "--budget-memory", "50KB", *FAST])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and "Traceback" not in err


def test_an_artifact_with_several_inputs_is_refused(ids_npz: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    art = tmp_path / "art"
    assert main(["compile", "tests.compiler.token_models:tagger", "--input", "ids:int64:3,5", "--input",
                 "mask:int64:3,5", "-o", str(art)]) == 0
    capsys.readouterr()
    code = main(["search", str(art), "--model", "tests.compiler.token_models:tagger", "--data", str(ids_npz),
                 "--budget-memory", "50KB", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "manifest declares 2 data inputs (ids, mask); pockprop search supports models with " \
                         "one data input only" in err


def test_search_data_keeps_integer_inputs_and_traces_them() -> None:
    ids, y = tiny_bert.ids_and_labels(40)
    data = SearchData.split(ids.astype(np.int32), y, 0.25, 0)
    assert data.x_train.dtype == np.int64 and data.x_val.dtype == np.int64
    assert SearchData.split(ids.astype(np.float64), y).x_train.dtype == np.float32  # floats stay float32
    model = nn.Sequential(nn.Embedding(tiny_bert.VOCAB, 4), nn.Flatten(), nn.Linear(4 * tiny_bert.T, 3))
    tm, _ = prepare(model, (tiny_bert.T,), data, FinetuneConfig(batch=4), None, "cross_entropy", None)
    g = tm.traced.graph
    assert [g.types[n].dtype for n in tm.traced.user_inputs] == ["int64"]
    with pytest.raises(SearchError, match="per-token labels"):
        SearchData(ids, ids, ids, ids)
    with pytest.raises(SearchError, match="per-token labels"):
        SearchData.split(ids, ids)
