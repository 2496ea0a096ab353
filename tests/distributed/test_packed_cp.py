"""Packed (varlen) sequences under context parallelism: flash_varlen_attention on shards of one packed stream.

Documents cross shard boundaries (and one is empty); every rank passes the stream's global cu_seqlens. Runs on the
FlashAttention-2 stand-in (tests/support/standins/, the library's API computed in float32 on CPU) at 2, 3 and 4 gloo ranks,
zigzag and contiguous, causal or not, GQA, forward and backward against the float64 reference of the whole stream
with a document mask. One world per world size runs every case (cp_harness.packed_ranks).
benchmarks/gpu_check.py --packed-worlds runs the same worker with the real library on a GPU.
"""

from __future__ import annotations

import pytest

from cp_harness import packed_ranks
from reliability_helpers import RankResult, run_ranks

pytestmark = pytest.mark.distributed

ACROSS_SHARDS = [("zigzag", True), ("contiguous", True), ("zigzag", False)]
PAYLOADS = {
    **{("across", layout, causal): (layout, causal, "auto", "cpu", "fa2", True) for layout, causal in ACROSS_SHARDS},
    # 8 tokens and 8 heads: a mix-up of the packed (tokens, heads, head_dim) dims cannot pass on shapes
    ("heads_equal_tokens",): ("zigzag", True, "auto", "cpu", "fa2", True, [0, 3, 8], (8, 8, 16)),
    ("ring",): ("zigzag", True, "ring", "cpu", "fa2", True),
}


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda w: f"W{w}")
def world(request):
    """(W, {case: every rank's RankResult}) of one world running every payload."""
    w = request.param
    keys, payloads = zip(*PAYLOADS.items())
    result = run_ranks(w, packed_ranks, list(payloads), timeout=300)
    for r in result.ranks:
        assert r.error is None, f"rank {r.rank}: {r.error_type}: {r.error}"
    as_result = lambda rank, value, error_type, error: RankResult(rank, value, error, error_type)  # noqa: E731
    return w, {key: [as_result(r.rank, *r.value[i]) for r in result.ranks] for i, key in enumerate(keys)}


@pytest.mark.parametrize("layout,causal", ACROSS_SHARDS)
def test_packed_documents_across_shards(world, layout, causal):
    _, results = world
    ranks = results[("across", layout, causal)]
    for r in ranks:
        assert r.error is None, f"rank {r.rank}: {r.error_type}: {r.error}"
    errors, stats = ranks[0].value
    assert errors["out"] < 2e-2 and max(errors["dq"], errors["dk"], errors["dv"]) < 3e-2, errors
    assert stats["all_gather"] == 2 and stats["reduce_scatter"] == 2, stats  # K and V, forward and backward


def test_packed_heads_equal_tokens(world):
    """8 tokens and 8 heads: a mix-up of the packed (tokens, heads, head_dim) dims cannot pass on shapes."""
    _, results = world
    ranks = results[("heads_equal_tokens",)]
    for r in ranks:
        assert r.error is None, f"rank {r.rank}: {r.error_type}: {r.error}"
    errors, _ = ranks[0].value
    assert errors["out"] < 2e-2 and max(errors["dq"], errors["dk"], errors["dv"]) < 3e-2, errors


def test_packed_under_ring_is_refused_on_every_rank(world):
    """Shards by position (shard_sequence) run all-gather: cp_strategy='ring' is refused, naming the ways out."""
    _, results = world
    for r in results[("ring",)]:
        assert r.error_type == "UnsupportedInputError", (r.rank, r.error_type, r.error)
        assert "cp_strategy='allgather'" in r.error and "document_mask" in r.error


def test_query_runs_and_calls():
    from cpattn.cp.packed import RunCall, query_runs, run_calls

    assert query_runs([0, 1, 2, 9, 10]) == [(0, 0, 3), (3, 9, 11)]
    assert query_runs([]) == []
    # run [4, 12) of documents [0,5) [5,6) [6,17): rows 1 + 1 + 6, keys from 0 (causal: up to 12)
    assert run_calls([0, 5, 6, 17], 4, 12, True) == [RunCall(4, 12, 0, (0, 1, 2, 8), (0, 5, 6, 12), True, None)]
    assert run_calls([0, 5, 6, 17], 4, 12, False) == [RunCall(4, 12, 0, (0, 1, 2, 8), (0, 5, 6, 17), False, None)]


def test_run_calls_with_windows():
    """Keys cut to the band; a document the run's end cuts, without causal attention, gets its own call, its
    window moved by how far its keys reach past its last query."""
    from cpattn.cp.packed import RunCall, run_calls

    # causal window 2: the first document's keys start 2 before the run; every segment ends where its keys end
    assert run_calls([0, 5, 6, 17], 4, 12, True, (2, 5)) == [
        RunCall(4, 12, 2, (0, 1, 2, 8), (0, 3, 4, 10), False, (2, 0))]
    # two-sided (2, 3): document [6, 17) is cut at 12, its keys reach 15: window (2 + 3, 3 - 3)
    assert run_calls([0, 5, 6, 17], 4, 12, False, (2, 3)) == [
        RunCall(4, 6, 2, (0, 1, 2), (0, 3, 4), False, (2, 3)),
        RunCall(6, 12, 6, (0, 6), (0, 9), False, (5, 0))]
    # left unbounded, right 1: the cut document's keys reach 13, window (None, 0) is causal
    assert run_calls([0, 17], 3, 12, False, (None, 1)) == [RunCall(3, 12, 0, (0, 9), (0, 13), True, None)]
    # right unbounded: every key after the cut, window (4 + 5, None)
    assert run_calls([0, 17], 3, 12, False, (4, None)) == [RunCall(3, 12, 0, (0, 9), (0, 17), False, (9, None))]
