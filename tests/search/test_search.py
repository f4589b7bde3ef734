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
from pockprop.compiler.scheme import Layer, Rule, Scheme, preset_scheme
from pockprop.search.finalists import decide, fitted, greedy, refine, scaled, trimmed
from pockprop.search.options import Option, block_options, candidate_layers, parse_ratios, scheme_of
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
    assert r.decision and r.lr in (CONFIG.lr / 3, CONFIG.lr, 3 * CONFIG.lr) and r.finalists
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
    assert {"match": "layers.6", "update": "full"} in json.loads(json.dumps(doc))["scheme"]["rules"]
    assert "final candidates" in r.table() and f"lr {r.lr:.3g}" in r.yaml()
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
    kw = dict(budget_memory=8 * 1024, config=CONFIG, progress=False, cache_dir=cache, ratios="1/4,1", max_layers=2,
              validate=False)
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
    total = 1 + len(resumed.options)  # baseline, options
    assert resumed.probes_cached >= 3  # the three finished before the interruption
    assert resumed.probes_run + resumed.probes_cached == total
    assert len(counted) == resumed.probes_run <= total - 3
    counted.clear()
    again = search(tiny_mlp(), (64,), data, **kw)
    assert again.probes_run == 0 and again.probes_cached == total and not counted
    assert [o.label for o in again.chosen] == [o.label for o in resumed.chosen]
    assert [o.gain for o in again.options] == [o.gain for o in resumed.options]
    other = search(tiny_mlp(), (64,), data, **(kw | {"config": FinetuneConfig(batch=16, steps=13)}))
    assert other.probes_cached == 0, "another fine-tuning config is another cache key"
    full = search(tiny_mlp(), (64,), data, **(kw | {"validate": True}))  # the longer runs are cached too
    assert full.probes_run > 0 and full.probe_seconds > 0
    counted.clear()
    full_again = search(tiny_mlp(), (64,), data, **(kw | {"validate": True}))
    assert full_again.probes_run == 0 and not counted and full_again.probe_seconds == 0
    assert full_again.scheme == full.scheme and full_again.lr == full.lr


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


def test_the_decision_returns_the_best_candidate_that_fits(data: SearchData, monkeypatch: pytest.MonkeyPatch) -> None:
    """Presets and searched sets are candidates on equal terms: whichever does best with the recipe on
    validation (at its own best learning rate) is returned, if it fits; those over a budget are set aside."""
    real = contribution.probe
    lrs = (0.01, 0.02)

    def probe(tm, scheme, data, config, cache, **k):  # type: ignore[no-untyped-def]
        r = real(tm, scheme, data, config, cache, **k)
        if config.schedule == "cosine" and scheme.name in ("bias-only", "full") and config.lr == 0.02:
            return dict(r, accuracy=1.0)  # the recipe makes bias-only (and full, which does not fit) the best
        return r

    monkeypatch.setattr(contribution, "probe", probe)
    r = search(tiny_mlp(), (64,), data, budget_memory=6 * 1024, config=CONFIG, progress=False, lrs=lrs)
    layers = trace_model(tiny_mlp(), (torch.zeros(16, 64),)).layers
    assert r.scheme.rules == preset_scheme("bias-only", layers).rules and r.chosen == [] and r.lr == 0.02
    assert r.decision.startswith("bias-only is the best") and r.estimate["accuracy"] == 1.0
    names = {f.name: f for f in r.finalists}
    assert names["full"].result is None and names["full"].why.startswith("over the memory budget")
    assert names["classifier"].result["grid"] == {"0.01": pytest.approx(names["classifier"].result["grid"]["0.01"]),
                                                  "0.02": pytest.approx(names["classifier"].result["grid"]["0.02"])}
    assert r.estimate["memory_bytes"] <= 6 * 1024 and r.to_json()["lr"] == 0.02


def test_the_time_budget_stops_new_probes(data: SearchData) -> None:
    r = search(tiny_mlp(), (64,), data, budget_memory=6 * 1024, config=CONFIG, progress=False, budget_time=1e-9)
    assert r.options == [] and r.probe_seconds > 0  # the baseline ran; no option started after it
    ran = [f.name for f in r.finalists if f.result is not None]
    assert ran == ["classifier"] and r.scheme.rules == r.finalists[0].scheme.rules
    assert all(f.why for f in r.finalists if f.name != "classifier")
    assert "time budget 1e-09 s (spent" in r.table()


