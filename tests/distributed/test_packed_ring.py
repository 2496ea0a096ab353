"""The packed ring (cpattn/cp/packed_ring.py) on streams sharded by documents (cpattn.packed.shard_packed).

One spawned world per W in {1, 2, 3, 4} runs every case (tests/support/cp_harness.py: PackedCase,
packed_documents_rank), forward and backward, against the float64 reference of the whole stream with a document
mask, computed from the very values the kernels get (inputs representable in the case's dtype). Kernels:
`flash_varlen` on the FlashAttention-2 stand-in (tests/support/standins/, its varlen API in float32 on CPU,
bfloat16 inputs), `native` in float64 with dense document masks per group of documents, `flash` with one call
per document. Streams: documents of length 1, shorter than a shard, longer than S/W (split over every rank, so
it crosses every shard boundary), an empty one; 40 two-token documents (every step but the rank's own skipped);
one document (the dense zigzag); and length mixes drawn by hypothesis. Every rank's transfers are checked
against the step plans: a skipped step sends nothing.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cp_harness import PackedCase, packed_documents_rank
from reliability_helpers import run_ranks

pytestmark = pytest.mark.distributed

WORLDS = (1, 2, 3, 4)
MIXED = (0, 1, 4, 34, 35, 42, 42, 54, 60)  # lengths 1, 3, 30, 1, 7, 0, 12, 6
TINY = tuple(range(0, 82, 2))  # 40 documents of 2 tokens: all whole
ONE = (0, 45)
# (out, gradients) against float64: bfloat16 outputs of magnitude up to ~4 round by up to 8e-3 per rounding (a
# block and the result), gradients sum bfloat16 parts; float64 is bounded by the contract's float32 log-sum-exp
TOLERANCE = {"bfloat16": (3e-2, 6e-2), "float64": (1e-6, 1e-5)}


def _drawn_streams(count: int) -> list[tuple]:
    """Document boundaries of `count` length mixes drawn by hypothesis (derandomized: the same every run)."""
    drawn = []
    lengths = st.lists(st.one_of(st.integers(0, 2), st.integers(3, 9), st.integers(10, 40)), min_size=1, max_size=7)

    @settings(max_examples=4 * count, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(lengths)
    def draw(mix):
        if sum(mix) and tuple(mix) not in drawn:
            drawn.append(tuple(mix))

    draw()
    bounds = []
    for mix in drawn[:count]:
        cu = [0]
        for n in mix:
            cu.append(cu[-1] + n)
        bounds.append(tuple(cu))
    return bounds


DRAWN = _drawn_streams(4)

CASES = {
    "mixed-varlen-causal": PackedCase(MIXED),
    "mixed-varlen": PackedCase(MIXED, causal=False),
    "mixed-native-causal": PackedCase(MIXED, provider="native", dtype="float64"),
    "mixed-native": PackedCase(MIXED, causal=False, provider="native", dtype="float64"),
    "mixed-flash-per-document": PackedCase(MIXED, provider="flash"),
    "mixed-flash_varlen_attention": PackedCase(MIXED, api="flash_varlen", seed=1),
    "mixed-allgather": PackedCase(MIXED, api="flash_varlen", strategy="allgather", seed=2),
    "mixed-ring-mha": PackedCase(MIXED, strategy="ring", heads=(2, 2, 8), seed=3),
    "tiny-varlen-causal": PackedCase(TINY),
    "tiny-native": PackedCase(TINY, causal=False, provider="native", dtype="float64"),
    "one-varlen-causal": PackedCase(ONE),
    **{f"drawn{i}-varlen-causal": PackedCase(b, seed=10 + i) for i, b in enumerate(DRAWN)},
    **{f"drawn{i}-native": PackedCase(b, causal=False, provider="native", dtype="float64", seed=20 + i)
       for i, b in enumerate(DRAWN)},
}
REFUSALS = {
    "window": PackedCase(MIXED, provider="native", dtype="float64", window=(3, 0)),
    "softcap-and-sinks": PackedCase(MIXED, softcap=20.0, sinks=True),
    "ulysses": PackedCase(MIXED, strategy="ulysses"),
    "allgather-on-a-mask-provider": PackedCase(MIXED, provider="native", dtype="float64", strategy="allgather"),
    # shard_sequence's shards: their lengths differ from the document layout's here at every W > 1
    "sequence-shards": PackedCase((0, 7, 13, 40, 44, 47), shard="sequence"),
}


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"W{w}")
def world(request):
    """(W, {case name: [every rank's result]}) of one world running every case."""
    w = request.param
    names, cases = zip(*{**CASES, **REFUSALS}.items())
    result = run_ranks(w, packed_documents_rank, list(cases), timeout=300)
    for r in result.ranks:
        assert r.error is None, f"rank {r.rank}: {r.error}"
    return w, {name: [r.value[i] for r in result.ranks] for i, name in enumerate(names)}


@pytest.mark.parametrize("name", CASES)
def test_exact_against_float64(world, name):
    w, results = world
    out_tol, grad_tol = TOLERANCE[CASES[name].dtype]
    for rank, r in enumerate(results[name]):
        assert "exception" not in r, (rank, r["exception"])
        errors = r["errors"]
        assert errors["out"] < out_tol and max(errors["dq"], errors["dk"], errors["dv"]) < grad_tol, (rank, errors)
        assert errors["position_ids"] == 0 and errors["local_cu_seqlens_end"] == 0, errors


def _expected_traffic(case: PackedCase, w: int, rank: int) -> dict:
    """What `rank` must send and skip, read from the step plans (forward and backward together)."""
    from cpattn.cp.packed_plan import step_plan
    from cpattn.packed import packed_layout

    layout = packed_layout(case.bounds, w)
    hq, hkv, d = case.heads
    element = 8 if case.dtype == "float64" else 2
    plan = lambda consumer, owner: step_plan(layout, consumer % w, owner % w, case.causal)  # noqa: E731
    sent = [plan(rank + s, rank) for s in range(1, w)] + [plan(rank + s, rank) for s in range(1, w - 1)]
    sent = [p for p in sent if p is not None]
    return {
        "kv_sends": len(sent),
        "kv_bytes": sum(2 * p.kv_len * hkv * d * element for p in sent),
        "dkv_sends": sum(plan(rank, rank - s) is not None for s in range(1, w)),
        "packed_skipped_steps": sum(plan(rank, rank - s) is None for s in range(w)),
    }


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.strategy != "allgather"])
def test_every_transfer_is_one_the_plans_need(world, name):
    w, results = world
    for rank, r in enumerate(results[name]):
        want = _expected_traffic(CASES[name], w, rank)
        have = {key: r["stats"].get(key, 0) for key in want}
        assert have == want, (rank, have, want)


def test_skipped_steps_send_nothing(world):
    """Whole documents only: each rank computes its own step and nothing else, and nothing moves."""
    w, results = world
    for rank, r in enumerate(results["tiny-varlen-causal"]):
        stats = r["stats"]
        assert stats.get("kv_sends", 0) == 0 and stats.get("kv_bytes", 0) == 0, stats
        assert stats.get("dkv_sends", 0) == 0 and stats.get("packed_skipped_steps", 0) == w - 1, stats
        assert stats["packed_steps"] == 1, stats


def test_a_split_document_reaches_every_rank(world):
    """The 30-token document is split over every rank (W >= 2): every step computes, every rank sends."""
    w, results = world
    if w == 1:
        pytest.skip("one rank: nothing to split")
    for r in results["mixed-varlen-causal"]:
        assert r["forward_stats"]["packed_steps"] == w and r["forward_stats"]["kv_sends"] == w - 1, r["stats"]


def test_allgather_over_document_shards(world):
    w, results = world
    for r in results["mixed-allgather"]:
        assert r["stats"].get("all_gather", 0) == 2 and r["stats"].get("reduce_scatter", 0) == 2, r["stats"]
        assert "kv_sends" not in r["stats"], r["stats"]


@pytest.mark.parametrize("name,error,words", [
    ("window", "UnsupportedInputError", ["window=(3, 0) is not supported on packed streams",
                                         "cpattn.document_mask"]),
    ("softcap-and-sinks", "UnsupportedInputError", ["softcap=20.0 is not supported on packed streams",
                                                    "sinks is not supported on packed streams"]),
    ("ulysses", "UnsupportedInputError", ["cp_strategy='ring' (or 'auto') or 'allgather', not 'ulysses'"]),
    ("allgather-on-a-mask-provider", "UnsupportedInputError", ["runs on varlen kernels only"]),
    ("sequence-shards", "RankMismatchError", ["do not match the document layout", "shard_packed"]),
])
def test_refused_on_every_rank(world, name, error, words):
    w, results = world
    if name == "sequence-shards" and w == 1:
        pytest.skip("one rank: every sharding is the whole stream")
    for rank, r in enumerate(results[name]):
        assert r.get("exception", "").startswith(error), (rank, r)
        for word in words:
            assert word in r["exception"], (rank, r["exception"])
