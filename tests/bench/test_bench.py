"""`pockprop bench` runs end to end on a tiny model. A harness check, not a timed test: no speed assertions."""
from __future__ import annotations

import json

import pytest

from pockprop.bench.harness import (PEERS_ENV, input_shape, markdown_table, peers_python, peers_status, schemes_of,
                                    targets_lines, vocabulary)
from pockprop.bench.peers import ET_ENV, et_python
from pockprop.cli import build_parser, main
from pockprop.errors import UsageError

EXPECTED = {"ort-infer", "pockprop-sparse", "pockprop-full", "torch-infer", "torch-full", "torch-sparse",
            "ortt-infer", "ortt-full", "ortt-sparse", "pockprop-sparse@peer-ort", "et-infer", "et-full", "et-sparse"}


def test_bench_parser_defaults():
    args = build_parser().parse_args(["bench"])
    assert (args.model, args.scheme, args.batch, args.resolution, args.threads) == ("mobilenet_v2", "sparse", 8, 128, 2)
    assert args.peers is True and args.et is True and args.et_python is None


def test_input_shape():
    assert input_shape((8, 3, 128, 128), 2, 32) == [2, 3, 32, 32]
    assert input_shape((8, 64), 2, 32) == [2, 64]


def test_bench_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # The onnxruntime-training rows run only where `make peers` built .venv-peers; --no-peers keeps this test
    # fast and the same everywhere (they must then be skipped with the reason).
    rc = main(["bench", "--model", "mlp", "--batch", "2", "--rounds", "1", "--warmup", "1", "--steps", "1",
               "--threads", "1", "--no-peers", "--quiet", "--json", str(out), "--png", str(tmp_path / "b.png"),
               "--workdir", str(tmp_path / "work")])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["configs"]}
    assert set(rows) == EXPECTED
    for name, r in rows.items():
        assert r["status"] in ("ok", "skipped"), name
        if r["status"] == "skipped":
            assert r["reason"], name
        else:
            assert r["median_ms"] > 0 and len(r["rounds_ms"]) == 1, name
            assert r["peak_rss_mb"] is None or r["peak_rss_mb"] > 0
    for name in ("ort-infer", "pockprop-sparse", "pockprop-full", "torch-infer", "torch-full", "torch-sparse"):
        assert rows[name]["status"] == "ok", rows[name]
    for name in ("ortt-infer", "ortt-full", "ortt-sparse", "pockprop-sparse@peer-ort", "et-infer", "et-full",
                 "et-sparse"):
        assert rows[name]["status"] == "skipped" and "no-peers" in rows[name]["reason"]
    assert rows["pockprop-sparse"]["memory_baseline"] == "ort-infer"
    assert rows["torch-full"]["memory_baseline"] == "torch-infer"
    assert rows["ort-infer"]["vs_infer"] == 1.0
    assert result["input_shape"] == [2, 64] and result["threads"] == 1
    # The targets for `sparse` are listed with their ratio; the peer rows are skipped, so theirs are open.
    tg = {(t["row"], t["baseline"]): t for t in result["targets"]}
    assert set(tg) == {("pockprop-sparse", b) for b in ("torch-full", "torch-sparse", "ortt-sparse", "ort-infer",
                                                        "pockprop-full")} | {("pockprop-sparse@peer-ort", "ortt-sparse"),
                                                                             ("pockprop-sparse@peer-ort", "ortt-infer")}
    assert tg[("pockprop-sparse", "ortt-sparse")]["ratio"] is None and tg[("pockprop-sparse", "ortt-sparse")]["met"] is None
    t = tg[("pockprop-sparse", "ort-infer")]
    assert t["ratio"] == rows["pockprop-sparse"]["vs_infer"] and t["met"] == (t["ratio"] <= 1.5)
    printed = capsys.readouterr().out
    assert "pockprop-sparse" in printed  # the table
    assert "target pockprop-sparse / ort-infer (time)" in printed
    assert "| config |" in markdown_table(result)
    # No matplotlib in the venv: the PNG is skipped with a note; with it, the file exists.
    assert (tmp_path / "b.png").exists() or result.get("png_skipped")


def test_peers_status_explains_a_missing_venv(tmp_path):
    why = peers_status(str(tmp_path / "nope" / "python"))
    assert why and "make peers" in why and "--peers-python" in why and str(tmp_path / "nope" / "python") in why


