"""experiments/vit.py: a tiny ViT is pre-trained, then fine-tuned full, with LoRA (+ head) and with a soft prompt
(+ head) through the device runtime, end to end (the documented run is in docs/accuracy.md)."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from experiments.vit import QUICK, lora_row, markdown, run, target


def test_tiny_run_end_to_end(tmp_path):
    cfg = replace(QUICK, schemes=("full", "lora", "lora+mlp", "prompt:2"))
    r = run(cfg, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == r["rows"]
    full, lora, mlp, prompt = r["rows"]
    assert [row["scheme"] for row in r["rows"]] == ["full", "lora", "lora+mlp", "prompt:2"]
    assert full["trainable_percent"] == 100.0 and full["trainable_params"] == r["model_params"]
    head = QUICK.hidden * 10 + 10  # classifier weight and bias, trained beside the adapters and the prompt
    qv = 2 * QUICK.layers * 2 * QUICK.r * QUICK.hidden  # A (r, d) and B (d, r) on q_proj and v_proj
    assert lora["tensors"] == 2 * 2 * QUICK.layers + 2 and lora["trainable_params"] == qv + head
    assert mlp["tensors"] == 2 * 4 * QUICK.layers + 2 and mlp["trainable_params"] > lora["trainable_params"]
    assert prompt["tensors"] == 3 and prompt["trainable_params"] == 2 * QUICK.hidden + head
    for row in r["rows"]:
        (one,) = row["runs"]
        assert one["steps"] == (r["images"]["fine-tune"] // cfg.batch) * cfg.epochs and one["rejected"] == 0
        assert math.isfinite(row["test_loss"]) and 0 <= row["test_mean"] <= 100
        assert row["lr"] in cfg.lrs_of(row["scheme"])
    table = markdown(r)
    assert "| pre-trained, no fine-tuning |" in table and "| lora | " in table and "LoRA target" in table
    assert table.count("missed (") + table.count("met (") == 2  # the two LoRA rows are checked


def test_lora_rows_and_the_target_check():
    assert lora_row("lora", 8) == (("q_proj", "v_proj"), 8)
    assert lora_row("lora+mlp:2", 8) == (("q_proj", "v_proj", "fc1", "fc2"), 2)
    with pytest.raises(ValueError, match="unknown LoRA row"):
        lora_row("lora:x", 8)
    full = {"scheme": "full", "test_mean": 95.0}
    assert target({"scheme": "lora", "test_mean": 94.1, "trainable_percent": 1.8}, full, 8).startswith("met (r=8")
    assert target({"scheme": "lora", "test_mean": 93.9, "trainable_percent": 1.8}, full, 8).startswith("missed")
    # more than 2 % trainable misses, however accurate
    assert target({"scheme": "lora+mlp", "test_mean": 99.0, "trainable_percent": 5.9}, full, 8).startswith("missed")
