"""Several and integer data inputs: token ids and attention masks (positional or keyword) compiled into the
manifest with their names, dtypes and valid id range, trained through the device runtime like PyTorch; a
model returning several tensors trains on the one it names."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pockprop.cli import main
from pockprop.compiler.compile import compile
from pockprop.errors import CompileError
from pockprop.runtime.trainer import Trainer
from tests.compiler import token_models as tm
from tests.compiler.torch_ref import assert_trains_like_torch

OPTIMIZERS = ({"name": "sgd", "lr": 0.2, "momentum": 0.9}, {"name": "adamw", "lr": 1e-2, "eps": 1e-5})


def _token_loss(out, y):  # type: ignore[no-untyped-def]
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))  # ignore_index=-100


MODELS = {"tagger": (tm.tagger, ("ids", "mask")), "bert": (tm.bert, ("input_ids", "attention_mask"))}


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o["name"])
@pytest.mark.parametrize("model", MODELS)
def test_ids_and_mask_train_like_torch(model: str, opt, tmp_path) -> None:
    """Token ids and a mask, positional (SGD) or by keyword (AdamW), padded positions with -100 labels in
    every batch; Hugging Face's ModelOutput holding only `logits` needs no output name."""
    builder, names = MODELS[model]

    def build() -> nn.Module:
        torch.manual_seed(0)
        return builder()

    batches = []
    for seed in range(3):
        ids, mask, y = tm.padded_batch(seed)
        batches.append(((ids, mask) if opt["name"] == "sgd" else dict(zip(names, (ids, mask))), y))
    art = assert_trains_like_torch(build, batches, _token_loss, opt, tmp_path)
    data = [d.to_json() for d in art.manifest().data]
    assert data == [{"name": names[0], "shape": [tm.N, tm.T], "dtype": "int64", "range": [0, tm.VOCAB - 1]},
                    {"name": names[1], "shape": [tm.N, tm.T], "dtype": "int64"}]
    assert [i.name for i in art.infer_model.graph.input][:2] == list(names)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.body(x))
        return {"logits": self.head(h), "aux": self.aux(h)}


def test_several_outputs_train_on_the_one_named(tmp_path) -> None:
    x = torch.randn(2, 4)
    with pytest.raises(CompileError, match=r"returns 2 tensors \('logits', 'aux'\).*output=.*'logits'"):
        compile(TwoHeads(), (x,))
    with pytest.raises(CompileError, match=r"output='nope': the model returns 'logits', 'aux'"):
        compile(TwoHeads(), (x,), output="nope")
    model = TwoHeads()
    art = compile(model, (x,), output="logits")  # pockprop compile --model-output logits
    assert art.trainable == ["body.weight", "body.bias", "head.weight", "head.bias"]  # aux is dropped
    assert len(art.infer_model.graph.output) == 1
    trainer = Trainer.load(art.save(str(tmp_path / "art")), threads=1)
    np.testing.assert_allclose(trainer.predict(x.numpy()), model(x)["logits"].detach().numpy(), rtol=1e-5, atol=1e-6)
    out = tmp_path / "cli"
    assert main(["compile", "tests.compiler.test_inputs:TwoHeads", "--input-shape", "2,4", "--model-output", "logits",
                 "-o", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["trainable"]["parameters"] == art.trainable


class Lookups(nn.Module):
    """ids index an embedding after a reshape and slice, pos index a table with torch's indexing (negative
    indices allowed), a float input and a count used in arithmetic index nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.table = nn.Parameter(torch.randn(5, 3))

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, count: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)[: ids.numel() - 1]
        return self.emb(flat).sum(0) + self.table[pos].sum(0) + (count * 2).to(torch.float32).sum() + x.sum(0)


def test_integer_inputs_used_as_indices_record_their_range() -> None:
    ins = (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(4, dtype=torch.int32), torch.ones(2, dtype=torch.int64),
           torch.randn(2, 3))
    data = compile(Lookups(), ins, loss="mse").manifest().data
    assert [(d.name, d.dtype, d.range) for d in data] == [("ids", "int64", (0, 6)), ("pos", "int32", (-5, 4)),
                                                         ("count", "int64", None), ("x", "float32", None)]


def test_bad_example_inputs_and_preprocess_on_ids_are_refused() -> None:
    ids, mask, _ = tm.padded_batch(0)
    with pytest.raises(CompileError, match="example_inputs: expected a tensor, a tuple"):
        compile(tm.tagger(), ids.numpy())
    with pytest.raises(CompileError, match="preprocess applies to float inputs; the first input 'ids' is int64"):
        compile(tm.tagger(), (ids, mask), preprocess="unit")


def test_cli_declares_the_inputs(tmp_path, capsys) -> None:
    out, d = tmp_path / "art", tmp_path / "d.npz"
    assert main(["compile", "tests.compiler.token_models:tagger", "--input", "ids:int64:3,5", "--input",
                 "mask:int64:3,5", "--optimizer", "adamw", "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"] == [{"name": "ids", "shape": [3, 5], "dtype": "int64", "range": [0, tm.VOCAB - 1]},
                                {"name": "mask", "shape": [3, 5], "dtype": "int64"}]
    parts = [tm.padded_batch(s) for s in range(2)]
    ids, mask, y = (torch.cat([p[i] for p in parts]).numpy() for i in range(3))
    np.savez(d, ids=ids, mask=mask, y=y)
    capsys.readouterr()
    assert main(["train", str(out), "--data", str(d), "--epochs", "2", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 4
    assert main(["eval", str(out), "--data", str(d), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == int((y != -100).sum())
    assert main(["eval", str(out), "--data", str(d)]) == 0
    assert f"on 6 samples ({int((y != -100).sum())} labelled tokens) of" in capsys.readouterr().out
    np.savez(d, ids=ids, y=y)  # no mask: exit 2, one line
    assert main(["train", str(out), "--data", str(d), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("pockprop train: error: ")
    assert "the model's inputs are ids, mask; no array named mask" in err.splitlines()[-1]


@pytest.mark.parametrize("args, needle", [
    (["--input", "ids:int65:3,5"], "dtype 'int65': choose one of float32, uint8"),
    (["--input", "ids:3,5"], "expected NAME:DTYPE:SHAPE like input_ids:int64:8,128"),
    (["--input", "ids:int64:3,5", "--input-shape", "3,5"], "either --input"),
    (["--input", "ids:int64:3,5", "--input", "ids:int64:3,5"], "--input ids declared twice"),
    (["--input", "tokens:int64:3,5"], "torch.export could not trace the model"),
    (["--input", "ids:int64:3,5", "--input", "mask:int64:3,5", "--model-output", "logits"],
     "output='logits': the model returns one unnamed tensor; leave output unset"),
    (["--input", "ids:int64:3,5", "--input", "mask:int64:3,5", "--preprocess", "unit"],
     "preprocess applies to float inputs"),
])
def test_cli_input_errors_exit_2(tmp_path, capsys, args, needle: str) -> None:
    code = main(["compile", "tests.compiler.token_models:tagger", *args, "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err
