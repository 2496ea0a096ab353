"""The benchmark harness's round orders: every function in every position, none always after the same one."""

from __future__ import annotations

import pytest

from benchmarks.run import balanced_orders


@pytest.mark.parametrize("n", range(1, 9))
def test_each_function_takes_each_position_once(n):
    orders = balanced_orders(n)
    assert len(orders) == n
    assert all(sorted(order) == list(range(n)) for order in orders)
    for position in range(n):
        assert sorted(order[position] for order in orders) == list(range(n))


@pytest.mark.parametrize("n", [2, 4, 6, 8])
def test_each_function_follows_each_other_once(n):
    pairs = [(order[p], order[p + 1]) for order in balanced_orders(n) for p in range(n - 1)]
    assert len(pairs) == len(set(pairs)) == n * (n - 1)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_interleaved_turns_give_every_function_each_position_and_predecessor_equally(n):
    from benchmarks.run import turn_orders

    turns = turn_orders(n, 2 * n * 3)
    assert all(sorted(t) == list(range(n)) for t in turns)
    positions = {(t[p], p) for t in turns for p in range(n)}
    assert positions == {(f, p) for f in range(n) for p in range(n)}
    follows = [(t[p], t[p + 1]) for t in turns for p in range(n - 1)]
    counts = {pair: follows.count(pair) for pair in set(follows)}
    assert len(counts) == n * (n - 1) and len(set(counts.values())) <= 1  # each ordered pair equally often


def test_call_summary_and_paired_ratio():
    from benchmarks.run import paired_ratio, summarize_calls

    calls = [float(x) for x in range(1, 13)]  # drifting upwards
    summary = summarize_calls(calls, chunks=3)
    assert summary["median_ms"] == 6.5 and summary["calls"] == 12
    assert summary["round_medians_ms"] == [2.5, 6.5, 10.5]
    assert summary["p20_ms"] <= summary["median_ms"] <= summary["p80_ms"]
    # the same drift in both: the turn-by-turn ratio sees only the 10% difference
    slower = [1.1 * c for c in calls]
    assert paired_ratio(calls, slower) == pytest.approx(1 / 1.1)
