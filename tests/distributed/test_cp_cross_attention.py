"""Cross-attention under context parallelism: queries sharded, key/value whole on every rank (cpattn/cp/cross.py).

Every case shards the queries of one problem over W gloo ranks (W = 1..4; a 2 x 2 mesh at W = 4) and gives every
rank the whole key/value; the gathered output and dQ are compared with the float64 reference of the unsharded
problem, and dK, dV (and the sinks' gradient) summed over the ranks, as the gradient all-reduce of the parameters
they come from sums them. No key or value moves: every rank's counters show no transfer at all.
The key length (9) differs from every shard length here, which implies kv_replicated; cases whose shards are as
long as the keys pass kv_replicated=True.
"""

from __future__ import annotations

import functools

import pytest
import torch

from cp_harness import Case, problems, run_cases
from helpers import GRAD_ATOL, OUT_ATOL

pytestmark = pytest.mark.distributed

WORLD_SIZES = (1, 2, 3, 4)
KEYS = 9
CROSS = dict(kv_len=KEYS, causal=False, seq=13)
MODS = {
    "native": (dict(), dict(mask="key_padding")),
    "_native_math": (dict(softcap=1.5, sinks=True), dict(mask="additive")),
    "_native_flash": (dict(sinks=True, mask="bool"),),
}


def cases_for(world: int) -> list[Case]:
    cases = [Case(provider=provider, strategy=strategy, **{**CROSS, **mods})
             for provider, all_mods in MODS.items() for strategy in ("ring", "ulysses", "allgather")
             for mods in all_mods]
    cases += [
        Case(strategy="auto", q_heads=4, kv_heads=1, **CROSS),  # GQA 4:1
        Case(strategy="ring", q_heads=8, kv_heads=8, head_dim=8, kv_len=8, seq=8, causal=False,
             kv_replicated=True),  # heads == sequence length == key length
        Case(strategy="ring", mask="empty_rows", sinks=True, **CROSS),  # rows that see no key: out 0
        Case(strategy="ulysses", dtype="bfloat16", head_dim=32, sinks=True, **CROSS),
        Case(strategy="ring", layout="contiguous", mask="key_padding", sinks=True, **CROSS),
        # FlashAttention through its stand-ins: FA4 softcap and learnable sinks, FA2 softcap and sinks via the lse
        Case(provider="flash", standin="fa4", strategy="ring", dtype="bfloat16", head_dim=32, softcap=1.5,
             sinks=True, **CROSS),
        Case(provider="flash", standin="fa2", strategy="ulysses", dtype="bfloat16", head_dim=32, softcap=1.5,
             sinks=True, **CROSS),
        # every shard exactly as long as the keys: only kv_replicated=True says they are whole
        Case(strategy="ring", seq=4 * world, kv_len=4, causal=False, kv_replicated=True, sinks=True),
    ]
    if world == 4:
        cases += [Case(strategy="hybrid", mesh=(2, 2), sinks=True, **CROSS),
                  Case(strategy="hybrid", mesh=(2, 2), mask="key_padding", layout="contiguous", **CROSS)]
    return cases


def error_cases() -> list[Case]:
    return [
        Case(strategy="ring", kv_len=KEYS, seq=13, causal=True, fault="cross_causal"),
        Case(strategy="allgather", window=(2, 2), fault="cross_window", **CROSS),
        Case(strategy="ring", prefix=3, causal=False, seq=12, kv_replicated=True, fault="cross_prefix"),  # even
        Case(strategy="ring", causal=False, seq=13, fault="replicated"),  # rank 0 alone declares kv_replicated
        Case(strategy="ulysses", fault="key_length", **CROSS),  # rank 0 has a key fewer
        Case(strategy="ring", mask="key_padding", fault="mask_keys", **CROSS),  # a mask a key short on every rank
    ]


EXPECTED_ERRORS = {
    "cross_causal": ("UnsupportedInputError", "is_causal with key/value replicated on every rank (cross-attention"),
    "cross_window": ("UnsupportedInputError", "window=(2, 2) with key/value replicated on every rank"),
    "cross_prefix": ("UnsupportedInputError", "does not combine with cp_replicated_prefix"),
    "replicated": ("RankMismatchError", "disagree on key/value replicated: rank 0: 1, rank 1: 0"),
    "mask_keys": ("UnsupportedInputError", f"attn_mask of shape (2, 1, 1, {KEYS - 1}): with key/value replicated "
                                           "on every rank"),
    "key_length": ("RankMismatchError", f"disagree on key length (replicated key/value): rank 0: {KEYS - 1}, "
                                        f"rank 1: {KEYS}"),
}


@functools.lru_cache(maxsize=None)
def results(world: int):
    return run_cases(world, cases_for(world) + (error_cases() if world > 1 else []))


def _problems(outcome, case: Case) -> list[str]:
    return problems(outcome, case, OUT_ATOL, GRAD_ATOL)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_cross_attention_matches_the_reference_without_moving_key_value(world):
    """Output and dQ gathered, dK / dV / dsinks summed over the ranks, against float64; and no rank sent a byte
    (the agreement's all-gather aside, which CommStats does not count)."""
    outcomes = results(world)
    failures = []
    for case in cases_for(world):
        outcome = outcomes[case.name]
        problems = _problems(outcome, case)
        traffic = {k for stats in outcome.rank_stats for k, v in stats.items()
                   if v and k.endswith(("_bytes", "_sends", "all_to_all", "all_gather", "reduce_scatter"))}
        if traffic:
            problems.append(f"moved data: {sorted(traffic)}")
        if problems:
            failures.append(f"{case.name}: {'; '.join(problems)}")
    assert not failures, f"{len(failures)} of {len(cases_for(world))} cases failed at W={world}:\n" + \
        "\n".join(failures)


@pytest.mark.parametrize("world", (2, 3, 4))
@pytest.mark.parametrize("fault", sorted(EXPECTED_ERRORS))
def test_cross_attention_refusals_and_disagreements_raise_on_every_rank(world, fault):
    case = next(c for c in error_cases() if c.fault == fault)
    outcome = results(world)[case.name]
    kind, text = EXPECTED_ERRORS[fault]
    assert len(outcome.rank_exceptions) == world
    for exc_type, message, seconds in outcome.rank_exceptions:
        assert exc_type == kind and text in message, (exc_type, message)
        assert seconds < 10, f"took {seconds:.1f}s to raise"
    if fault == "replicated":  # the message says how to declare it
        assert "pass kv_replicated=True on every rank" in outcome.rank_exceptions[0][1]
