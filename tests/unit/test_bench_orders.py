"""The suites' timing, from their smoke runs on CPU (benchmarks/dispatch_overhead.py, benchmarks/kernels.py):
rounds in balanced orders, every figure agreeing with the rounds it comes from, and calls taking turns."""

from __future__ import annotations

import collections
import json
import os
import statistics
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROUNDS = 20  # whole passes of the balanced orders of 4 functions (4 rounds) and of 5 (10, reversals included)


def run_suite(out, script: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CPATTN_PROVIDER"}
    done = subprocess.run([sys.executable, os.path.join("benchmarks", script), "--smoke", "--quiet", "--out", str(out),
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def overhead(tmp_path_factory):
    out = tmp_path_factory.mktemp("dispatch_overhead")
    return out, run_suite(out, "dispatch_overhead.py", "--devices", "cpu", "--providers", "native", "_native_flash",
                          "--rounds", str(ROUNDS), "--calls", "50")


def test_overhead_rounds_give_every_function_each_position_and_predecessor_equally(overhead):
    _, result = overhead
    rows = result["devices"]["cpu"]["providers"]
    # native adds the call with no provider block open: an odd number of functions, the harder case
    assert [len(rows[p]["us_per_call"]) for p in ("native", "_native_flash")] == [5, 4]
    for row in rows.values():
        names, orders = sorted(row["us_per_call"]), row["orders"]
        n = len(names)
        assert len(orders) == ROUNDS and all(sorted(order) == names for order in orders)
        positions = collections.Counter((name, p) for order in orders for p, name in enumerate(order))
        assert len(positions) == n * n and set(positions.values()) == {ROUNDS // n}
        follows = collections.Counter((order[p], order[p + 1]) for order in orders for p in range(n - 1))
        assert len(follows) == n * (n - 1) and len(set(follows.values())) == 1


def test_overhead_figures_come_from_their_rounds(overhead):
    out, result = overhead
    cpu = result["devices"]["cpu"]
    assert cpu["shape_bhsd"] == [1, 1, 8, 8] and cpu["dtype"] == "float32" and cpu["calls_back_to_back"] == 50
    for provider, row in cpu["providers"].items():
        rounds = row["round_us"]
        assert all(len(us) == ROUNDS and min(us) > 0 for us in rounds.values())
        assert row["us_per_call"] == {name: statistics.median(us) for name, us in rounds.items()}
        over = row["added_us"]["dispatch"]
        assert set(over) == {"over_sdpa", "over_kernel", "over_runner"}
        assert over["over_sdpa"] == pytest.approx(row["us_per_call"]["dispatch"] - row["us_per_call"]["sdpa"])
        paired = statistics.median(d - k for d, k in zip(rounds["dispatch"], rounds["kernel"]))
        assert row["added_us_paired"]["dispatch"]["over_kernel"] == pytest.approx(paired)
        assert set(row["functions"]) == set(rounds)  # each timed function says what it calls
        thread = row["thread_cpu_time"]  # one thread's CPU time cannot exceed the wall time of the same loop
        assert all(0 < c <= w * 1.001 + 0.05 for name in rounds for c, w in zip(thread["round_us"][name], rounds[name]))
        assert thread["us_per_call"] == {name: statistics.median(us) for name, us in thread["round_us"].items()}
    assert "dispatch_default" in cpu["providers"]["native"]["added_us"]
    pytest.importorskip("matplotlib")
    assert (out / "dispatch_overhead_cpu.png").stat().st_size > 0


@pytest.mark.parametrize("timing", ["rounds", "interleaved"])
def test_kernels_compare_dispatch_and_direct_calls_taking_turns(tmp_path, timing):
    result = run_suite(tmp_path, "kernels.py", "--device", "cpu", "--providers", "native", "--timing", timing,
                       "--no-plot")
    rows = result["kernels"]
    assert {(r["causal"], r["backward"]) for r in rows} == {(c, b) for c in (False, True) for b in (False, True)}
    for r in rows:
        assert "error" not in r, r
        dispatch, direct = r["dispatch"], r["direct"]
        for timed in (dispatch, direct):
            assert 0 < timed["p20_ms"] <= timed["median_ms"] <= timed["p80_ms"]
            assert timed["tflops"] == pytest.approx(
                4 * r["B"] * r["H"] * r["S"] ** 2 * r["D"] * (0.5 if r["causal"] else 1) * (3.5 if r["backward"] else 1)
                / (timed["median_ms"] * 1e-3) / 1e12)
            assert "call_ms" not in timed  # per-call times stay out of the record
        assert r["dispatch_vs_direct"] == pytest.approx(direct["median_ms"] / dispatch["median_ms"])
        if timing == "rounds":
            assert len(r["round_ratios"]) == result["rounds"] == 2
            assert r["dispatch_vs_direct_paired"] == pytest.approx(statistics.median(r["round_ratios"]))
        else:  # one call each per turn: as many calls of either, summarised in six consecutive runs
            assert dispatch["calls"] == direct["calls"] >= 12
            assert len(dispatch["round_medians_ms"]) == len(direct["round_medians_ms"]) == 6
            assert r["dispatch_vs_direct_paired"] > 0
