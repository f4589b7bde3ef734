"""pockprop.search.solver: the exact multiple-choice knapsack against brute force."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pockprop.search.solver import brute_force, frontier, solve


@dataclass(frozen=True)
class Opt:
    layer: str
    score: float
    memory_bytes: float
    ms: float = 0.0


def _check(options: list[Opt], budget: float, budget2: float | None = None) -> list[Opt]:
    got = solve(options, budget, budget2)
    best, _ = brute_force(options, budget, budget2)
    layers = [o.layer for o in got]
    assert len(layers) == len(set(layers)), "at most one option per layer"
    assert sum(o.memory_bytes for o in got) <= budget
    if budget2 is not None:
        assert sum(o.ms for o in got) <= budget2
    assert math.isclose(sum(o.score for o in got), best, abs_tol=1e-9), (got, best)
    return got


def _instance(rng: random.Random, layers: int, per: int, ints: bool) -> list[Opt]:
    out = []
    for l in range(layers):
        for _ in range(rng.randint(1, per)):
            cost = rng.randint(0, 20) if ints else rng.uniform(0, 20)
            gain = rng.choice([0.0, -0.1, rng.uniform(-1, 5), round(rng.uniform(0, 5), 1)])
            out.append(Opt(f"l{l}", gain, cost, rng.randint(0, 10) if ints else rng.uniform(0, 10)))
    return out


@pytest.mark.parametrize("seed", range(200))
def test_matches_brute_force_on_random_instances(seed: int) -> None:
    rng = random.Random(seed)
    options = _instance(rng, rng.randint(1, 5), 4, ints=seed % 2 == 0)
    budget = rng.choice([0, rng.randint(0, 40), rng.uniform(0, 60)])
    _check(options, budget)
    _check(options, budget, rng.choice([0.0, rng.uniform(0, 15), 100.0]))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(-3, 10), st.integers(0, 12), st.integers(0, 6)), max_size=12),
       st.integers(0, 30), st.one_of(st.none(), st.integers(0, 15)))
def test_matches_brute_force_hypothesis(raw: list[tuple[int, int, int, int]], budget: int, budget2: int | None) -> None:
    options = [Opt(f"l{l}", g / 2, c, d) for l, g, c, d in raw]
    _check(options, budget, budget2)


def test_nothing_fits() -> None:
    options = [Opt("a", 1.0, 10), Opt("b", 2.0, 11)]
    assert solve(options, 5) == []
    assert solve(options, -1) == []


def test_zero_and_negative_gain_options_are_never_chosen() -> None:
    options = [Opt("a", 0.0, 0), Opt("b", -1.0, 0), Opt("c", 0.5, 3)]
    assert solve(options, 100) == [options[2]]


def test_ties_prefer_the_cheaper_selection() -> None:
    options = [Opt("a", 1.0, 5), Opt("a", 1.0, 3), Opt("b", 1.0, 4)]
    assert solve(options, 8) == [options[1], options[2]]
    assert solve(options, 3) == [options[1]]


def test_one_option_per_layer_even_when_two_would_fit() -> None:
    options = [Opt("a", 1.0, 1), Opt("a", 1.5, 2), Opt("b", 0.2, 1)]
    assert solve(options, 10) == [options[1], options[2]]


def test_second_budget_binds() -> None:
    options = [Opt("a", 3.0, 1, ms=5.0), Opt("a", 2.0, 1, ms=1.0), Opt("b", 2.5, 1, ms=4.0)]
    assert solve(options, 10) == [options[0], options[2]]
    assert solve(options, 10, 5.0) == [options[1], options[2]]
    assert solve(options, 10, 0.5) == []


def test_negative_cost_is_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        solve([Opt("a", 1.0, -1)], 10)


def test_state_cap_falls_back_to_rounded_up_costs_within_budget() -> None:
    rng = random.Random(7)
    options = [Opt(f"l{l}", rng.uniform(0.1, 1), rng.uniform(1, 100)) for l in range(14) for _ in range(3)]
    exact = solve(options, 300.0)
    capped = solve(options, 300.0, max_states=5, resolution=1000)
    assert sum(o.memory_bytes for o in capped) <= 300.0
    assert sum(o.score for o in capped) <= sum(o.score for o in exact) + 1e-9
    assert sum(o.score for o in capped) >= 0.9 * sum(o.score for o in exact)  # rounding costs 1/1000 of the budget


def test_frontier_is_the_best_gain_at_each_budget() -> None:
    rng = random.Random(3)
    options = _instance(rng, 4, 3, ints=True)
    front = frontier(options)
    assert front[0][0] == 0 and front[0][1] >= 0  # the empty selection, or better options that cost nothing
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(front, front[1:]))
    for budget in range(0, 60, 3):
        best = max(g for c, g, _ in front if c <= budget)
        assert math.isclose(best, brute_force(options, budget)[0], abs_tol=1e-9)
