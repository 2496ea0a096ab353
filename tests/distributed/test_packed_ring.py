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

Windows, softcaps and sinks per document: against a float64 reference built one document at a time
(cp_harness.documents_reference: cpattn.reference_attention per document with its window, softcap and sinks),
the sinks' gradient as the ranks' shares summed (the replicated parameter's all-reduce). Windows (0, 0), wider
than every document, causal, two-sided non-causal; on a document longer than S/W, split over every rank; with
GQA; and streams with windows, softcaps and sinks drawn by hypothesis. All-gather's varlen calls (cp/packed.py)
take the same windows, on document shards and on shards by position, and sinks on the FlashAttention-4 stand-in
(native sinks); on FlashAttention-2 they are refused. What is refused is refused on every rank with a message
that says what to use.

The hybrid schedule on 2-D meshes of every shape with W ranks (2 x 1, 1 x 2, 3 x 1, 1 x 3, 2 x 2): Ulysses over
the mesh's Ulysses dimension around the packed ring, windows, softcaps and sinks, uneven head splits and
repeated KV heads, against the same references; each runs in the world of its W (the other worlds skip it).
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
LONG = (0, 2, 50, 51, 58)  # lengths 2, 48 (longer than S/W at every W > 1: split over every rank), 1, 7
ONE_SPLIT = (0, 48)
# (out, gradients) against float64: bfloat16 outputs of magnitude up to ~4 round by up to 8e-3 per rounding (a
# block and the result), gradients sum bfloat16 parts; float64 is bounded by the contract's float32 log-sum-exp
TOLERANCE = {"bfloat16": (3e-2, 6e-2), "float64": (1e-6, 1e-5)}
# the sinks' gradient sums rowsum(dout * out) over every row of the stream: bfloat16 outputs, ~60 rows
SINKS_TOLERANCE = {"bfloat16": 0.15, "float64": 1e-5}


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


def _drawn_mods(count: int) -> list[dict]:
    """`count` mixes of window, causality, softcap and sinks drawn by hypothesis (derandomized), one per drawn
    stream."""
    drawn = []
    side = st.one_of(st.none(), st.integers(0, 12))
    mods = st.fixed_dictionaries({"window": st.tuples(side, side), "causal": st.booleans(),
                                  "softcap": st.one_of(st.none(), st.sampled_from([2.0, 6.0])),
                                  "sinks": st.booleans()})

    @settings(max_examples=4 * count, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(mods)
    def draw(m):
        if m["window"] != (None, None) and m not in drawn:
            drawn.append(m)

    draw()
    return drawn[:count]


DRAWN_MODS = _drawn_mods(3)

CASES = {
    "mixed-varlen-causal": PackedCase(MIXED),
    "mixed-varlen": PackedCase(MIXED, causal=False),
    "mixed-native-causal": PackedCase(MIXED, provider="native", dtype="float64"),
    "mixed-native": PackedCase(MIXED, causal=False, provider="native", dtype="float64"),
    "mixed-flash-per-document": PackedCase(MIXED, provider="flash"),
    "mixed-flash_varlen_attention": PackedCase(MIXED, api="flash_varlen", seed=1),
    "mixed-varlen-causal-positions": PackedCase(MIXED, positions=True, seed=4),
    "long-flash_varlen_attention-positions": PackedCase(LONG, api="flash_varlen", positions=True, seed=5),
    "mixed-allgather": PackedCase(MIXED, api="flash_varlen", strategy="allgather", seed=2),
    "mixed-ring-mha": PackedCase(MIXED, strategy="ring", heads=(2, 2, 8), seed=3),
    "tiny-varlen-causal": PackedCase(TINY),
    "tiny-native": PackedCase(TINY, causal=False, provider="native", dtype="float64"),
    "one-varlen-causal": PackedCase(ONE),
    **{f"drawn{i}-varlen-causal": PackedCase(b, seed=10 + i) for i, b in enumerate(DRAWN)},
    **{f"drawn{i}-native": PackedCase(b, causal=False, provider="native", dtype="float64", seed=20 + i)
       for i, b in enumerate(DRAWN)},
    # windows, softcaps and sinks, per document
    "long-window-causal": PackedCase(LONG, window=(5, 0), seed=30),
    "one-short-window-causal": PackedCase(ONE_SPLIT, window=(2, 0), seed=38),
    "long-window-two-sided-softcap-sinks": PackedCase(LONG, causal=False, window=(3, 7), softcap=4.0, sinks=True,
                                                      seed=31),
    "mixed-window-0-0-sinks-native": PackedCase(MIXED, window=(0, 0), sinks=True, provider="native",
                                                dtype="float64", seed=32),
    "mixed-wide-window-softcap-math": PackedCase(MIXED, causal=False, window=(64, 64), softcap=3.0,
                                                 provider="_native_math", dtype="float64", seed=33),
    "long-window-flash-per-piece": PackedCase(LONG, causal=False, window=(4, 2), provider="flash", seed=34),
    "mixed-sinks-gqa-4-1": PackedCase(MIXED, sinks=True, heads=(4, 1, 8), seed=35),
    "mixed-flash_varlen_attention-mods": PackedCase(MIXED, api="flash_varlen", window=(6, 0), softcap=5.0,
                                                    sinks=True, seed=36),
    "mixed-allgather-softcap": PackedCase(MIXED, api="flash_varlen", strategy="allgather", softcap=5.0, seed=37),
    # all-gather's varlen calls with a window per document: on document shards and on shards by position; LONG's
    # 48-token document is cut by every run of queries, so its non-causal windows take calls of their own
    "mixed-allgather-window-causal": PackedCase(MIXED, api="flash_varlen", strategy="allgather", window=(3, 0),
                                                seed=90),
    "long-allgather-two-sided-softcap": PackedCase(LONG, api="flash_varlen", strategy="allgather", causal=False,
                                                   window=(3, 7), softcap=4.0, seed=91),
    "long-allgather-left-only": PackedCase(LONG, api="flash_varlen", strategy="allgather", causal=False,
                                           window=(4, None), seed=92),
    "long-allgather-right-only-sinks-fa4": PackedCase(LONG, api="flash_varlen", strategy="allgather",
                                                      causal=False, window=(None, 2), sinks=True, library="fa4",
                                                      seed=93),
    "mixed-sequence-shards-window": PackedCase(MIXED, api="flash_varlen", shard="sequence", window=(3, 0),
                                               seed=94),
    "mixed-sequence-shards-positions": PackedCase(MIXED, api="flash_varlen", shard="sequence", positions=True,
                                                  seed=96),
    "long-sequence-shards-two-sided-sinks-fa4": PackedCase(LONG, api="flash_varlen", shard="sequence",
                                                           causal=False, window=(3, 7), softcap=4.0, sinks=True,
                                                           heads=(4, 1, 8), library="fa4", seed=95),
    **{f"drawn{i}-mods-math": PackedCase(DRAWN[i], provider="_native_math", dtype="float64", seed=40 + i,
                                         causal=m["causal"], window=m["window"], softcap=m["softcap"],
                                         sinks=m["sinks"])
       for i, m in enumerate(DRAWN_MODS)},
    **{f"drawn{i}-mods-varlen": PackedCase(DRAWN[i], seed=50 + i, causal=m["causal"], window=m["window"],
                                           softcap=m["softcap"], sinks=m["sinks"])
       for i, m in enumerate(DRAWN_MODS)},
    **{f"drawn{i}-mods-allgather-fa4": PackedCase(DRAWN[i], api="flash_varlen", strategy="allgather", seed=60 + i,
                                                  causal=m["causal"], window=m["window"], softcap=m["softcap"],
                                                  sinks=m["sinks"], library="fa4")
       for i, m in enumerate(DRAWN_MODS)},
}
# the hybrid schedule on a 2-D (ring, ulysses) mesh of every shape with W ranks; run in the world of that W
MESHES = {2: ((2, 1), (1, 2)), 3: ((3, 1), (1, 3)), 4: ((2, 2),)}
HYBRID = {
    **{f"hybrid-{r}x{u}-varlen-window-softcap-sinks": PackedCase(LONG, window=(5, 0), softcap=4.0, sinks=True,
                                                                 mesh=(r, u), seed=60 + 10 * r + u)
       for shapes in MESHES.values() for r, u in shapes},
    **{f"hybrid-{r}x{u}-native": PackedCase(MIXED, causal=False, provider="native", dtype="float64",
                                            heads=(6, 3, 8), mesh=(r, u), seed=70 + 10 * r + u)
       for shapes in MESHES.values() for r, u in shapes},
    "hybrid-2x2-varlen-causal-mha": PackedCase(DRAWN[0], heads=(4, 4, 16), mesh=(2, 2), seed=80),
    "hybrid-2x2-positions": PackedCase(LONG, mesh=(2, 2), positions=True, seed=81),
}
HYBRID_REFUSALS = {
    "hybrid-2x2-ring": PackedCase(MIXED, strategy="ring", mesh=(2, 2)),
    "hybrid-2x2-allgather": PackedCase(MIXED, api="flash_varlen", strategy="allgather", mesh=(2, 2)),
    "hybrid-2x2-heads": PackedCase(MIXED, heads=(1, 1, 16), mesh=(2, 2)),
    # rank 0's part in another order: the ranks outside both its groups learn of it through their own groups
    "hybrid-2x2-reversed-positions": PackedCase(LONG, mesh=(2, 2), fault="reversed", positions=True),
}


def _mesh_size(case: PackedCase) -> int:
    return case.mesh[0] * case.mesh[1] if case.mesh else 0


REFUSALS = {
    "softcap-on-native": PackedCase(MIXED, provider="native", dtype="float64", softcap=20.0),
    # FlashAttention-2's kernels take no sink logits: all-gather cannot join them
    "allgather-sinks-fa2": PackedCase(MIXED, api="flash_varlen", strategy="allgather", window=(3, 0), sinks=True),
    "sequence-shards-sinks-fa2": PackedCase(MIXED, api="flash_varlen", shard="sequence", sinks=True),
    "disagreeing-windows": PackedCase(MIXED, window=(3, 0), fault="window"),
    "ulysses": PackedCase(MIXED, strategy="ulysses"),
    "allgather-on-a-mask-provider": PackedCase(MIXED, provider="native", dtype="float64", strategy="allgather"),
    # shard_sequence's shards: their lengths differ from the document layout's here at every W > 1
    "sequence-shards": PackedCase((0, 7, 13, 41, 44, 47), shard="sequence"),
    # rank 0's tokens in another order, the layout's lengths: only their position ids can tell
    "reversed-shard-positions": PackedCase(MIXED, fault="reversed", positions=True),
    "reversed-shard-positions-flash_varlen": PackedCase(LONG, api="flash_varlen", fault="reversed", positions=True),
    # rank 0's shard by position in another order, the layout's lengths: only their position ids can tell
    "sequence-shards-reversed-positions": PackedCase(MIXED, api="flash_varlen", shard="sequence", fault="reversed",
                                                     positions=True),
}


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"W{w}")
def world(request):
    """(W, {case name: [every rank's result]}) of one world running every case."""
    w = request.param
    hybrid = {n: c for n, c in {**HYBRID, **HYBRID_REFUSALS}.items() if _mesh_size(c) == w}
    names, cases = zip(*{**CASES, **REFUSALS, **hybrid}.items())
    result = run_ranks(w, packed_documents_rank, list(cases), timeout=300)
    for r in result.ranks:
        assert r.error is None, f"rank {r.rank}: {r.error}"
    return w, {name: [r.value[i] for r in result.ranks] for i, name in enumerate(names)}


@pytest.mark.parametrize("name", CASES)
def test_exact_against_float64(world, name):
    _check_exact(world, name, CASES[name])


@pytest.mark.parametrize("name", HYBRID)
def test_hybrid_exact_against_float64(world, name):
    """Ulysses over the mesh's Ulysses dimension around the packed ring over its ring dimension, every 2-D
    shape of W ranks, forward and backward, uneven head splits (4 heads over 3 ranks) and repeated KV heads
    (3 KV heads over 2) included."""
    w, _ = world
    if _mesh_size(HYBRID[name]) != w:
        pytest.skip(f"mesh {HYBRID[name].mesh} runs in the world of {_mesh_size(HYBRID[name])} ranks")
    _check_exact(world, name, HYBRID[name])


def _check_exact(world, name: str, case: PackedCase) -> None:
    w, results = world
    out_tol, grad_tol = TOLERANCE[case.dtype]
    for rank, r in enumerate(results[name]):
        assert "exception" not in r, (rank, r["exception"])
        errors = r["errors"]
        assert errors["out"] < out_tol and max(errors["dq"], errors["dk"], errors["dv"]) < grad_tol, (rank, errors)
        assert errors["position_ids"] == 0 and errors["local_cu_seqlens_end"] == 0, errors
        assert errors["nonfinite"] == 0, errors
        if case.sinks:
            assert errors["dsinks"] < SINKS_TOLERANCE[case.dtype], (rank, errors)


def _expected_traffic(case: PackedCase, w: int, rank: int) -> dict:
    """What `rank` must send and skip, read from the step plans (forward and backward together)."""
    from cpattn.cp.packed_plan import step_plan
    from cpattn.packed import packed_layout

    layout = packed_layout(case.bounds, w)
    hq, hkv, d = case.heads
    element = 8 if case.dtype == "float64" else 2
    plan = lambda consumer, owner: step_plan(layout, consumer % w, owner % w, case.causal, case.window)  # noqa
    sent = [plan(rank + s, rank) for s in range(1, w)] + [plan(rank + s, rank) for s in range(1, w - 1)]
    sent = [p for p in sent if p is not None]
    return {
        "kv_sends": len(sent),
        "kv_bytes": sum(2 * p.kv_len * hkv * d * element for p in sent),
        "dkv_sends": sum(plan(rank, rank - s) is not None for s in range(1, w)),
        "packed_skipped_steps": sum(plan(rank, rank - s) is None for s in range(w)),
    }


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.strategy != "allgather" and c.shard != "sequence"])
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


