"""Context parallelism on CPU with gloo: every CPU provider x schedule, forward and backward, against the
float64 reference of the whole unsharded problem, at world sizes 1, 2, 3 and 4 and on a 2 x 2 mesh."""

from __future__ import annotations

import functools

import pytest

from cp_harness import Case, run_cases
from cpattn.cp.layout import ring_shard_len
from helpers import GRAD_ATOL, OUT_ATOL

pytestmark = pytest.mark.distributed

WORLD_SIZES = (1, 2, 3, 4)
TRAINING_PROVIDERS = ("native", "_native_math", "_native_flash")
SCHEDULES = ("ring", "ulysses", "allgather")


def cases_for(world: int) -> list[Case]:
    cases = []
    # every training provider x schedule x (layout, causal); GQA 4:2 and a length not divisible by 2W
    for provider in TRAINING_PROVIDERS:
        for strategy in SCHEDULES:
            for layout, causal in (("zigzag", True), ("contiguous", True), ("zigzag", False)):
                cases.append(Case(provider=provider, strategy=strategy, layout=layout, causal=causal, seq=13))
    for strategy in SCHEDULES:
        for mask in ("bool", "additive", "key_padding", "empty_rows", "documents", "mask_mod"):
            cases.append(Case(strategy=strategy, mask=mask, seq=11, causal=mask != "additive"))
        # heads == sequence length, and fewer KV heads than ranks
        cases.append(Case(strategy=strategy, q_heads=8, kv_heads=8, seq=8, head_dim=8))
        cases.append(Case(strategy=strategy, q_heads=4, kv_heads=1, seq=12))
        cases.append(Case(strategy=strategy, dtype="bfloat16", seq=16, head_dim=32))
        cases.append(Case(strategy=strategy, dtype="float64", seq=10, batch=1))
        cases.append(Case(provider="flex", strategy=strategy, grad=False, seq=12))  # flex has no CPU backward
    # GPU-only libraries through their named stand-ins (tests/support/standins/): the adapters' CP glue on CPU
    for strategy in SCHEDULES:
        causal = strategy != "allgather"  # flash and sage take no mask, so all-gather runs them non-causal
        for standin in ("fa4", "fa2"):
            cases.append(Case(provider="flash", standin=standin, strategy=strategy, causal=causal,
                              dtype="bfloat16", seq=16, head_dim=32))
        cases.append(Case(provider="xformers", standin="xformers", strategy=strategy, dtype="bfloat16", seq=16,
                          head_dim=32))
        cases.append(Case(provider="sage", standin="sage2", strategy=strategy, causal=causal, dtype="bfloat16",
                          seq=128, head_dim=64, grad=False))
    # sageattention 1.0.6 under Ulysses with a key-padding mask: the kernel sees every key, so the 64-key-block
    # rule counts the kept keys of the whole (replicated) mask, not of this rank's shard
    cases.append(Case(provider="sage_varlen", standin="sage1", strategy="ulysses", mask="key_padding", causal=False,
                      dtype="bfloat16", seq=192, head_dim=64, grad=False))
    # ... and causal at 24 tokens per sequence, where 1.0.6 reads past its K scales unless the adapter pads
    for provider in ("sage", "sage_varlen"):
        cases.append(Case(provider=provider, standin="sage1", strategy="ulysses", q_heads=24, kv_heads=24, seq=24,
                          head_dim=64, dtype="bfloat16", grad=False))
    # joint attention: a replicated text prefix + a sharded sequence (text keys must count once, not W times)
    for strategy in ("ring", "allgather", "auto"):
        cases.append(Case(strategy=strategy, prefix=5, causal=False, seq=13))
    cases.append(Case(strategy="ring", prefix=4, causal=False, seq=11, dtype="bfloat16", head_dim=32))
    # ... and text after the sharded sequence (SD3), alone or with a prefix
    for strategy in ("ring", "allgather"):
        cases.append(Case(strategy=strategy, suffix=5, causal=False, seq=13))
    cases.append(Case(strategy="ring", prefix=2, suffix=3, causal=False, seq=13, sinks=True))
    # sageattention 1.0.6 without causal under Ulysses at 192 tokens: 96 or 48 on a shard (W=2, 4) but whole
    # 64-key blocks in the kernel, which sees all 192
    cases.append(Case(provider="sage", standin="sage1", strategy="ulysses", causal=False, seq=192, q_heads=12,
                      kv_heads=12, batch=1, head_dim=64, dtype="bfloat16", grad=False))
    # ... and at 128 tokens, which W=3 shards as 43, 43 and 42 (W times a shard is never 128)
    cases.append(Case(provider="sage", standin="sage1", strategy="ulysses", causal=False, seq=128, q_heads=12,
                      kv_heads=12, batch=1, head_dim=64, dtype="bfloat16", grad=False))
    # sageattention 1.0.6 (no LSE: all-gather) with a prefix whose keys make whole 64-key blocks in the kernel
    cases.append(Case(provider="sage", standin="sage1", strategy="allgather", prefix=64, causal=False, seq=64 * world,
                      q_heads=4, kv_heads=4, batch=1, head_dim=64, dtype="bfloat16", grad=False))
    cases.append(Case(strategy="ulysses", q_heads=5, kv_heads=5, seq=9))  # heads not divisible by W
    cases += head_chunk_cases(world)
    cases.append(Case(strategy="auto", seq=12))
    cases.append(Case(provider="auto", strategy="ring", seq=13))
    cases.append(Case(strategy="ring", seq=3, q_heads=2, kv_heads=1))  # fewer tokens than chunks
    cases.append(Case(strategy="ring", grad=False, seq=16))  # no backward: W-1 KV sends only
    # bf16 gradient sums: ranks that add nothing to a block's sum at some step (contiguous causal), even shards
    cases.append(Case(strategy="ring", layout="contiguous", dtype="bfloat16", seq=2 * world + 1))
    cases.append(Case(strategy="ring", dtype="bfloat16", seq=4 * world))
    # under torch.autocast: float32 inputs (and a float mask) computed in bf16, as SDPA would be
    cases += autocast_cases()
    # SDPA's other ranks: 3-D (H, S, D) and 5-D (1, B, H, S, D) shards, folded to 4-D by dispatch
    cases += dims_cases()
    return cases