@pytest.mark.parametrize("which, env, venv", [(peers_python, PEERS_ENV, ".venv-peers"), (et_python, ET_ENV, ".venv-et")])
def test_peers_python_is_an_option_then_the_environment_then_the_current_folder(tmp_path, monkeypatch, which, env,
                                                                                venv):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(env, raising=False)
    assert which() == str(tmp_path / venv / "bin" / "python")
    monkeypatch.setenv(env, "/opt/peers/bin/python")
    assert which() == "/opt/peers/bin/python"
    assert which("/x/python") == "/x/python"
    option = "--peers-python" if which is peers_python else "--et-python"
    assert getattr(build_parser().parse_args(["bench", option, "/x/python"]), option[2:].replace("-", "_")) == "/x/python"


def test_bench_input_is_bounded_before_compiling(capsys):
    assert main(["bench", "--model", "mlp", "--quiet", "--batch", "10000000"]) == 2
    err = capsys.readouterr().err
    assert err == ("pockprop bench: error: --batch 10000000: an input of [10000000, 64] has more than 268,435,456 "
                   "elements\n")


TINY_LLAMA = '{"vocab_size": 64, "hidden": 16, "layers": 2, "heads": 2, "max_positions": 16}'


def test_token_input_shape_and_schemes():
    assert input_shape((4, 128), 8, 32, None, tokens=True) == [8, 128]  # the zoo model's length
    assert input_shape((4, 128), 2, 32, 16, tokens=True) == [2, 16]
    with pytest.raises(UsageError, match="--seq-len"):
        input_shape((8, 3, 32, 32), 2, 32, None, tokens=True)
    with pytest.raises(UsageError, match="--seq-len 100000000"):
        input_shape((4, 128), 8, 32, 100_000_000, tokens=True)
    assert schemes_of("sparse, full,sparse,last-k:1") == ["sparse", "full", "last-k:1"]
    with pytest.raises(UsageError, match="empty scheme"):
        schemes_of("sparse,,full")


def test_vocabulary_is_the_input_embedding():
    import torch.nn as nn

    assert vocabulary(nn.Sequential(nn.Embedding(37, 4), nn.Linear(4, 2))) == 37
    with pytest.raises(UsageError, match="no nn.Embedding"):
        vocabulary(nn.Linear(4, 2))


def test_bench_transformer_rows(tmp_path):
    """A tiny Llama-shaped model through the transformer rows: token ids in, (N, T, V) logits, tokens/s, several
    schemes in one interleaved run, and the Llama targets (at-least speed-ups, extra-memory ratio); --lora adds
    pockprop's LoRA step and PyTorch + peft's on the same layers, and their target."""
    pytest.importorskip("peft")
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "llama_small", "--model-kwargs", TINY_LLAMA, "--scheme", "sparse,last-k:1",
               "--lora", "r=2,alpha=4,targets=q_proj,v_proj",
               "--batch", "2", "--seq-len", "8", "--rounds", "2", "--warmup", "0", "--steps", "1", "--threads", "1",
               "--no-peers", "--quiet", "--json", str(out), "--workdir", str(tmp_path / "work"),
               "--configs", "ort-infer", "pockprop-sparse", "pockprop-last-k:1", "pockprop-full", "torch-infer",
               "torch-full", "torch-sparse", "pockprop-lora", "torch+peft"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["input_shape"] == [2, 8] and result["input"] == "token ids" and result["vocabulary"] == 64
    assert result["tokens_per_step"] == 16 and result["seq_len"] == 8 and result["output_shape"] == [2, 8, 64]
    assert result["schemes"] == ["sparse", "last-k:1"]
    rows = {r["name"]: r for r in result["configs"]}
    ok = {"ort-infer", "pockprop-sparse", "pockprop-last-k:1", "pockprop-full", "torch-infer", "torch-full",
          "torch-sparse", "pockprop-lora", "torch+peft"}
    assert {n for n, r in rows.items() if r["status"] == "ok"} == ok
    assert rows["torch-last-k:1"]["reason"] == "not selected (--configs)"
    for name in ok:
        r = rows[name]
        assert r["tokens_per_s"] == pytest.approx(16 / (r["median_ms"] / 1000)) and len(r["rounds_ms"]) == 2
        assert r["cpu_ms"] > 0
    # sparse trains fewer tensors than last-k:1 here, and PyTorch's same-scheme row trains exactly those
    assert 0 < result["scheme_tensors"]["sparse"] < result["scheme_tensors"]["last-k:1"] < result["parameters"]
    assert f"({result['scheme_tensors']['sparse']} tensors)" in rows["torch-sparse"]["what"]
    tg = {(t["row"], t["baseline"], t["what"]): t for t in result["targets"]}
    assert set(tg) == {("pockprop-sparse", "torch-full", "tokens/s"), ("pockprop-sparse", "torch-sparse", "tokens/s"),
                       ("pockprop-sparse", "pockprop-full", "extra memory"), ("pockprop-lora", "torch+peft", "tokens/s")}
    assert result["lora"]["targets"] == ["q_proj", "v_proj"] and result["lora"]["trainable_count"] > 0
    assert tg[("pockprop-lora", "torch+peft", "tokens/s")]["met"] == (tg[("pockprop-lora", "torch+peft",
                                                                          "tokens/s")]["ratio"] >= 1.5)
    t = tg[("pockprop-sparse", "torch-full", "tokens/s")]
    speedups = [b / a for a, b in zip(rows["pockprop-sparse"]["rounds_ms"], rows["torch-full"]["rounds_ms"])]
    assert t["at_least"] and t["ratio"] == pytest.approx(sorted(speedups)[0] / 2 + sorted(speedups)[1] / 2)
    assert t["met"] == (t["ratio"] >= 4.0)
    assert "tokens/s" in markdown_table(result).splitlines()[0]
    assert any(line.startswith("pockprop-sparse vs torch-full (tokens/s):") and "target >= 4x" in line
               for line in targets_lines(result))


