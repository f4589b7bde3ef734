"""Selection under a budget: the multiple-choice knapsack, solved exactly.

Given options grouped by layer (at most one option per layer may be chosen; choosing none is always
allowed), each with a gain g and non-negative costs c (and optionally a second cost d), find

    maximize  sum g_i   subject to  sum c_i <= B  (and sum d_i <= D)

over the choices. The solver is a dynamic program over *Pareto states*: after each layer it keeps
every partial selection that no other partial selection beats on all counts (lower-or-equal costs and
higher-or-equal gain). A dominated partial selection can never be completed into a better answer than
the one that dominates it, because both can be completed by the same later choices; so keeping only
the Pareto states is exact, for real-valued gains and costs, with no scaling of the costs.

Ties: among selections of equal gain (within 1e-12) the one with the smaller first cost wins, then the
smaller second cost, then the one that is earlier in input order. Options with gain <= 0 are never
chosen (choosing nothing for that layer is at least as good and costs nothing).

The number of Pareto states stays small in practice (it is at most the number of distinct cost sums
below the budget). Should it pass `max_states`, the costs are rounded *up* to multiples of
budget / `resolution` and the program restarts: it is then exact for the rounded costs, and the
answer never exceeds the real budget (each cost only grew).

`frontier` is the same program with no budget: the best gain at every cost, for plots.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")
EPS = 1e-12
MAX_STATES = 200_000
RESOLUTION = 4096

Key = Callable[[Any], float]


def _attr(name: str) -> Key:
    return lambda o: getattr(o, name)


class _Budgeted:
    """Costs of one option as a tuple, checked non-negative."""

    def __init__(self, cost: Key, cost2: Key | None, scale: tuple[float, float] | None) -> None:
        self.cost, self.cost2, self.scale = cost, cost2, scale

    def __call__(self, o: Any) -> tuple[float, float]:
        c = float(self.cost(o))
        d = float(self.cost2(o)) if self.cost2 is not None else 0.0
        if c < 0 or d < 0 or math.isnan(c) or math.isnan(d):
            raise ValueError(f"option {o!r}: costs must be non-negative numbers, got {c}, {d}")
        if self.scale is not None:  # round up to the grid: never under-estimates a cost
            c = math.ceil(c / self.scale[0] - 1e-9) * self.scale[0] if self.scale[0] else c
            d = math.ceil(d / self.scale[1] - 1e-9) * self.scale[1] if self.scale[1] else d
        return c, d


def _prune(states: list[tuple[float, float, float, tuple[int, ...]]],
           two: bool) -> list[tuple[float, float, float, tuple[int, ...]]]:
    """Drop dominated states; ties keep the cheaper, then the earlier (smaller index tuple)."""
    states.sort(key=lambda s: (s[0], s[1], -s[2], s[3]))
    kept: list[tuple[float, float, float, tuple[int, ...]]] = []
    if not two:
        best = -math.inf
        for s in states:
            if s[2] > best + EPS:
                kept.append(s)
                best = s[2]
        return kept
    # Sorted by first cost, a dominator of s comes before it: s is dominated when some kept state with
    # second cost <= s's has gain >= s's. A Fenwick tree over the ranks of the second cost answers "best
    # gain kept at second cost <= x" in O(log n), so pruning is O(n log n), not O(n^2) (two budgets can
    # leave tens of thousands of states).
    ranks = {c: i + 1 for i, c in enumerate(sorted({st[1] for st in states}))}
    tree = [-math.inf] * (len(ranks) + 1)
    for st in states:
        r = ranks[st[1]]
        best, i = -math.inf, r
        while i > 0:
            best, i = max(best, tree[i]), i - (i & -i)
        if best >= st[2] - EPS:
            continue
        kept.append(st)
        while r < len(tree):
            tree[r], r = max(tree[r], st[2]), r + (r & -r)
    return kept


def _run(groups: list[list[int]], options: Sequence[Any], gain: Key, costs: _Budgeted, budget: float,
         budget2: float, two: bool, max_states: int | None) -> list[tuple[float, float, float, tuple[int, ...]]] | None:
    states = [(0.0, 0.0, 0.0, ())]
    for members in groups:
        extra = []
        for i in members:
            g = float(gain(options[i]))
            if not g > 0:
                continue
            c, d = costs(options[i])
            for s in states:
                if s[0] + c <= budget and s[1] + d <= budget2:
                    extra.append((s[0] + c, s[1] + d, s[2] + g, s[3] + (i,)))
        states = _prune(states + extra, two)
        if max_states is not None and len(states) > max_states:
            return None
    return states


def _groups(options: Sequence[Any], group: Key) -> list[list[int]]:
    out: dict[Any, list[int]] = {}
    for i, o in enumerate(options):
        out.setdefault(group(o), []).append(i)
    return list(out.values())


def solve(options: Sequence[T], budget: float, budget2: float | None = None, *, group: Key = _attr("layer"),
          gain: Key = _attr("score"), cost: Key = _attr("memory_bytes"), cost2: Key | None = None,
          max_states: int = MAX_STATES, resolution: int = RESOLUTION) -> list[T]:
    """The best selection (input order) with at most one option per `group`, summed `cost` <= `budget`
    and, if `budget2` is given, summed `cost2` <= `budget2` (cost2 defaults to the attribute `ms`).

    Exact; see the module docstring for the method, tie-breaking, and the `max_states` fallback.
    """
    if budget2 is not None and cost2 is None:
        cost2 = _attr("ms")
    two = budget2 is not None
    if budget < 0 or (two and budget2 < 0):  # type: ignore[operator]
        return []
    groups = _groups(options, group)
    b2 = budget2 if two else math.inf
    states = _run(groups, options, gain, _Budgeted(cost, cost2 if two else None, None), budget, b2, two, max_states)
    if states is None:  # too many distinct cost sums: exact on costs rounded up to a grid
        scale = (budget / resolution if math.isfinite(budget) else 0.0,
                 b2 / resolution if two and math.isfinite(b2) else 0.0)
        states = _run(groups, options, gain, _Budgeted(cost, cost2 if two else None, scale), budget, b2, two, None)
    assert states is not None
    top_gain = max(s[2] for s in states)
    top = [s for s in states if s[2] >= top_gain - EPS]
    best = min(top, key=lambda s: (s[0], s[1], s[3]))
    return [options[i] for i in sorted(best[3])]


def frontier(options: Sequence[T], *, group: Key = _attr("layer"), gain: Key = _attr("score"),
             cost: Key = _attr("memory_bytes")) -> list[tuple[float, float, list[T]]]:
    """(cost, best gain, selection) at every cost where the best achievable gain rises; cost 0 first."""
    states = _run(_groups(options, group), options, gain, _Budgeted(cost, None, None), math.inf, math.inf,
                  False, None)
    assert states is not None
    return [(s[0], s[2], [options[i] for i in sorted(s[3])]) for s in states]


def brute_force(options: Sequence[T], budget: float, budget2: float | None = None, *, group: Key = _attr("layer"),
                gain: Key = _attr("score"), cost: Key = _attr("memory_bytes"),
                cost2: Key | None = None) -> tuple[float, list[T]]:
    """Every selection tried (for tests on small instances): (best gain, one best selection)."""
    import itertools

    if budget2 is not None and cost2 is None:
        cost2 = _attr("ms")
    groups = _groups(options, group)
    best: tuple[float, list[T]] = (0.0, [])
    for pick in itertools.product(*[[None] + g for g in groups]):
        chosen = [options[i] for i in pick if i is not None]
        if sum(cost(o) for o in chosen) > budget:
            continue
        if budget2 is not None and sum(cost2(o) for o in chosen) > budget2:  # type: ignore[misc]
            continue
        g = sum(gain(o) for o in chosen)
        if g > best[0] + EPS:
            best = (g, chosen)
    return best