def error_cases(world: int) -> list[Case]:
    return [
        Case(strategy="ring", dropout=0.1, fault="dropout"),
        Case(strategy="ring", fault="head_dim"),
        Case(strategy="ring", fault="length"),
        Case(strategy="ulysses", fault="provider"),
        Case(provider="flex", strategy="ring", fault="flex_grad"),
        Case(provider="sage", strategy="allgather", grad=False, fault="missing_library"),
        Case(strategy="ulysses", prefix=4, causal=False, seq=12, fault="prefix_ulysses"),
        Case(strategy="ulysses", suffix=4, causal=False, seq=12, fault="suffix_ulysses"),
        # 28 + 100 keys on each shard, 28 + 100 W in the kernel: 1.0.6's 64-key rule must see the kernel's
        Case(provider="sage", standin="sage1", strategy="allgather", prefix=28, causal=False, seq=100 * world,
             q_heads=4, kv_heads=4, batch=1, head_dim=64, dtype="bfloat16", grad=False, fault="kernel_lengths"),
    ]


def head_chunk_cases(world: int) -> list[Case]:
    """Ulysses in pipelined head chunks (cpattn chooses them for large transfers only): GQA with every rank's
    KV heads cut too, heads == sequence length, zigzag causal, 12 heads that 5 chunks cannot cut (fewer chunks)."""
    return [Case(strategy="ulysses", q_heads=4 * world, kv_heads=2 * world, seq=13, head_chunks=2),
            Case(strategy="ulysses", q_heads=8 * world, kv_heads=8 * world, seq=8 * world, head_chunks=4,
                 dtype="float64", batch=1),
            Case(strategy="ulysses", q_heads=12, kv_heads=12, seq=11, head_chunks=5, causal=False,
                 layout="contiguous")]


@pytest.mark.parametrize("world", (2, 3, 4))
def test_ulysses_head_chunks_match_reference_and_move_each_chunk(world):
    """Chunked Ulysses: forward and backward against float64 (_check); each chunk makes its own all-to-alls
    (q, k, v and out forward, their gradients backward), so a silent fall-back to one chunk fails here."""
    for case in head_chunk_cases(world):
        outcome = results(world)[case.name]
        _check(outcome, case)
        heads_per_rank = case.q_heads // world if case.q_heads % world == 0 else None
        kv_per_rank = case.kv_heads // world if case.kv_heads % world == 0 else None
        chunks = max(n for n in range(case.head_chunks, 0, -1)
                     if heads_per_rank and kv_per_rank and heads_per_rank % n == 0 and kv_per_rank % n == 0)
        assert outcome.stats["all_to_all"] == 8 * chunks, (case.name, outcome.stats["all_to_all"], chunks)