class _Fake:
    """Options and a recipe run whose validation accuracy is a table over the set of options trained."""

    def __init__(self, table: dict[frozenset[str], float]) -> None:
        self.table, self.runs = table, []

    def __call__(self, scheme, cfg):  # type: ignore[no-untyped-def]
        key = frozenset(r.pattern for r in scheme.rules[1:])
        self.runs.append((key, cfg))
        return {"accuracy": self.table.get(key, 0.0), "loss": 1.0, "lr": cfg.lr}


def _options(*spec: tuple[str, float]) -> list[Option]:
    return [Option(layer, "bias", gain=g, score=g) for layer, g in spec]


def test_greedy_measures_options_together() -> None:
    head = Layer("fc", "linear", "fc.weight", "fc.bias")
    opts = _options(("a", 0.3), ("b", 0.2), ("c", 0.1))
    start = {"accuracy": 0.3, "loss": 1.0, "lr": 0.1}
    clash = _Fake({frozenset("a"): 0.6, frozenset("b"): 0.5, frozenset("ab"): 0.4, frozenset("ac"): 0.55})
    chosen, best, trials = greedy(opts, head, "frozen", start, clash, CONFIG, lambda s: "", "accuracy")
    assert [o.layer for o in chosen] == ["a"] and best["accuracy"] == 0.6  # together they do worse: not added
    assert len(trials) == 5  # a, b, c; then a+b, a+c
    adds = _Fake({frozenset("a"): 0.6, frozenset("b"): 0.5, frozenset("ab"): 0.7, frozenset("abc"): 0.65})
    chosen, best, _ = greedy(opts, head, "frozen", start, adds, CONFIG, lambda s: "", "accuracy")
    assert [o.layer for o in chosen] == ["a", "b"] and best["accuracy"] == 0.7
    over = lambda s: "over" if len(s.rules) > 2 else ""  # noqa: E731  (the budget fits one option only)
    chosen, _, _ = greedy(opts, head, "frozen", start, adds, CONFIG, over, "accuracy")
    assert [o.layer for o in chosen] == ["a"]


def test_refine_probes_the_best_third_longer() -> None:
    head = Layer("fc", "linear", "fc.weight", "fc.bias")
    opts = _options(*[(str(i), g) for i, g in enumerate([0.05, 0.4, -0.1, 0.3, 0.2, 0.1])])
    fake = _Fake({frozenset(): 0.5, frozenset("1"): 0.5, frozenset("3"): 0.9})
    recipe = FinetuneConfig(batch=16, epochs=10.0, schedule="cosine")
    done = refine(opts, head, "frozen", fake, FinetuneConfig(batch=16, epochs=2.0), recipe, 100, "accuracy")
    assert done == 2  # ceil(5 with a gain / 3)
    assert {k for k, _ in fake.runs} == {frozenset(), frozenset("1"), frozenset("3")}
    assert all(c.epochs == 6.0 and c.schedule == "cosine" for _, c in fake.runs)  # 3 x longer, the recipe's way
    by = {o.layer: o for o in opts}
    assert by["3"].gain == pytest.approx(0.4) and by["3"].rung == 1 and by["1"].gain == 0.0
    assert by["4"].gain == 0.2 and by["4"].rung == 0  # not in the best third: the screen's gain stays


def test_batchnorm_both_tries_each_candidate_in_each_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both modes are the default (search and drift_probe alike): a user who does not know that BatchNorm's
    training mode matters for a drift gets it tried."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 10)).eval()
    x, y = digits_flat("train")
    d = SearchData.split(x[:200], y[:200], val_fraction=0.25, seed=0)
    real = contribution.probe

    def probe(tm, scheme, data, config, cache, **k):  # type: ignore[no-untyped-def]
        r = real(tm, scheme, data, config, cache, **k)
        won = config.schedule == "cosine" and getattr(scheme, "name", "") == "bias-only" and scheme.batchnorm == "train"
        return dict(r, accuracy=1.0) if won else r

    monkeypatch.setattr(contribution, "probe", probe)
    r = search(model, (64,), d, budget_memory=1 << 20, config=CONFIG, progress=False, greedy_steps=1, greedy_width=1)
    labels = {f.label for f in r.finalists}
    assert {"classifier", "classifier +bn", "bias-only +bn", "full +bn"} <= labels
    assert r.scheme.batchnorm == "train" and "batchnorm: train" in r.yaml()
    path = tmp_path / "s.yaml"
    path.write_text(r.yaml())
    art = compile(model, (torch.zeros(16, 64),), optimizer=CONFIG.optimizer, scheme=str(path))
    assert any(e.role.value == "statistic" for e in art.manifest().state)
    with pytest.raises(SearchError, match="batchnorm"):
        search(model, (64,), d, budget_memory=1 << 20, config=CONFIG, progress=False, batchnorm="sometimes")
    dr = drift_probe(model, (64,), d, config=CONFIG, progress=False)
    assert set(dr.accuracy) == {f"{s}{m}" for s in ("classifier", "tbft-front", "tbft-middle", "tbft-rear")
                                for m in ("", " +bn")}
    assert dr.chosen in dr.gains and dr.chosen.endswith("+bn") == (dr.batchnorm == "train")


