"""benchmarks/score_mods.py and benchmarks/decode.py smoke runs on CPU, as subprocesses: every case ran, the
windowed ring split (fused and separate halos) computes the whole call's dQ, its byte counts follow the halo
plan, and the decode partials merge to the whole call."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _smoke(script: str, out, *extra) -> dict:
    done = subprocess.run([sys.executable, os.path.join("benchmarks", script), "--smoke", "--quiet", "--no-plot",
                           "--device", "cpu", "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads((out / f"{os.path.splitext(script)[0]}_cpu.json").read_text())


@pytest.fixture(scope="module")
def score_mods(tmp_path_factory):
    return _smoke("score_mods.py", tmp_path_factory.mktemp("score_mods"), "--sections", "kernels", "ring")


def test_windowed_ring_split_computes_the_whole_call(score_mods):
    ring = score_mods["ring"]
    assert {(r["layout"], r["halo"]) for r in ring} == {(a, b) for a in ("zigzag", "contiguous")
                                                       for b in ("fused", "separate")}
    for r in ring:
        assert "error" not in r, r
        assert r["max_diff_vs_whole"] < 1e-4, r
        assert r["efficiency"] == pytest.approx(r["whole"]["median_ms"] / r["split"]["median_ms"])


def test_windowed_ring_sends_about_a_window_per_chunk(score_mods):
    """Smoke: S 256 over 4 ranks, window 24 (23 keys back): zigzag chunks of 32 need 23 keys each from one
    neighbour (two chunks: 46 tokens from the busiest rank), contiguous shards one run of 23."""
    for r in score_mods["ring"]:
        per_token = r["kv_bytes_sent_rotating_ring"] // ((r["P"] - 1) * (r["S"] // r["P"]))
        busiest = max(r["kv_bytes_sent_per_rank"]) // per_token
        assert busiest == (46 if r["layout"] == "zigzag" else 23), r


def test_windowed_kernels_recorded(score_mods):
    rows = score_mods["kernels"]
    assert rows and all("error" not in r for r in rows), rows
    assert all(r["vs_causal"] > 0 for r in rows)


def test_decode_partials_merge_to_the_whole_call(tmp_path):
    payload = _smoke("decode.py", tmp_path)
    assert payload["cases"]
    for r in payload["cases"]:
        assert "error" not in r, r
        assert r["max_diff"] < 1e-5, r
        assert r["combine_bytes"] == r["ranks"] * r["Hq"] * r["new_tokens"] * (r["D"] + 1) * 4