def test_a_short_window_skips_steps_and_keys(world):
    """A causal window of 2 on one 48-token document split over every rank: each chunk (8 or 6 tokens) reaches
    the chunk before it only, so ranks skip steps that the unwindowed causal stream computes (skipped steps send
    nothing: test_every_transfer_is_one_the_plans_need), and the steps left send fewer keys."""
    w, results = world
    if w < 3:
        pytest.skip("at W <= 2 every rank holds a neighbour of every other rank's chunks")
    windowed = [r["stats"] for r in results["one-short-window-causal"]]
    assert all(s.get("packed_skipped_steps", 0) > 0 for s in windowed[:1]), windowed
    unwindowed = [_expected_traffic(PackedCase(ONE_SPLIT), w, r) for r in range(w)]
    assert sum(s.get("kv_bytes", 0) for s in windowed) < sum(t["kv_bytes"] for t in unwindowed), windowed


@pytest.mark.parametrize("name,error,words", [
    ("softcap-on-native", "UnsupportedInputError", ["softcap=20.0 is not supported", "'_native_math'"]),
    ("allgather-sinks-fa2", "UnsupportedInputError", [
        "sinks are not supported by all-gather over packed streams", "cp_strategy='ring' or 'auto'"]),
    ("sequence-shards-sinks-fa2", "UnsupportedInputError", [
        "sinks are not supported by all-gather over packed streams", "sharding='documents'"]),
    ("disagreeing-windows", "RankMismatchError", ["disagree on window left", "rank 0: 4"]),
    ("ulysses", "UnsupportedInputError", ["cp_strategy='ring' (or 'auto') or 'allgather', not 'ulysses'"]),
    ("allgather-on-a-mask-provider", "UnsupportedInputError", ["runs on varlen kernels only"]),
    ("sequence-shards", "RankMismatchError", ["do not match the document layout", "shard_packed"]),
    ("reversed-shard-positions", "InvalidArgumentError", ["position_ids", "packed_position_ids"]),
    ("reversed-shard-positions-flash_varlen", "InvalidArgumentError", ["position_ids", "packed_position_ids"]),
    ("sequence-shards-reversed-positions", "UnsupportedInputError", ["rank(s) [0] refused this call"]),
])
def test_refused_on_every_rank(world, name, error, words):
    w, results = world
    if name in ("sequence-shards", "sequence-shards-sinks-fa2", "sequence-shards-reversed-positions",
                "disagreeing-windows") and w == 1:
        pytest.skip("one rank: every sharding is the whole stream, and no other rank to disagree with")
    if name.startswith("reversed-") and w > 1:  # only rank 0's shard is wrong: every rank names it
        words = words + ["rank(s) [0]"]
    for rank, r in enumerate(results[name]):
        assert r.get("exception", "").startswith(error), (rank, r)
        expected = words
        if name == "sequence-shards-reversed-positions" and rank == 0:  # the rank that refused says why
            expected = ["position_ids are not this rank's tokens' positions", "cp_layout='zigzag'", "shard_sequence"]
        for word in expected:
            assert word in r["exception"], (rank, r["exception"])


