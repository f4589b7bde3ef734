"""pockprop.search end to end on a tiny MLP and digits: budget, YAML round trip, cache, resume, drift, energy."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pockprop import models
from pockprop.compiler.compile import compile, compile_traced, trace_model
from pockprop.search import FinetuneConfig, SearchData, SearchError, drift_probe, search
from pockprop.search import contribution, select
from pockprop.search.costs import figures, memory_of
from pockprop.search.energy import E_BYTE, E_MAC, bytes_moved
from pockprop.search.options import parse_ratios
from pockprop.ops.builder import Builder
from pockprop.ir import Graph, TensorType
from pockprop.models.data import digits_flat

CONFIG = FinetuneConfig(batch=16, steps=12, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9})


def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.mlp(hidden=(16, 16, 8))


@pytest.fixture(scope="module")
def data() -> SearchData:
    x, y = digits_flat("train")
    return SearchData.split(x[:400], y[:400], val_fraction=0.25, seed=0)


def test_split_is_stratified_and_disjoint() -> None:
    y = np.repeat(np.arange(4), [10, 20, 3, 1])
    x = np.arange(len(y), dtype=np.float32)[:, None]
    d = SearchData.split(x, y, val_fraction=0.2, seed=1)
    assert np.bincount(d.y_val, minlength=4).tolist() == [2, 4, 1, 0]  # a lone sample stays in training
    assert sorted(d.x_train[:, 0].tolist() + d.x_val[:, 0].tolist()) == list(range(len(y)))
    with pytest.raises(SearchError, match="val_fraction"):
        SearchData.split(x, y, val_fraction=1.5)


def test_search_respects_the_budget_and_its_yaml_compiles(data: SearchData, tmp_path: Path) -> None:
    model = tiny_mlp()
    budget = 6 * 1024
    r = search(model, (64,), data, budget_memory=budget, config=CONFIG, progress=False)
    assert r.chosen, "a 6 KB budget leaves room for some option"
    assert {o.layer for o in r.options} == {"layers.0", "layers.2", "layers.4"}  # the head layers.6 is the baseline
    assert len({o.layer for o in r.chosen}) == len(r.chosen)
    assert r.estimate["memory_bytes"] <= budget
    assert sum(o.memory_bytes for o in r.chosen) + r.baseline["memory_bytes"] <= budget or r.rounds > 1
    # the YAML is what `pockprop compile --scheme` reads; its compile report agrees with the estimate
    path = tmp_path / "scheme.yaml"
    path.write_text(r.yaml())
    art = compile(tiny_mlp(), (torch.zeros(16, 64),), optimizer=CONFIG.optimizer, scheme=str(path))
    assert memory_of(figures(art), "training") == r.estimate["memory_bytes"] <= budget
    assert [u.kind for u in art.scheme.updates if u.layer.path == "layers.6"] == ["full"]
    doc = r.to_json()
    assert json.loads(json.dumps(doc))["scheme"]["rules"][0] == {"match": "layers.6", "update": "full"}
    assert all(o.label.split(":")[0] in r.table() for o in r.options)
    png = tmp_path / "s.png"
    assert r.plot(str(png)) == str(png) and png.read_bytes()[:4] == b"\x89PNG"


def test_budget_below_the_baseline_is_refused(data: SearchData) -> None:
    with pytest.raises(SearchError, match="baseline alone needs"):
        search(tiny_mlp(), (64,), data, budget_memory=100, config=CONFIG, progress=False, max_layers=1)


def test_non_additive_costs_are_tightened_until_the_compiled_scheme_fits(data: SearchData,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real = select.difference
    monkeypatch.setattr(select, "difference", lambda f, b, m: {k: v / 4 for k, v in real(f, b, m).items()})
    budget = 5 * 1024
    r = search(tiny_mlp(), (64,), data, budget_memory=budget, config=CONFIG, progress=False, validate=False)
    assert r.rounds > 1, "the understated costs first choose a scheme over budget"
    assert r.estimate["memory_bytes"] <= budget


def test_cache_skips_done_probes_and_resumes_an_interrupted_search(data: SearchData, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cache = str(tmp_path / "cache")
    kw = dict(budget_memory=8 * 1024, config=CONFIG, progress=False, cache_dir=cache, ratios="1/4,1", max_layers=2)
    real, calls = contribution.finetune, []

    def dies_after_three(*args, **kwargs):  # type: ignore[no-untyped-def]
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(contribution, "finetune", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        search(tiny_mlp(), (64,), data, **kw)
    counted = []
    monkeypatch.setattr(contribution, "finetune", lambda *a, **k: counted.append(1) or real(*a, **k))
    resumed = search(tiny_mlp(), (64,), data, **kw)
    total = 1 + len(resumed.options) + 1  # baseline, options, the chosen scheme together
    assert resumed.probes_cached >= 3  # the three finished before the interruption (and the chosen scheme, if it
    assert resumed.probes_run + resumed.probes_cached == total  # is a single option: same rules, same key)
    assert len(counted) == resumed.probes_run <= total - 3
    counted.clear()
    again = search(tiny_mlp(), (64,), data, **kw)
    assert again.probes_run == 0 and again.probes_cached == total and not counted
    assert [o.label for o in again.chosen] == [o.label for o in resumed.chosen]
    assert [o.gain for o in again.options] == [o.gain for o in resumed.options]
    other = search(tiny_mlp(), (64,), data, **(kw | {"config": FinetuneConfig(batch=16, steps=13)}))
    assert other.probes_cached == 0, "another fine-tuning config is another cache key"


def test_probes_see_the_same_data_order(data: SearchData) -> None:
    tm = trace_model(tiny_mlp(), (torch.zeros(16, 64),))
    art = compile_traced(tm, optimizer=CONFIG.optimizer, scheme="classifier")
    a = contribution.finetune(contribution.trainer_of(art), data, CONFIG, seed=0)
    b = contribution.finetune(contribution.trainer_of(art), data, CONFIG, seed=0)
    assert a["accuracy"] == b["accuracy"] and a["loss"] == b["loss"] and a["steps"] == 12


def test_drift_probe_end_to_end(data: SearchData) -> None:
    d = drift_probe(tiny_mlp(), (64,), data, config=CONFIG, progress=False)
    assert d.block in ("front", "middle", "rear")
    assert set(d.gains) == {"tbft-front", "tbft-middle", "tbft-rear"}
    assert set(d.accuracy) == set(d.energy) == {"classifier", "tbft-front", "tbft-middle", "tbft-rear"}
    for s, e in d.energy.items():
        assert e["joules"] == pytest.approx(e["macs"] * E_MAC + e["bytes"] * E_BYTE)
        assert e["mac_joules"] == pytest.approx(e["macs"] * E_MAC)
    assert d.energy["tbft-front"]["macs"] > d.energy["classifier"]["macs"]  # backprop to the first layer
    best = max(d.gains.values())
    assert d.gains[d.scheme] == best
    assert "tbft-" in d.table() and json.dumps(d.to_json())


def test_energy_of_a_linear_layer_by_hand() -> None:
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", TensorType((2, 4), "float32"))
    w = g.add_constant(np.zeros((3, 4), np.float32), name="w")
    bias = g.add_constant(np.zeros(3, np.float32), name="b")
    b.op("linear", [x, w, bias])
    assert bytes_moved(g) == 32 + 48 + 12 + 24  # x, w, b read; (2, 3) written

    torch.manual_seed(0)
    art = compile(torch.nn.Sequential(torch.nn.Linear(4, 3)), (torch.zeros(2, 4),), scheme="classifier")
    f = figures(art)
    assert (f["forward_macs"], f["backward_macs"]) == (2 * 4 * 3, 2 * 4 * 3)  # y = xW^T; dW = dy^T x, no dx
    assert f["energy"]["joules"] == pytest.approx(48 * 4.6e-12 + f["bytes_moved"] * 160e-12)
    assert (f["param_bytes"], f["optimizer_bytes"]) == (4 * 15, 0)  # W and b trained; plain SGD keeps no state
    # kept: the loss's (2, 3) softmax, which its gradient reads (the input x is data, counted apart)
    assert f["kept_bytes"] == 2 * 3 * 4 and f["training_bytes"] == 2 * 4 * 15 + 2 * 3 * 4


def test_ratios_and_budget_strings() -> None:
    from pockprop.search.cli import parse_bytes

    assert parse_ratios("1/8,1/4, 0.5,1") == (0.125, 0.25, 0.5, 1.0)
    with pytest.raises(SearchError, match="outside"):
        parse_ratios("1/8,2")
    assert parse_bytes("2MB") == 2 * 2**20 and parse_bytes("512 KB") == 512 * 1024 and parse_bytes("300") == 300
    assert parse_bytes("1.5GB") == int(1.5 * 2**30)
    with pytest.raises(SearchError, match="expected a size like 2MB"):
        parse_bytes("2 lightyears")
    from pockprop.search.cli import parse_params

    assert parse_params("10%") == pytest.approx(0.1) and parse_params("50,000") == 50000 and parse_params(None) is None
    for bad in ("lots", "0", "150%", "-3"):
        with pytest.raises(SearchError, match="--budget-params"):
            parse_params(bad)


def test_trainable_parameter_budget_bounds_the_compiled_scheme(data: SearchData) -> None:
    model = tiny_mlp()
    free = search(model, (64,), data, budget_memory=64 * 1024, config=CONFIG, progress=False, validate=False)
    cap = free.estimate["trainable_params"] - 1  # one parameter less than the memory budget alone picks
    r = search(model, (64,), data, budget_memory=64 * 1024, budget_params=cap, config=CONFIG, progress=False,
               validate=False)
    assert r.budget_params == cap and r.estimate["trainable_params"] <= cap
    assert sum(o.params for o in r.chosen) + free.baseline["figures"]["trainable_params"] == r.estimate["trainable_params"]
    frac = search(model, (64,), data, budget_memory=64 * 1024, budget_params=0.2, config=CONFIG, progress=False,
                  validate=False)  # a fraction of the model's parameters
    assert frac.estimate["trainable_params"] <= 0.2 * frac.estimate["total_params"]
    with pytest.raises(SearchError, match="baseline alone trains"):
        search(model, (64,), data, budget_memory=64 * 1024, budget_params=10, config=CONFIG, progress=False)
    with pytest.raises(SearchError, match="not both"):
        search(model, (64,), data, budget_memory=64 * 1024, budget_params=0.5, budget_ms=10.0, config=CONFIG,
               progress=False)


@pytest.mark.parametrize("singles", ["gain", "lose"])
def test_a_selection_that_loses_together_falls_back(data: SearchData, monkeypatch: pytest.MonkeyPatch,
                                                    singles: str) -> None:
    """Probe gains need not add up: a selection that does worse together than its best single option (or
    than the classifier alone) is replaced by that option (or by the classifier)."""
    real_probe = select.probe

    def solve_two(options, *a, **k):  # type: ignore[no-untyped-def]
        """Two options of different layers, whatever the budget allows (the knapsack's answer is not the point)."""
        best = {}
        for o in options:
            best.setdefault(o.layer, o)
        return list(best.values())[:2]

    def probe(tm, scheme, *a, what="", **k):  # type: ignore[no-untyped-def]
        r = real_probe(tm, scheme, *a, what=what, **k)
        if len(scheme.rules) > 2:  # head + two options: the together run does badly
            return dict(r, accuracy=0.0)
        if len(scheme.rules) == 2:  # one option: layers.4's all gain ("gain"), or every option loses ("lose")
            good = singles == "gain" and scheme.rules[1].pattern == "layers.4"
            return dict(r, accuracy=1.0 if good else 0.0)
        return r

    monkeypatch.setattr(select, "solve", solve_two)
    monkeypatch.setattr(select, "probe", probe)
    r = search(tiny_mlp(), (64,), data, budget_memory=1 << 20, config=CONFIG, progress=False)
    assert r.fallback and "validated:" in r.table() and r.to_json()["fallback"] == r.fallback
    if singles == "gain":
        assert "less than" in r.fallback
        fits = [o for o in r.options if o.gain > 0]
        assert {o.layer for o in fits} == {"layers.4"}
        assert r.chosen == [max(fits, key=lambda o: (o.gain, -o.memory_bytes))]
        assert r.estimate["accuracy"] == 1.0  # the probe of exactly what is returned
        assert r.estimate["memory_bytes"] == r.baseline["memory_bytes"] + r.chosen[0].memory_bytes
    else:
        assert "classifier alone" in r.fallback and r.chosen == []
        assert [x.pattern for x in r.scheme.rules] == ["layers.6"] and r.estimate["accuracy"] == r.baseline["accuracy"]