def test_block_options_take_whole_blocks_and_never_overlap_in_greedy() -> None:
    layers = [Layer("conv1", "conv2d", "conv1.weight", block="stem"),
              Layer("l1.conv1", "conv2d", "l1.conv1.weight", block="l1"),
              Layer("l1.bn1", "batch_norm", "l1.bn1.weight", "l1.bn1.bias", block="l1"),
              Layer("fc", "linear", "fc.weight", "fc.bias", block="fc")]
    blocks = block_options(layers, candidate_layers(layers))
    assert [(b.layer, b.members) for b in blocks] == [("stem", ("conv1",)), ("l1", ("l1.conv1", "l1.bn1"))]
    assert [r.pattern for r in scheme_of(layers[-1], [blocks[1]]).rules] == ["fc", "l1.conv1", "l1.bn1"]
    inside = Option("l1.bn1", "bias", gain=0.3, score=0.3)
    block = blocks[1]
    block.gain = block.score = 0.4
    fake = _Fake({frozenset({"l1.conv1", "l1.bn1"}): 0.8, frozenset({"l1.bn1"}): 0.7})
    chosen, best, trials = greedy([block, inside], layers[-1], "frozen", {"accuracy": 0.1, "loss": 1.0}, fake,
                                  CONFIG, lambda s: "", "accuracy")
    assert chosen == [block] and best["accuracy"] == 0.8 and len(trials) == 2  # the bias inside it is not added


def test_the_final_few_are_confirmed_on_every_fold() -> None:
    """The best of many noisy first runs is often lucky: the top candidates run again on the other
    cross-validation folds (orders None: all of them, 4 more here) and the best mean wins."""
    cands = [("lucky", Scheme("lucky", (Rule("a", "bias"),))), ("steady", Scheme("steady", (Rule("a", "full"),))),
             ("weak", Scheme("weak", (Rule("fc", "full"),)))]
    first = {"lucky": 0.9, "steady": 0.85, "weak": 0.5}
    later = {"lucky": 0.7, "steady": 0.86, "weak": 0.99}

    def run(scheme, cfg, orders=0, **k):  # type: ignore[no-untyped-def]
        if orders != 0:
            orders = 4 if orders is None else orders
            acc = (k["first"]["accuracy"] + orders * later[scheme.name]) / (1 + orders)
            return {"accuracy": acc, "loss": 1.0, "lr": 0.1, "ms": 1.0, "orders": 1 + orders}
        return {"accuracy": first[scheme.name], "loss": 1.0, "lr": 0.1, "ms": 1.0}

    fig = {"training_bytes": 1, "trainable_params": 1}
    best, fin = decide(cands, lambda s: fig, lambda f: "", run, CONFIG, "accuracy", final_few=2)
    assert best.name == "steady" and best.result["orders"] == 5  # 0.858 beats lucky's 0.74; weak never confirmed
    assert {f.name: "orders" in f.result for f in fin} == {"lucky": True, "steady": True, "weak": False}


