"""The neighbour graph and the t/k derivation."""

from __future__ import annotations

import math

import pytest

from fl_core.constants import SECAGG_COMPLETE_GRAPH_MAX
from fl_core.secagg import SecAggError
from fl_core.secagg.graph import neighbour_count, neighbours, positions, threshold


@pytest.mark.parametrize("n", [2, 3, 5, SECAGG_COMPLETE_GRAPH_MAX])
def test_small_federations_use_the_complete_graph(n: int) -> None:
    ids = [f"h{i}" for i in range(n)]
    graph = neighbours(ids, "s")
    assert neighbour_count(n) == n - 1
    assert all(set(v) == set(ids) - {k} for k, v in graph.items())


@pytest.mark.parametrize("n", [25, 50, 100, 1000])
def test_large_federations_are_k_regular_symmetric_and_log_n(n: int) -> None:
    ids = [f"h{i:04d}" for i in range(n)]
    graph = neighbours(ids, "session-1")
    k = neighbour_count(n)
    assert k % 2 == 0 or k == n - 1
    assert all(len(v) == k for v in graph.values())
    assert all(a in graph[b] for a, v in graph.items() for b in v)
    assert k <= 2 * math.ceil(6 * math.log2(n) / 2)
    # connected: one search reaches every node
    seen, todo = {ids[0]}, [ids[0]]
    while todo:
        for nb in graph[todo.pop()]:
            if nb not in seen:
                seen.add(nb)
                todo.append(nb)
    assert len(seen) == n


def test_degree_grows_like_log_n() -> None:
    ks = [neighbour_count(n) for n in (50, 100, 1000, 10000)]
    assert ks == sorted(ks) and ks[-1] < 100


def test_graph_is_the_same_for_everyone_and_changes_per_session() -> None:
    ids = [f"h{i}" for i in range(60)]
    assert neighbours(ids, "a") == neighbours(list(reversed(ids)), "a")
    assert neighbours(ids, "a") != neighbours(ids, "b")


def test_threshold_is_more_than_half_of_the_holders() -> None:
    assert threshold(2, 0.5) == 2   # 3 hospitals: one may drop
    assert threshold(4, 0.5) == 3   # 5 hospitals: two may drop
    assert threshold(1, 0.5) == 2   # 2 hospitals: none may drop
    for k in range(1, 80):
        t = threshold(k, 0.5)
        assert (k + 1) / 2 < t <= k + 1


def test_bad_inputs() -> None:
    with pytest.raises(SecAggError):
        neighbour_count(1)
    with pytest.raises(SecAggError):
        threshold(4, 1.0)
    with pytest.raises(SecAggError):
        neighbours(["a", "a"], "s")
    assert positions(["b", "a"]) == {"a": 1, "b": 2}
