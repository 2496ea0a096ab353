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