def test_a_preset_over_budget_is_also_tried_cut_to_a_ratio_that_fits() -> None:
    """tbft-front of a tiny CNN, cut to the largest input-channel ratio that fits (convs and linears but the
    head sliced, batch norms as they were), as a user would bring a preset down to a budget by hand."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    tm = trace_model(model, (torch.zeros(2, 3, 12, 12),))
    head = tm.layers[-1]
    front = preset_scheme("tbft-front", tm.layers, "train")
    half = scaled(front, 1 / 2, tm.layers, tm.shapes, head)
    assert half.name == "tbft-front@1/2" and half.batchnorm == "train"
    kinds = {r.pattern: (r.update, r.ratio) for r in half.rules}
    assert kinds["0"] == ("weight", 0.5) and kinds["1"] == ("full", 1.0) and kinds["9"] == ("full", 1.0)
    params = lambda s: figures(compile_traced(tm, scheme=s))["trainable_params"]  # noqa: E731
    assert params(half) < params(front)
    over = lambda s: "over" if params(s) > params(half) else ""  # noqa: E731  (half fits, whole does not)
    assert [n for n, _ in fitted([("tbft-front", front), ("classifier", preset_scheme("classifier", tm.layers))],
                                 over, tm.layers, tm.shapes, head)][0] == "tbft-front@1/2"
    assert scaled(preset_scheme("classifier", tm.layers), 0.5, tm.layers, tm.shapes, head) is None  # no weight to cut


def test_folds_validate_every_sample_once_and_stay_stratified() -> None:
    """fold(data, k): the validation split and folds 1 .. 4 partition the pool (20 % validation -> 5 folds),
    each fold keeps the class mix, and training always gets the rest."""
    y = np.repeat(np.arange(4), 25)
    x = np.arange(100, dtype=np.float32)[:, None]  # a sample's value names it
    d = SearchData.split(x, y, 0.2, seed=3)
    assert contribution.folds_of(d) == 5
    seen = [d.x_val[:, 0]]
    for k in range(1, 5):
        f = contribution.fold(d, k)
        assert len(f.y_val) == 20 and sorted(np.bincount(f.y_val)) == [5, 5, 5, 5]
        assert sorted(np.concatenate([f.x_train[:, 0], f.x_val[:, 0]])) == list(range(100))
        seen.append(f.x_val[:, 0])
    assert sorted(np.concatenate(seen)) == list(range(100))
    assert np.array_equal(contribution.fold(d, 2).x_val, contribution.fold(d, 2).x_val)  # fixed, not drawn anew
    with pytest.raises(SearchError, match="folds 1 to 4"):
        contribution.fold(d, 5)
    small = SearchData.split(x, y, 0.05, seed=0)  # a small hold-out makes larger folds, not more runs
    assert contribution.folds_of(small) == contribution.MAX_FOLDS


def test_a_preset_over_budget_is_also_tried_with_fewer_blocks() -> None:
    """trimmed(): the first blocks dropped until it fits (backprop stops later) and the last ones dropped
    until it fits; the head always stays; named by the blocks kept."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 4)).eval()
    tm = trace_model(model, (torch.zeros(2, 3, 12, 12),))
    head = tm.layers[-1]
    full = preset_scheme("full", tm.layers, "train")
    paths = lambda s: sorted(r.pattern for r in s.rules)  # noqa: E731
    n = lambda s: figures(compile_traced(tm, scheme=s))["trainable_params"]  # noqa: E731
    limit = n(preset_scheme("classifier", tm.layers)) + 2 * (8 * 8 * 9 + 8)  # two of the 8->8 convs fit
    got = trimmed(full, lambda s: "over" if n(s) > limit else "", tm.layers, tm.shapes, head)
    blocks = [l.block for l in tm.layers]
    assert [s.name for s in got] == [f"full[{blocks[1]}..{blocks[2]}]", f"full[{blocks[0]}..{blocks[1]}]"]
    assert paths(got[0]) == ["1", "2", "6"] and paths(got[1]) == ["0", "1", "6"]  # the 3->8 conv is smaller
    assert all(s.batchnorm == "train" and n(s) <= limit for s in got)
    assert trimmed(full, lambda s: "over", tm.layers, tm.shapes, head) == []  # nothing short of the head fits


def test_margin_says_when_the_winner_is_within_the_folds_noise() -> None:
    """The decision and the drift probe name the next candidate and how far ahead the winner is fold by fold
    (paired: the same folds); a gap under two standard errors is said to be a tie."""
    a = {"folds": [0.90, 0.92, 0.91, 0.93, 0.92]}
    clear, close = {"folds": [0.85, 0.86, 0.85, 0.87, 0.86]}, {"folds": [0.91, 0.90, 0.92, 0.92, 0.91]}
    mean, se = contribution.margin(a, clear)
    assert mean == pytest.approx(0.058) and se == pytest.approx(np.std([5, 6, 6, 6, 6], ddof=1) / 100 / 5 ** 0.5)
    assert contribution.margin_text("b", (mean, se)) == "+5.8 ± 0.2 points over b fold by fold"
    assert contribution.margin_text("c", contribution.margin(a, close)).endswith("a tie in all but name")
    assert contribution.margin(a, {"accuracy": 0.9}) is None and contribution.margin_text("d", None) == ""