def autocast_cases() -> list[Case]:
    return [Case(strategy=strategy, autocast="bfloat16", seq=11, head_dim=32, mask=mask, causal=mask is None)
            for strategy in SCHEDULES for mask in (None, "additive")]


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_autocast_computes_in_its_dtype_and_grads_keep_the_inputs(world):
    """Under torch.autocast the shards are cast as SDPA's inputs would be: the output is bf16, the gradients
    reach the float32 shards as float32, and both match float64 within bf16 tolerances (_check)."""
    for case in autocast_cases():
        outcome = results(world)[case.name]
        _check(outcome, case)
        assert outcome.stats["out_dtype"] == "torch.bfloat16", (case.name, outcome.stats["out_dtype"])
        assert {outcome.stats[f"{g}_dtype"] for g in ("dq", "dk", "dv")} == {"torch.float32"}, case.name


def dims_cases() -> list[Case]:
    return [Case(strategy=strategy, dims=3, batch=1, seq=11) for strategy in SCHEDULES] + \
        [Case(strategy=strategy, dims=5, seq=11, mask="bool") for strategy in SCHEDULES]


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_three_and_five_dim_shards_run_as_sdpa_takes_them(world):
    """Shards with SDPA's other ranks run every schedule through the same 4-D path, forward and backward against
    float64 (_check), and come back with the rank they went in with."""
    for case in dims_cases():
        outcome = results(world)[case.name]
        _check(outcome, case)
        assert outcome.stats["out_dims"] == case.dims, case.name


@functools.lru_cache(maxsize=None)
def results(world: int):
    return run_cases(world, cases_for(world) + (error_cases(world) if world > 1 else []))


def _check(outcome, case: Case):
    assert outcome.exception is None, outcome.exception
    computed_in = getattr(__import__("torch"), case.autocast or case.dtype)
    out_tol, grad_tol = OUT_ATOL[computed_in], GRAD_ATOL[computed_in]
    assert outcome.errors["out_finite"] == 1.0, "non-finite output"
    assert outcome.errors.get("document_mask_equal", 1.0) == 1.0, "document_mask rows differ from the shard"
    assert outcome.errors["out"] <= out_tol, f"out error {outcome.errors['out']:.3g} > {out_tol}"
    if case.grad:
        for name in ("dq", "dk", "dv"):
            assert outcome.errors[name] <= grad_tol, f"{name} error {outcome.errors[name]:.3g} > {grad_tol}"


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_schedules_match_reference(world, subtests=None):
    failures = []
    outcomes = results(world)
    for case in cases_for(world):
        try:
            _check(outcomes[case.name], case)
        except AssertionError as exc:
            failures.append(f"{case.name}: {exc}")
    assert not failures, f"{len(failures)} of {len(cases_for(world))} cases failed at W={world}:\n" + "\n".join(failures)


@pytest.mark.parametrize("world", (2, 3, 4))
def test_ring_sends_w_minus_one_kv_blocks_per_forward(world):
    outcome = results(world)[Case(strategy="ring", grad=False, seq=16).name]
    assert outcome.exception is None, outcome.exception
    assert outcome.stats["kv_sends"] == world - 1
    assert "dkv_sends" not in outcome.stats


@pytest.mark.parametrize("world", (2, 3, 4))
def test_ring_backward_sends_each_gradient_part_to_its_owner(world):
    outcome = results(world)[Case(provider="native", strategy="ring", layout="zigzag", causal=True, seq=13).name]
    # the forward's W-1 transfers; the backward starts on the forward's last block and ends on its own: W-2
    assert outcome.stats["kv_sends"] == (world - 1) + (world - 2)
    assert outcome.stats["dkv_sends"] == world - 1  # one part per block not its own, straight to its owner