def test_lowering_variants_and_their_targets():
    """--lowerings: each choice becomes a chooser; each non-default row is held to <= 1.0x the same scheme with
    each op's default lowering (median of per-round ratios)."""
    from pockprop.bench.harness import Config, lowering_targets, lowering_variants
    from pockprop.compiler.lowering_cost import cost_model_lowering
    from pockprop.passes.lowerings import default_lowering

    v = lowering_variants("default, cost,x86_64")
    assert list(v) == ["default", "cost", "x86_64"]
    assert v["default"] is default_lowering and v["cost"] is cost_model_lowering
    assert lowering_variants(None) == {}
    with pytest.raises(Exception, match="profile"):
        lowering_variants("no-such-profile.json")
    cfgs = {n: Config(n, "pockprop", "", {}, rounds=r) for n, r in (
        ("pockprop-full@default", [2.0, 2.0, 2.0]), ("pockprop-full@cost", [1.0, 3.0, 1.5]),
        ("pockprop-full", [1.0, 1.0, 1.0]))}
    cfgs["pockprop-sparse@peer-ort"] = Config("pockprop-sparse@peer-ort", "pockprop-peer-ort", "", {}, rounds=[1.0])
    (t,) = lowering_targets(cfgs)
    assert (t["row"], t["baseline"], t["ratio"], t["met"]) == ("pockprop-full@cost", "pockprop-full@default", 0.75, True)
def test_bench_prompt_rows(tmp_path):
    """--scheme prompt:P: a soft prompt trained alone, beside PyTorch with the same prompt parameter trainable
    (the peers, which train the forward model, have no prompt row), and issue 13's 1.5x tokens/s target."""
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "llama_small", "--model-kwargs", TINY_LLAMA, "--scheme", "prompt:4",
               "--batch", "2", "--seq-len", "8", "--rounds", "2", "--warmup", "0", "--steps", "1", "--threads", "1",
               "--no-peers", "--quiet", "--json", str(out), "--workdir", str(tmp_path / "work"),
               "--configs", "pockprop-prompt:4", "torch-prompt:4"])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["configs"]}
    assert {n for n, r in rows.items() if r["status"] == "ok"} == {"pockprop-prompt:4", "torch-prompt:4"}
    assert "ortt-prompt:4" not in rows and "et-prompt:4" not in rows
    assert result["scheme_tensors"]["prompt:4"] == 1 and result["scheme_trainable_count"]["prompt:4"] == 4 * 16
    assert "soft prompt of 4 tokens" in rows["torch-prompt:4"]["what"]
    (t,) = [t for t in result["targets"] if t["row"] == "pockprop-prompt:4"]
    assert t["baseline"] == "torch-prompt:4" and t["limit"] == 1.5 and t["met"] == (t["ratio"] >= 1.5)