@pytest.mark.parametrize("name,error,words", [
    ("hybrid-2x2-ring", "InvalidArgumentError", ["cp_strategy='ring' runs on a 1-D mesh", "runs 'hybrid'"]),
    ("hybrid-2x2-allgather", "InvalidArgumentError", ["cp_strategy='allgather' runs on a 1-D mesh"]),
    ("hybrid-2x2-heads", "UnsupportedInputError", ["Ulysses over 2 ranks needs at least 2 query heads, got 1"]),
    ("hybrid-2x2-reversed-positions", "InvalidArgumentError", ["position_ids of rank(s) [0]", "packed_position_ids"]),
])
def test_hybrid_refused_on_every_rank(world, name, error, words):
    w, results = world
    if w != 4:
        pytest.skip("the 2 x 2 mesh runs in the world of 4 ranks")
    errors = [r.get("exception", "") for r in results[name]]
    if name == "hybrid-2x2-reversed-positions":  # the ranks that share a group with rank 0 say why, the other
        # (outside both of rank 0's groups) that another rank refused
        assert sum(e.startswith("InvalidArgumentError") for e in errors) == 3, errors
        errors = [e for e in errors if e.startswith("InvalidArgumentError")]
    for rank, e in enumerate(errors):
        assert e.startswith(error), (rank, e)
        for word in words:
            assert word in e, (rank, e)
