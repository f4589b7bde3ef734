"""experiments/text.py: the corpus split is clean, every token is predicted once, and a tiny run fine-tunes a
pre-trained Llama through the device runtime end to end (the documented run is in docs/accuracy.md)."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np

from experiments.text import IGNORE, QUICK, corpus, markdown, run, windows


def test_windows_predict_every_token_once():
    ids = np.arange(1, 12, dtype=np.int64)  # 11 tokens: 10 next-token predictions
    x, y = windows(ids, 4)
    assert x.shape == y.shape == (3, 4)
    assert y[y != IGNORE].tolist() == ids[1:].tolist()
    assert x[y != IGNORE].tolist() == ids[:-1].tolist()
    assert (x[y == IGNORE] == 0).all()  # padding is <|endoftext|>, not counted


def test_no_paragraph_in_both_domains():
    texts = corpus()
    assert texts["reference"] and texts["library"]
    assert not set(texts["reference"]) & set(texts["library"])
    ref = {p for t in texts["reference"].values() for p in t.split("\n\n")}
    lib = {p for t in texts["library"].values() for p in t.split("\n\n")}
    assert not ref & lib


def test_tiny_run_end_to_end(tmp_path):
    cfg = replace(QUICK, max_chars=2_000, pretrain_steps=5, schemes=("full", "sparse", "lora", "prompt:2"))
    r = run(cfg, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == r["rows"]
    assert [row["scheme"] for row in r["rows"]] == ["full", "sparse", "lora", "prompt:2"]
    full, sparse, lora, prompt = r["rows"]
    assert full["trainable_percent"] == 100.0 and 0 < sparse["trainable_percent"] < 100.0
    assert 0 < lora["trainable_percent"] < 100.0 and lora["tensors"] == 2 * 2 * QUICK.layers  # A, B on q and v
    assert prompt["tensors"] == 1 and prompt["trainable_params"] == 2 * QUICK.hidden  # the prompt alone
    assert prompt["lr"] in QUICK.prompt_lrs and math.isfinite(prompt["test_mean"])
    for row in (full, sparse, lora):
        (run_,) = row["runs"]
        assert run_["steps"] == len(range(0, r["windows"]["train"] - cfg.batch + 1, cfg.batch)) * cfg.epochs
        assert math.isfinite(row["test_mean"]) and row["test_mean"] < r["before"]["test"]  # fine-tuning helps
    table = markdown(r)
    assert "| pre-trained, no fine-tuning |" in table and "| sparse |" in table and "pydoc_data.topics" in table
