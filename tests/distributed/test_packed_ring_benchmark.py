"""benchmarks/packed_ring.py's smoke run on CPU, as a subprocess: every case ran, the split computes the whole
call's dQ, and the figures it records (counted-work balance, K/V bytes held per rank against all-gather) are
consistent with the stream it drew."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed_ring")
    done = subprocess.run([sys.executable, os.path.join("benchmarks", "packed_ring.py"), "--smoke", "--quiet",
                           "--device", "cpu", "--parts", "2", "4", "--per-chain-dq", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out, json.loads((out / "packed_ring_cpu.json").read_text())


def test_every_case_ran_and_the_split_computes_the_whole_call(result):
    _, payload = result
    assert payload["suite"] == "packed_ring" and {r["P"] for r in payload["cases"]} == {2, 4}
    for r in payload["cases"]:
        assert "error" not in r, r
        assert r["max_diff_vs_whole"] < 1e-4, r  # float32 dQ of every rank
        assert r["efficiency"] == pytest.approx(r["whole"]["median_ms"] / r["split"]["median_ms"])
        assert r["split_host_ms"] > 0
        # --per-chain-dq: the split without one dQ accumulator per rank, timed in the same rounds, same dQ
        assert r["per_chain_dq_max_diff_vs_whole"] < 1e-4, r
        assert r["efficiency_per_chain_dq"] == pytest.approx(
            r["whole"]["median_ms"] / r["split_per_chain_dq"]["median_ms"])
        assert len(r["split_per_chain_dq"]["round_medians_ms"]) == len(r["split"]["round_medians_ms"])


def test_recorded_balance_and_memory(result):
    from cpattn.cp.packed_layout import causal_work

    _, payload = result
    for r in payload["cases"]:
        assert sum(r["tokens_per_rank"]) == r["S"] and len(r["counted_work_per_rank"]) == r["P"]
        work = r["counted_work_per_rank"]
        assert r["work_max_over_mean"] == pytest.approx(max(work) / (sum(work) / r["P"]))
        assert r["work_max_over_mean"] < 1.1 < r["position_sharded_work_max_over_mean"]
        per_token = 2 * r["kv_heads"] * r["D"] * 4  # K and V, float32
        assert r["kv_bytes_held_allgather"] == r["S"] * per_token
        assert all(t * per_token <= held for t, held in zip(r["tokens_per_rank"], r["kv_bytes_held_per_rank"]))
        assert r["kv_held_max_over_allgather"] == pytest.approx(max(r["kv_bytes_held_per_rank"]) / (r["S"] * per_token))
        assert r["kv_held_max_over_allgather"] < 1
        assert sum(work) == sum(causal_work(n) for n in r["document_lengths"])  # each pair counted once


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="the plot needs matplotlib")
def test_plot_written(result):
    out, _ = result
    assert (out / "packed_ring_cpu.png").stat().st_size > 0


def test_plans_only_counts_without_timing(tmp_path):
    """--plans-only: the layout's and plans' counts for the full-size stream, no kernel run, no timing; its
    call count is one per step that computes (no window: one chain per step)."""
    from cpattn.cp.packed_plan import step_plan
    from cpattn.packed import packed_layout

    done = subprocess.run([sys.executable, os.path.join("benchmarks", "packed_ring.py"), "--plans-only", "--quiet",
                           "--no-plot", "--device", "cpu", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (row,) = json.loads((tmp_path / "packed_ring_cpu.json").read_text())["cases"]
    assert "efficiency" not in row and "whole" not in row
    bounds = [0]
    for n in row["document_lengths"]:
        bounds.append(bounds[-1] + n)
    layout = packed_layout(bounds, row["P"])
    steps = sum(step_plan(layout, r, s, True) is not None for r in range(row["P"]) for s in range(row["P"]))
    assert row["S"] == 131072 and row["forward_kernel_calls"] == steps
    assert row["pieces"] >= steps and row["work_max_over_mean"] < 1.05 and row["kv_held_max_over_allgather"] < 1


def test_split_with_steps_that_receive_and_send_nothing():
    """A document split over two of four ranks: the rank at the group's end receives its neighbour's keys at
    step 1 and sends nothing to the next rank. The benchmark's prebuilt blocks must still reach that step."""
    import torch

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import packed_ring
    from cpattn.cp.packed_plan import step_plan

    case = packed_ring.Case("native", 384, 4, 24, 1.0, 1, True, "cpu", 2, 2, 8)
    whole, split, layout, positions = packed_ring.packed_split_case(case)
    receive_only = [(me, s) for me in range(4) for s in range(1, 4)
                    if step_plan(layout, me, (me - s) % 4, True) and not step_plan(layout, (me + s) % 4, me, True)]
    assert receive_only
    dq = whole()
    for p, got in zip(positions, split()):
        torch.testing.assert_close(got, dq.index_select(0, p), atol=1e-5, rtol=1e-5)
