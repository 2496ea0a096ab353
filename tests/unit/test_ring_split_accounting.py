"""benchmarks/ring_split.py's smoke run on CPU: the blocks a zigzag ring computes (recorded per case), that the
split computes what the whole call does, and the figures drawn from its timings. The GPU-only options
(--accounting, --sustained, --profile, --back-to-back) are refused without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
S, PARTS = 96, (2, 3, 4)


def run_suite(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join("benchmarks", "ring_split.py"), "--smoke", "--quiet", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("ring_split")
    done = run_suite("--device", "cpu", "--block-shapes", "--masks", "causal", "noncausal", "--seqs", str(S),
                     "--parts", *map(str, PARTS), "--out", str(out), "--no-plot")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads((out / "ring_split_cpu.json").read_text())


def _shapes(row) -> dict:
    return {(b["rows"], b["keys"], b["causal"]): b["count"] for b in row["block_times"]["shapes"]}


def test_every_case_ran_and_the_split_computes_the_whole_call(result):
    cases = result["cases"]
    assert {(r["P"], r["causal"], r["backward"]) for r in cases} == {
        (p, c, b) for p in PARTS for c in (True, False) for b in (True, False)}
    for r in cases:
        assert "error" not in r, r
        assert r["max_diff_vs_whole"] < 1e-4, r  # float32: the output, or dQ, of every rank
        assert r["efficiency"] == pytest.approx(r["whole"]["median_ms"] / r["split"]["median_ms"])
        assert len(r["round_efficiencies"]) == result["rounds"] and r["split_host_ms"] > 0


@pytest.mark.parametrize("p", PARTS)
def test_zigzag_blocks(result, p):
    # each rank: its diagonal block causal, and a half block per other rank (all its queries x an earlier
    # source's early chunk, or its late chunk x all of a later source's keys)
    (row,) = [r for r in result["cases"] if r["P"] == p and r["causal"] and r["backward"]]
    n = S // p
    assert _shapes(row) == {(n, n, True): p, (n, n // 2, False): p * (p - 1) // 2,
                            (n // 2, n, False): p * (p - 1) // 2}
    work = sum(rows * keys * (0.5 if causal else 1.0) * count for (rows, keys, causal), count in _shapes(row).items())
    assert work == S * S / 2  # the causal work, each part once
    (full,) = [r for r in result["cases"] if r["P"] == p and not r["causal"] and r["backward"]]
    assert _shapes(full) == {(n, n, False): p * p}


def test_block_times_give_the_kernel_bound(result):
    for r in (r for r in result["cases"] if r["backward"]):
        for direction in ("forward", "forward+backward"):
            timed = r["block_times"][direction]
            whole, *blocks = timed["blocks"]
            assert (whole["rows"], whole["keys"], whole["count"]) == (S, S, 0)
            assert timed["sum_of_blocks_ms"] == pytest.approx(sum(b["median_ms"] * b["count"] for b in blocks))
            assert timed["kernel_bound"] == pytest.approx(whole["median_ms"] / timed["sum_of_blocks_ms"])
    assert all("block_times" not in r for r in result["cases"] if not r["backward"])


def test_gpu_only_options_are_refused_on_cpu():
    done = run_suite("--device", "cpu", "--accounting")
    assert done.returncode == 2 and "need a GPU" in done.stderr
