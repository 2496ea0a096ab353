"""Windows, softcap and sinks under every context-parallel schedule, forward and backward, against float64.

Every case shards one problem over W gloo ranks (W = 1..4; a 2 x 2 mesh for the hybrid), runs it through
attention_dispatch with window / softcap / sinks, and compares the gathered output and q, k, v gradients with
cpattn.reference_attention of the unsharded problem; the sinks' gradient is every rank's share summed (as the
gradient all-reduce of a replicated parameter sums it). One spawn per world size runs every case of this file
(tests/support/cp_harness.run_cases).

Providers: those that take each modification on CPU: a window (as the exact mask) and sinks (through the
log-sum-exp) on native, _native_math and _native_flash; a softcap on _native_math only (the others refuse it,
tested below); 'flash' through the FlashAttention stand-ins (tests/support/standins: FA4 with windows, softcaps
and learnable sinks, FA2 with windows and softcaps), which check the adapter's glue, not the libraries' kernels.

Also: the windowed exchange moves only the keys in reach (its byte counters against a brute-force count of the
keys each rank's queries see), and every disagreement or refusal raises its message on every rank.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from cp_harness import Case, problems, run_cases
from cpattn.cp.halo import halo_plan, shard_runs
from cpattn.cp.layout import ring_positions
from helpers import GRAD_ATOL, OUT_ATOL

pytestmark = pytest.mark.distributed

WORLD_SIZES = (1, 2, 3, 4)
SCHEDULES = (("ring", "zigzag"), ("ring", "contiguous"), ("ulysses", "zigzag"), ("allgather", "zigzag"),
             ("allgather", "contiguous"))
# per provider, the modifications its cases carry (a softcap only where the provider has one)
MODS = {
    "native": (dict(window=(3, 0)), dict(sinks=True), dict(window=(2, 1), causal=False, sinks=True)),
    "_native_flash": (dict(window=(3, 0)), dict(window=(1, 2), causal=False, sinks=True)),
    "_native_math": (dict(softcap=1.5), dict(window=(4, 0), softcap=2.0, sinks=True),
                     dict(window=(2, 3), causal=False, softcap=1.0, mask="bool")),
}


# FlashAttention through its stand-in (bf16): FA4 takes windows, softcaps and sinks natively, FA2 windows and
# softcaps (its sinks go through the log-sum-exp); it takes no mask, so calls that all-gather without a window are
# non-causal here (causality would be a positional mask there, refused)
FLASH_MODS = {
    "fa4": (dict(window=(3, 0)), dict(window=(2, 1), causal=False, sinks=True), dict(softcap=1.5, causal=False,
                                                                                   sinks=True),
            dict(window=(4, 0), softcap=2.0, sinks=True)),
    "fa2": (dict(window=(3, 0), softcap=1.5), dict(window=(1, 2), causal=False, sinks=True)),
}


def matrix_cases() -> list[Case]:
    """Each CPU provider x schedule x its modifications; GQA 4:2 and 13 tokens (not divisible by 2W); the
    FlashAttention stand-ins at 16 tokens of head dim 32."""
    cpu = [Case(**{"provider": provider, "strategy": strategy, "layout": layout, "seq": 13, **mods})
           for provider, all_mods in MODS.items() for strategy, layout in SCHEDULES for mods in all_mods]
    flash = [Case(**{"provider": "flash", "standin": standin, "strategy": strategy, "layout": layout, "seq": 16,
                     "head_dim": 32, "dtype": "bfloat16", **mods})
             for standin, all_mods in FLASH_MODS.items() for strategy, layout in SCHEDULES for mods in all_mods]
    return cpu + flash


def special_cases(world: int) -> list[Case]:
    seq = 13
    out = []
    for strategy in ("ring", "ulysses", "allgather"):
        out += [
            # heads == sequence length, with a window and sinks
            Case(strategy=strategy, q_heads=8, kv_heads=8, seq=8, head_dim=8, window=(2, 0), sinks=True),
            # the diagonal only, and rows that see no key with sinks present (out 0, no NaN)
            Case(strategy=strategy, window=(0, 0), causal=False, seq=seq, sinks=True),
            Case(strategy=strategy, window=(1, 0), mask="empty_rows", seq=seq, sinks=True),
            # a window of the whole length or more: the full result
            Case(strategy=strategy, window=(seq, seq), causal=False, seq=seq, sinks=True),
            Case(strategy=strategy, window=(seq, 0), seq=seq),
            # GQA 4:1, a key padding mask
            Case(strategy=strategy, q_heads=4, kv_heads=1, window=(2, 1), causal=False, mask="key_padding",
                 seq=seq),
        ]
    out += [
        # a window that reaches most of the sequence: the exchange degenerates towards all-to-all, still exact
        Case(strategy="ring", window=(seq - 3, 0), seq=seq, sinks=True),
        Case(strategy="ring", window=(seq - 3, 2), causal=False, seq=seq, layout="contiguous"),
        Case(strategy="ring", window=(1, 0), seq=3, q_heads=2, kv_heads=1),  # fewer tokens than chunks
        Case(strategy="ring", window=(2, 0), mask="mask_mod", seq=11),  # evaluated per block
        Case(strategy="ring", window=(3, 0), dtype="bfloat16", seq=16, head_dim=32, sinks=True),
        Case(strategy="ring", window=(3, 1), causal=False, dtype="float64", seq=10, batch=1, sinks=True),
        Case(strategy="ulysses", q_heads=4 * world, kv_heads=2 * world, seq=13, head_chunks=2, window=(3, 0),
             sinks=True),  # pipelined head chunks: each chunk takes its heads' sinks
        # joint attention: softcap and sinks over the replicated prefix and the sharded tokens
        Case(strategy="ring", prefix=4, causal=False, seq=11, sinks=True),
        Case(provider="_native_math", strategy="ring", prefix=4, causal=False, seq=11, softcap=1.5, sinks=True),
        Case(provider="_native_math", strategy="allgather", prefix=3, causal=False, seq=11, softcap=1.5,
             sinks=True),
        Case(strategy="ring", window=(2, 0), seq=seq, sinks=True, grad=False),  # forward only
    ]
    out += bytes_cases(world)
    return out


def bytes_cases(world: int) -> list[Case]:
    """Windows no longer than half a shard (16 tokens per rank, zigzag chunks of 8), causal and two-sided."""
    shape = dict(seq=16 * world, batch=1, q_heads=2, kv_heads=1, head_dim=8)
    return [Case(strategy="ring", window=(5, 0), **shape),
            Case(strategy="ring", window=(5, 0), layout="contiguous", **shape),
            Case(strategy="ring", window=(3, 2), causal=False, **shape),
            Case(strategy="ring", window=(0, 0), **shape)]


def error_cases() -> list[Case]:
    return [
        Case(strategy="ring", window=(2, 0), fault="window"),
        Case(strategy="ulysses", provider="_native_math", softcap=1.5, fault="softcap"),
        Case(strategy="allgather", sinks=True, fault="sinks"),
        Case(strategy="ring", prefix=3, causal=False, seq=11, window=(2, 2), fault="prefix_window"),
        Case(strategy="ring", softcap=1.5, fault="softcap_refused"),  # native has no softcap
    ]


EXPECTED_ERRORS = {
    "window": ("RankMismatchError", "disagree on window left: rank 0: 3, rank 1: 2"),
    "softcap": ("RankMismatchError", "disagree on softcap: rank 0: 3.0, rank 1: 1.5"),
    "sinks": ("RankMismatchError", "disagree on sinks (heads): rank 0: None, rank 1: 4"),
    "prefix_window": ("UnsupportedInputError", "window=(2, 2) with cp_replicated_prefix (joint attention) is not "
                                               "supported"),
    "softcap_refused": ("UnsupportedInputError", "softcap=1.5 is not supported"),
}


@st.composite
def drawn_case(draw, world: int):
    """Any schedule and CPU provider with any combination of window, softcap and sinks."""
    provider = draw(st.sampled_from(tuple(MODS)))
    strategy = draw(st.sampled_from(["ring", "ulysses", "allgather"] + (["hybrid"] if world == 4 else [])))
    seq = draw(st.integers(world, 4 * world + 5))
    side = st.one_of(st.none(), st.integers(0, seq + 1))
    window = draw(st.one_of(st.none(), st.tuples(side, side)))
    if window == (None, None):
        window = None
    kv_heads = draw(st.integers(1, 2))
    q_heads = kv_heads * draw(st.integers(1, 3))
    ulysses = {"ulysses": world, "hybrid": 2}.get(strategy, 1)
    q_heads = max(q_heads, kv_heads * -(-ulysses // kv_heads))  # a query head per Ulysses rank
    return Case(provider=provider, strategy=strategy, layout=draw(st.sampled_from(["zigzag", "contiguous"])),
                causal=draw(st.booleans()), mask=draw(st.sampled_from([None, "bool", "key_padding"])),
                batch=draw(st.integers(1, 2)), q_heads=q_heads, kv_heads=kv_heads, seq=seq,
                head_dim=draw(st.sampled_from([4, 8])), dtype=draw(st.sampled_from(["float32", "float64"])),
                window=window, softcap=draw(st.sampled_from([None, 1.0])) if provider == "_native_math" else None,
                sinks=draw(st.booleans()), mesh=(2, 2) if strategy == "hybrid" else ())


def drawn_cases(world: int, n: int = 6) -> list[Case]:
    """n distinct cases drawn with a fixed seed (hypothesis only draws here; they run in the world's one spawn)."""
    drawn: dict[str, Case] = {}

    @seed(7000 + world)
    @settings(max_examples=4 * n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(drawn_case(world))
    def collect(case):
        if len(drawn) < n:
            drawn.setdefault(case.name, case)

    collect()
    return list(drawn.values())


def hybrid_cases() -> list[Case]:
    return [Case(strategy="hybrid", mesh=(2, 2), layout=layout, seq=15, **mods)
            for layout in ("zigzag", "contiguous")
            for mods in (dict(window=(3, 0), sinks=True), dict(window=(2, 2), causal=False),
                         dict(provider="_native_math", softcap=1.5, sinks=True))]


def cases_for(world: int) -> list[Case]:
    cases = matrix_cases() + special_cases(world) + drawn_cases(world)
    if world == 4:
        cases += hybrid_cases()
    return list({c.name: c for c in cases}.values())


@functools.lru_cache(maxsize=None)
def results(world: int):
    return run_cases(world, cases_for(world) + (error_cases() if world > 1 else []))


def _problems(outcome, case: Case) -> list[str]:
    return problems(outcome, case, OUT_ATOL, GRAD_ATOL)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_every_schedule_matches_the_reference(world):
    """Forward, q/k/v gradients and the summed sinks gradient of every case against float64."""
    outcomes = results(world)
    failures = [f"{case.name}: {'; '.join(p)}" for case in cases_for(world)
                if (p := _problems(outcomes[case.name], case))]
    assert not failures, f"{len(failures)} of {len(cases_for(world))} cases failed at W={world}:\n" + \
        "\n".join(failures)


def _keys_seen(total: int, world: int, layout: str, case: Case) -> list[list[int]]:
    """[r][s]: how many of rank s's keys rank r's queries see, counted position by position (no plan involved)."""
    left, right = case.window
    right = 0 if case.causal else right
    pos = [ring_positions(total, world, r, layout) for r in range(world)]
    seen = []
    for r in range(world):
        offset = pos[r].view(1, -1) - torch.cat(pos).view(-1, 1)  # key x query: q - k
        visible = ((offset <= left) & (offset >= -right)).any(dim=1)
        counts = torch.split(visible, [p.numel() for p in pos])
        seen.append([0 if s == r else int(c.sum()) for s, c in enumerate(counts)])
    return seen


@pytest.mark.parametrize("world", (2, 3, 4))
def test_windowed_ring_sends_only_the_keys_in_reach(world):
    """Each rank sends each peer exactly the K/V of the keys that peer's queries see, and their dK/dV come back the
    same way; ranks out of reach exchange nothing. For windows no longer than half a shard that is at most two
    windows of keys per rank (zigzag, both neighbours), one for a causal window under contiguous, none for the
    diagonal, against W - 1 whole shards for the rotating ring."""
    for case in bytes_cases(world):
        outcome = results(world)[case.name]
        assert outcome.exception is None, outcome.exception
        seen = _keys_seen(case.seq, world, case.layout, case)
        token = case.batch * case.kv_heads * case.head_dim * 4  # bytes of one key (or value), float32
        for s, stats in enumerate(outcome.rank_stats):
            for kind in ("kv", "dkv"):  # keys to the ranks that see them; their gradients back to their owners
                sent = {int(k.rsplit("_", 1)[1]): v for k, v in stats.items() if k.startswith(f"{kind}_bytes_to_")}
                keys = [seen[r][s] if kind == "kv" else seen[s][r] for r in range(world)]
                assert sent == {r: 2 * n * token for r, n in enumerate(keys) if n}, (case.name, s, kind, sent, keys)
            reach = case.window[0] + (0 if case.causal else case.window[1])
            windows = 1 if case.layout == "contiguous" and case.causal else 2
            assert stats.get("kv_bytes", 0) <= windows * reach * 2 * token, (case.name, s, stats)


@pytest.mark.parametrize("world", (2, 3, 4))
@pytest.mark.parametrize("fault", sorted(EXPECTED_ERRORS))
def test_disagreements_and_refusals_raise_on_every_rank(world, fault):
    case = next(c for c in error_cases() if c.fault == fault)
    outcome = results(world)[case.name]
    kind, text = EXPECTED_ERRORS[fault]
    assert len(outcome.rank_exceptions) == world
    for exc_type, message, seconds in outcome.rank_exceptions:
        assert exc_type is not None, f"a rank did not raise for fault {fault}"
        assert seconds < 10, f"took {seconds:.1f}s to raise"
    assert all(t == kind and text in m for t, m, _ in outcome.rank_exceptions), outcome.rank_exceptions


# -- the plan and the blocks, in-process (no ranks) ---------------------------------------------------------------

@settings(max_examples=150, deadline=None, database=None)
@given(st.integers(1, 40), st.integers(1, 6), st.sampled_from(["zigzag", "contiguous"]),
       st.one_of(st.none(), st.integers(0, 12)), st.one_of(st.none(), st.integers(0, 12)))
def test_halo_plan_needs_exactly_the_keys_in_reach(total, world, layout, left, right):
    """needs[r][s] holds exactly the positions of rank s that some query of rank r sees, each once."""
    from cpattn.cp.halo import blocks, packed

    plan = halo_plan(total, world, layout, (left, right))
    pos = [ring_positions(total, world, r, layout) for r in range(world)]
    lo = -float("inf") if left is None else -left
    hi = float("inf") if right is None else right
    for r in range(world):
        pairs = set()  # every (query, key) pair that r's blocks compute
        for s in range(world):
            runs = plan.queries[r] if s == r else plan.needs[r][s]
            have = [p for run in runs for p in range(run.position, run.position + run.size)]
            assert len(have) == len(set(have)), "a key sent twice"
            want = {int(k) for k in pos[s] if any(lo <= int(k) - int(q) <= hi for q in pos[r])}
            if s != r:
                assert set(have) == want, (r, s, sorted(have), sorted(want))
            for run in (runs if s == r else packed(runs)):
                for b in blocks(plan.queries[r], run, (left, right)):
                    q0, k0 = b.q_position, b.k_position
                    bl, br = (None, None) if b.window is None else b.window
                    for i in range(b.rows.stop - b.rows.start):
                        for j in range(b.keys.stop - b.keys.start):
                            if (bl is None or j >= i - bl) and (br is None or j <= i + br):
                                pairs.add((q0 + i, k0 + j))
        want_pairs = {(int(q), int(k)) for q in pos[r] for k in range(total) if lo <= int(k) - int(q) <= hi}
        assert pairs == want_pairs, (r, sorted(pairs ^ want_pairs)[:5])
    assert sum(run.size for run in shard_runs(total, world, 0, layout)) == pos[0].numel()