@pytest.mark.parametrize("world", (2, 3, 4))
def test_ring_gradient_parts_travel_once_in_the_inputs_dtype(world):
    """Each dK/dV part goes to its block's owner in bf16, as the kernel computed it, and nothing else travels:
    rank 0's zigzag parts are all against later blocks (every key of the block), so W-1 parts of a shard's size."""
    case = Case(strategy="ring", dtype="bfloat16", seq=4 * world)  # zigzag: every shard holds 4 tokens
    outcome = results(world)[case.name]
    _check(outcome, case)
    numel = case.batch * case.kv_heads * 4 * case.head_dim  # one rank's dK (or dV)
    assert outcome.stats["dkv_bytes"] == 2 * numel * 2 * (world - 1)


@pytest.mark.parametrize("world", (2, 3, 4))
def test_ring_evaluates_a_mask_mod_per_block(world):
    """Ring: a mask_mod is evaluated on (local rows x one KV block) at a time, never on (local rows x all keys);
    all-gather needs the whole row."""
    seq = 11
    longest = max(ring_shard_len(seq, world, r, "zigzag") for r in range(world))
    ring = results(world)[Case(strategy="ring", mask="mask_mod", seq=seq, causal=True).name]
    allgather = results(world)[Case(strategy="allgather", mask="mask_mod", seq=seq, causal=True).name]
    assert ring.stats["mask_mod_max_cells"] <= longest * longest
    assert allgather.stats["mask_mod_max_cells"] >= seq * ring_shard_len(seq, world, 0, "zigzag")


def test_hybrid_on_a_2x2_mesh():
    cases = [
        Case(strategy="hybrid", mesh=(2, 2), layout=layout, causal=causal, seq=15, mask=mask)
        for layout in ("zigzag", "contiguous") for causal in (True, False) for mask in (None, "bool", "mask_mod")
    ] + [Case(strategy="auto", mesh=(2, 2), q_heads=4, kv_heads=1, seq=10)]
    outcomes = run_cases(4, cases)
    failures = []
    for case in cases:
        try:
            _check(outcomes[case.name], case)
        except AssertionError as exc:
            failures.append(f"{case.name}: {exc}")
    assert not failures, "\n".join(failures)


EXPECTED_ERRORS = {
    "dropout": ("UnsupportedInputError", "dropout under ring attention"),
    "head_dim": ("RankMismatchError", "disagree on head dim"),
    "length": ("RankMismatchError", "local sequence lengths"),
    "provider": ("RankMismatchError", "disagree on provider"),
    "flex_grad": ("UnsupportedInputError", "provider 'flex'"),
    "missing_library": ("UnsupportedInputError", "provider 'sage'"),
    "prefix_ulysses": ("UnsupportedInputError", "cp_replicated_prefix runs with cp_strategy 'ring' or 'allgather'"),
    "suffix_ulysses": ("UnsupportedInputError", "cp_replicated_suffix runs with cp_strategy 'ring' or 'allgather'"),
    "kernel_lengths": ("UnsupportedInputError", "sageattention 1.0.6 counts the zero padding"),
}


@pytest.mark.parametrize("world", (2, 3, 4))
@pytest.mark.parametrize("fault", sorted(EXPECTED_ERRORS))
def test_bad_calls_raise_the_same_error_on_every_rank_quickly(world, fault):
    case = next(c for c in error_cases(world) if c.fault == fault)
    outcome = results(world)[case.name]
    kind, text = EXPECTED_ERRORS[fault]
    assert len(outcome.rank_exceptions) == world
    for exc_type, message, seconds in outcome.rank_exceptions:
        assert exc_type is not None, f"a rank did not raise for fault {fault}"
        assert seconds < 10, f"took {seconds:.1f}s to raise"
        if exc_type == kind:
            assert text in message, message
    assert any(t == kind and text in m for t, m, _ in outcome.rank_exceptions)


def test_ring_receive_buffers_are_allocated_at_first_use_and_reused():
    """Two ranks exchange once per pass: only one receive buffer exists; a third exchange reuses the first."""
    import torch

    from cpattn.cp.ring import _KVBuffers

    k, v = torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 3)
    buffers = _KVBuffers(k, v, max_len=5)
    first = buffers.next(5)
    assert buffers._bufs[1] is None and [t.shape for t in first] == [(1, 2, 5, 4), (1, 2, 5, 3)]
    second = buffers.next(4)
    assert second[0].shape == (1, 2, 4, 4) and second[0].data_ptr() != first[0].data_ptr()
    assert buffers.next(3)[0].data_ptr() == first[0].data_ptr()
