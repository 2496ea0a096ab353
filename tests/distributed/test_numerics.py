"""Numerics at the edges: fully masked rows, huge and tiny logits, float16 near overflow, 64k-token sequences,
and ring attention at W = 8. No NaN anywhere from finite inputs; the LSE of a row that sees no key is -inf
everywhere (single device, every merge, every rank of a ring); outputs and gradients within tolerances.

Tolerances
    Single device: tests/support/helpers.py OUT_ATOL / GRAD_ATOL per dtype (outputs and inputs O(1)).
    W ranks: reliability_helpers.cp_tolerance(dtype, W) = base * (1 + (W - 1) / 4): ring attention adds one
    rounding of an O(1) block result per rank (outputs merge W rounded blocks; dK/dV sum W rounded blocks).
    Huge logits L = scale * q.k: float32 scores carry an absolute error ~ |L| * 2**-24, which moves softmax
    weights by that relative amount, so the bound on outputs becomes max|V| * (base + 16 * max|L| * 2**-24)
    (`logit_tolerance`). float16 near overflow is compared relative to max|V|.
"""

from __future__ import annotations

import math

import pytest
import torch

import cpattn
from cpattn.call import make_call
from cpattn.ops.merge import PartialAttention, merge_two
from merge_reference import merge_many
from cp_harness import Case
from helpers import GRAD_ATOL, OUT_ATOL, assert_close, assert_lse_close, make_qkv, reference_with_grads
from reliability_helpers import cp_tolerance, run_ranks

TRAINING = ("native", "_native_math", "_native_flash")
FORWARD = TRAINING + ("flex",)


def logit_tolerance(dtype, max_logit: float, max_value: float) -> float:
    return max_value * (OUT_ATOL[dtype] + 16 * max_logit * 2.0**-24)


# -- masks with rows that see no key -----------------------------------------------------------------------------


def left_padding_causal(b, s, pads):
    """Left-padded batch under causal attention ("causal with offsets"): query i of sequence b sees keys
    pads[b] <= j <= i, so the first pads[b] rows of that sequence see nothing."""
    keys = torch.arange(s)
    valid = keys.expand(b, s) >= torch.tensor(pads).view(b, 1)
    return (valid[:, None, None, :] & torch.ones(s, s, dtype=torch.bool).tril()).expand(b, 1, s, s).clone()


def documents(b, s, seed=0):
    """Packed documents (block-diagonal, causal inside), with query-side padding tokens (document -1) whose rows
    see nothing and one batch row that is padding throughout (an empty batch element)."""
    gen = torch.Generator().manual_seed(seed)
    doc = torch.sort(torch.randint(0, 3, (b, s), generator=gen), dim=1).values
    doc[:, -3:] = -1  # trailing padding queries
    doc[-1] = -1  # the last batch element is all padding
    same = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    return (same & torch.ones(s, s, dtype=torch.bool).tril())[:, None]


def key_padding(b, s):
    """Batch element 1 has every key padded: all of its rows are empty (mask shape (B, 1, 1, S))."""
    m = torch.ones(b, 1, 1, s, dtype=torch.bool)
    m[1] = False
    m[0, ..., -3:] = False
    return m


EMPTY_ROW_MASKS = {
    "padding": (lambda b, s: key_padding(b, s), False),
    "causal_left_padding": (lambda b, s: left_padding_causal(b, s, [0, 5]), False),
    "causal_flag_and_left_padding": (lambda b, s: left_padding_causal(b, s, [2, 5])[:, :, :, :], True),
    "documents": (lambda b, s: documents(b, s), True),
}


@pytest.mark.parametrize("provider", TRAINING)
@pytest.mark.parametrize("kind", sorted(EMPTY_ROW_MASKS))
def test_fully_masked_rows_give_zero_out_zero_grad_and_no_nan(provider, kind):
    make, causal = EMPTY_ROW_MASKS[kind]
    b, s = 2, 12
    mask = make(b, s)
    q, k, v = make_qkv(b, 4, 2, s, s, 16, requires_grad=True, seed=1)
    dout = torch.randn(b, 4, s, 16, generator=torch.Generator().manual_seed(2))
    with cpattn.attention_provider(provider):
        out = cpattn.attention_dispatch(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    out.backward(dout)
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, dout, mask, causal)
    empty = torch.isneginf(ref_lse)
    assert empty.any() and not empty.all(), "the mask must make some rows, not all, empty"
    assert_close(out, ref_out, OUT_ATOL[torch.float32], "out")
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "empty rows must be exactly 0"
    for name, t, g in zip("qkv", (q, k, v), ref_grads):
        assert_close(t.grad, g, GRAD_ATOL[torch.float32], f"d{name}")
    assert torch.equal(q.grad[empty], torch.zeros_like(q.grad[empty])), "dq of empty rows must be exactly 0"


def _kernel_that_breaks_on_empty_rows(q, k, v, mask):
    """Plain softmax attention: NaN outputs and NaN gradients on rows that see no key, as an H100's SDPA
    backends gave (garbage outputs, NaN dQ)."""
    bias = mask.logical_not().float().masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else mask
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias, -1) @ v


@pytest.mark.parametrize("additive", (False, True))
@pytest.mark.parametrize("kind", sorted(EMPTY_ROW_MASKS))
def test_native_cuda_opens_empty_rows_for_the_kernel_and_zeroes_them_after(kind, additive):
    """What `native` does around SDPA on CUDA (open_empty_rows, then zero those rows), around a kernel that makes
    NaN on rows with no key: 0 output and exactly 0 gradient there, the reference everywhere else."""
    from cpattn.masks import open_empty_rows

    make, causal = EMPTY_ROW_MASKS[kind]
    b, s = 2, 12
    mask = make(b, s) & (torch.ones(s, s, dtype=torch.bool).tril() if causal else True)
    q, k, v = make_qkv(b, 4, 2, s, s, 16, requires_grad=True, seed=1)
    dout = torch.randn(b, 4, s, 16, generator=torch.Generator().manual_seed(2))
    kernel_mask = mask if not additive else torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    broken = _kernel_that_breaks_on_empty_rows(q, k, v, kernel_mask)
    assert broken.isnan().any(), "the stand-in kernel must break on empty rows for this test to mean anything"
    opened, empty = open_empty_rows(kernel_mask)
    out = _kernel_that_breaks_on_empty_rows(q, k, v, opened).masked_fill(empty, 0.0)
    out.backward(dout)
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, dout, mask, False)
    rows = torch.isneginf(ref_lse)
    assert torch.equal(empty.expand_as(ref_lse[..., None])[..., 0], rows.expand_as(ref_lse)), "empty rows found"
    assert_close(out, ref_out, OUT_ATOL[torch.float32], "out")
    for name, t, g in zip("qkv", (q, k, v), ref_grads):
        assert_close(t.grad, g, GRAD_ATOL[torch.float32], f"d{name}")
    assert torch.equal(q.grad[rows], torch.zeros_like(q.grad[rows])), "dq of empty rows must be exactly 0"


@pytest.mark.parametrize("provider", FORWARD)
@pytest.mark.parametrize("kind", sorted(EMPTY_ROW_MASKS))
def test_contract_lse_of_empty_rows_is_minus_inf(provider, kind):
    make, causal = EMPTY_ROW_MASKS[kind]
    mask = make(2, 12)
    q, k, v = make_qkv(2, 4, 2, 12, 12, 16, seed=3)
    out, lse = cpattn.get_provider(provider).forward(make_call(q, k, v, mask, 0.0, causal, None, True))
    ref_out, ref_lse = cpattn.reference_attention(q, k, v, mask, causal)
    assert_lse_close(lse, ref_lse, 1e-5)  # same -inf pattern, no NaN, no +inf
    assert_close(out, ref_out, OUT_ATOL[torch.float32], "out")


def test_empty_row_fixups_run_exactly_when_a_row_can_be_empty():
    """The +inf/-inf fix-ups of the LSE are skipped only for calls where no row can be empty (no mask, some key);
    a call with a mask or without keys keeps them."""
    from cpattn.contract import lse_for_kernel_backward, normalize_lse, rows_may_be_empty

    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, seed=1)
    assert not rows_may_be_empty(make_call(q, k, v, None, 0.0, True, None, False))
    assert rows_may_be_empty(make_call(q, k, v, torch.ones(4, 4, dtype=torch.bool), 0.0, False, None, False))
    assert rows_may_be_empty(make_call(q, k[:, :, :0], v[:, :, :0], None, 0.0, False, None, False))
    lse = torch.tensor([[[1.0, float("inf"), float("-inf")]]])
    assert normalize_lse(lse, 3).tolist() == [[[1.0, float("-inf"), float("-inf")]]]
    assert normalize_lse(lse, 3, may_be_empty=False).tolist() == lse.tolist()
    assert lse_for_kernel_backward(lse).tolist() == [[[1.0, float("inf"), float("inf")]]]
    assert lse_for_kernel_backward(lse, False) is lse


@pytest.mark.parametrize("blocks", [2, 3, 8])
def test_merges_keep_empty_rows_empty_and_scale_with_the_number_of_blocks(blocks):
    """Keys split into W blocks (some empty for some rows, one empty for every row), merged by the ring's
    accumulator, pairwise and at once: lse -inf exactly where the reference has it, no NaN, and the error within
    the W-scaled tolerance."""
    b, h, sq, sk, d = 2, 2, 10, 8 * blocks, 16
    q, k, v = make_qkv(b, h, h, sq, sk, d, seed=blocks)
    mask = torch.rand(b, 1, sq, sk, generator=torch.Generator().manual_seed(4)) < 0.5
    mask[:, :, 3] = False  # a row that sees nothing in any block
    mask[..., : sk // blocks] = False  # block 0 is empty for every row
    provider = cpattn.get_provider("_native_flash")
    parts = []
    for i in range(blocks):
        cols = slice(i * sk // blocks, (i + 1) * sk // blocks)
        parts.append(provider.forward(make_call(q, k[:, :, cols], v[:, :, cols], mask[..., cols], 0.0, False,
                                                None, False)))
    ref_out, ref_lse = cpattn.reference_attention(q, k, v, mask)
    acc = PartialAttention(b, h, sq, d, q.device)
    for out_b, lse_b in parts:
        acc.add(out_b, lse_b)
    merged = merge_many([p[0] for p in parts], [p[1] for p in parts])
    pairwise = parts[0]
    for part in parts[1:]:
        pairwise = merge_two(*pairwise, *part)
    tol = cp_tolerance(torch.float32, blocks)
    for name, (out, lse) in {"accumulator": acc.value(), "merge_many": merged, "merge_two": pairwise}.items():
        assert_lse_close(lse, ref_lse, tol, f"{name} lse")
        assert_close(out, ref_out, tol, f"{name} out")
        assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3])), f"{name}: empty row not 0"


def test_merge_of_only_empty_blocks_is_empty_not_nan():
    empty_out = torch.zeros(1, 1, 3, 4)
    empty_lse = torch.full((1, 1, 3), -math.inf)
    for out, lse in (merge_two(empty_out, empty_lse, empty_out, empty_lse),
                     merge_many([empty_out] * 8, [empty_lse] * 8)):
        assert torch.isneginf(lse).all() and torch.equal(out, torch.zeros_like(out))


# -- huge and tiny logits ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", TRAINING)
@pytest.mark.parametrize("scale", [1e4, 1e2, 1e-6, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_and_tiny_logits(provider, scale, dtype):
    """scale 1e4: logits ~1e5, softmax is a hard max (lse ~ the max logit); scale -> 0: a plain mean of V."""
    q, k, v = make_qkv(2, 2, 2, 9, 11, 16, dtype=dtype, requires_grad=True, seed=6)
    dout = torch.randn(2, 2, 9, 16, dtype=torch.float64).to(dtype)
    with cpattn.attention_provider(provider):
        out = cpattn.attention_dispatch(q, k, v, is_causal=True, scale=scale)
    out.backward(dout)
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, dout, None, True, scale)
    max_logit = float((q.detach().double() @ k.detach().double().transpose(-1, -2)).abs().max() * scale)
    tol = logit_tolerance(dtype, max_logit, 1.0 + float(v.detach().abs().max()))
    assert_close(out, ref_out, tol, "out")
    for name, t, g in zip("qkv", (q, k, v), ref_grads):
        assert torch.isfinite(t.grad).all(), f"d{name} not finite"
        rel = max(1.0, float(g.abs().max()))  # gradients scale with `scale`
        assert_close(t.grad / rel, g / rel, GRAD_ATOL[dtype] + 16 * max_logit * 2.0**-24, f"d{name}")
    if scale == 0.0:  # causal mean: row i averages keys 0..i
        mean = v.detach().double().cumsum(2)[:, :, :9] / torch.arange(1, 10, dtype=torch.float64).view(9, 1)
        assert_close(out, mean, OUT_ATOL[dtype], "scale 0 is the causal mean of V")
    _, lse = cpattn.get_provider(provider).forward(make_call(q.detach(), k.detach(), v.detach(), None, 0.0, True,
                                                             scale, False))
    assert_lse_close(lse, ref_lse, max(1e-5, 2 * max_logit * 2.0**-24), "lse")


@pytest.mark.parametrize("provider", TRAINING)
@pytest.mark.parametrize("scale", [100.0, 0.01], ids=["logits_beyond_range", "values_sum_beyond_range"])
def test_float16_near_overflow(provider, scale):
    """float16 overflows at 65504. scale 100: scores up to ~7e4, so scoring must happen in float32. scale 0.01:
    near-uniform weights over 16 values of ~6e4 each, whose unnormalised sum (~1e6) overflows a float16
    accumulator. Outputs are convex combinations of V, so they stay in range; errors relative to max|V|."""
    q, k, v = make_qkv(1, 2, 2, 16, 16, 16, dtype=torch.float64, seed=7)
    q16, k16 = (q * 8).half(), (k * 8).half()
    v16 = (60000 - v.abs() * 1000).clamp_min(0).half()
    with cpattn.attention_provider(provider):
        out = cpattn.attention_dispatch(q16, k16, v16, is_causal=True, scale=scale)
    ref_out, ref_lse = cpattn.reference_attention(q16, k16, v16, None, True, scale)
    max_logit = float((q16.double() @ k16.double().transpose(-1, -2)).abs().max() * scale)
    if scale > 1:
        assert max_logit > 65504, f"logits must exceed float16's range, max {max_logit:.0f}"
    assert torch.isfinite(out).all(), "overflow to inf/NaN"
    max_v = float(v16.abs().max())
    err = float((out.double() - ref_out).abs().max())
    assert err <= logit_tolerance(torch.float16, max_logit, max_v), f"error {err:.1f} with max|V| {max_v:.0f}"


# -- long sequences ----------------------------------------------------------------------------------------------

LONG = 65536


def _sample_rows(n):
    gen = torch.Generator().manual_seed(8)
    return torch.unique(torch.cat([torch.tensor([0, 1, 2, 4095, n // 2, n - 2, n - 1]),
                                   torch.randint(0, n, (9,), generator=gen)]))


def test_64k_tokens_causal_on_one_device():
    """One head, head dim 8, 65,536 tokens, causal: out and lse of sampled rows against float64 (the full
    reference would need 32 GiB); ~4 s of CPU."""
    q, k, v = make_qkv(1, 1, 1, LONG, LONG, 8, seed=9)
    out, lse = cpattn.get_provider("native").forward(make_call(q, k, v, None, 0.0, True, None, False))
    rows = _sample_rows(LONG)
    positions = torch.arange(LONG)
    mask = positions.view(1, -1) <= rows.view(-1, 1)  # causal rows of the sampled queries
    ref_out, ref_lse = cpattn.reference_attention(q[:, :, rows], k, v, mask)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_close(out[:, :, rows], ref_out, OUT_ATOL[torch.float32], "out")
    assert_lse_close(lse[:, :, rows], ref_lse, 1e-4, "lse")


def test_64k_keys_merged_from_8_blocks_with_empty_rows():
    """The merge path at 64k keys: 8 blocks of 8,192, batch element 1 sees keys of block 5 only (so 7 of its
    8 blocks are empty), one query row sees nothing at all."""
    b, sq, d, blocks = 2, 32, 8, 8
    q, k, v = make_qkv(b, 1, 1, sq, LONG, d, seed=10)
    mask = torch.ones(b, 1, sq, LONG, dtype=torch.bool)
    mask[1] = False
    mask[1, ..., 5 * LONG // blocks: 6 * LONG // blocks] = True
    mask[0, :, 7] = False
    provider = cpattn.get_provider("_native_flash")
    acc = PartialAttention(b, 1, sq, d, q.device)
    outs, lses = [], []
    for i in range(blocks):
        cols = slice(i * LONG // blocks, (i + 1) * LONG // blocks)
        out_b, lse_b = provider.forward(make_call(q, k[:, :, cols], v[:, :, cols], mask[..., cols], 0.0, False,
                                                  None, False))
        acc.add(out_b, lse_b)
        outs.append(out_b)
        lses.append(lse_b)
    ref_out, ref_lse = cpattn.reference_attention(q, k, v, mask)
    tol = cp_tolerance(torch.float32, blocks)
    for name, (out, lse) in {"accumulator": acc.value(), "merge_many": merge_many(outs, lses)}.items():
        assert_lse_close(lse, ref_lse, 1e-4, f"{name} lse")
        assert torch.isneginf(lse[0, 0, 7]) and torch.equal(out[0, 0, 7], torch.zeros(d))
        assert_close(out, ref_out, tol, f"{name} out")


# -- ring attention at W = 8 -------------------------------------------------------------------------------------

W8_CASES = [
    Case(seq=16, batch=1, q_heads=2, kv_heads=1, head_dim=8),
    Case(seq=19, batch=1, q_heads=2, kv_heads=1, head_dim=8, layout="contiguous"),
    Case(seq=19, batch=2, q_heads=2, kv_heads=1, head_dim=8, mask="empty_rows"),
    Case(seq=21, batch=2, q_heads=2, kv_heads=2, head_dim=8, mask="key_padding"),
    Case(seq=17, batch=1, q_heads=2, kv_heads=2, head_dim=8, mask="additive", causal=False),
    Case(seq=16, batch=1, q_heads=2, kv_heads=1, head_dim=16, dtype="bfloat16"),
    Case(seq=16, batch=1, q_heads=2, kv_heads=1, head_dim=16, dtype="float16"),
    Case(seq=24, batch=1, q_heads=2, kv_heads=1, head_dim=8, provider="_native_math", mask="empty_rows"),
    # fewer tokens than ranks: some ranks hold nothing (the CPU flash kernel used to kill such a rank)
    Case(seq=5, batch=1, q_heads=2, kv_heads=1, head_dim=8),
    Case(seq=5, batch=1, q_heads=2, kv_heads=1, head_dim=8, strategy="allgather", provider="_native_flash"),
    Case(seq=6, batch=1, q_heads=8, kv_heads=8, head_dim=8, strategy="ulysses", provider="_native_flash"),
]


def _ring_spec_and_call(mesh, q, k, v, mask, causal, layout, scale=None):
    from cpattn.cp import ContextParallel
    from cpattn.cp.agreement import agree
    from cpattn.cp.ring import ring_spec

    cp = ContextParallel.from_mesh(mesh, "ring", layout, 20.0)
    call = make_call(q, k, v, mask, 0.0, causal, scale, q.shape[1] != k.shape[1], sharded=True)
    provider = cpattn.get_provider("native")
    total = agree(cp, provider, call, "ring", refused=False).total
    return provider, call, ring_spec(cp, total)


def _ring_out_lse(mesh, q, k, v, mask, causal, layout, scale=None):
    """Gathered (out, lse) of ring_forward over sharded inputs (tensors are the full problem on every rank)."""
    from cpattn.cp.ring import ring_forward

    shard = lambda t: cpattn.shard_sequence(t, mesh, 2, layout)  # noqa: E731
    mask_l = None if mask is None else (mask if mask.shape[-2] == 1 else shard(mask))
    provider, call, spec = _ring_spec_and_call(mesh, shard(q), shard(k), shard(v), mask_l, causal, layout, scale)
    out, lse = ring_forward(provider, call, spec)
    gather = lambda t: cpattn.gather_sequence(t, mesh, 2, layout)  # noqa: E731
    return gather(out.to(q.dtype)), gather(lse)


def _w8_checks(rank, world, cases):
    """Everything at W = 8 in one spawn: the harness cases, then LSE, NaN and float16 checks on ring_forward."""
    from torch.distributed.device_mesh import init_device_mesh

    from cp_harness import _run_case

    report = {}
    meshes: dict = {}
    for case in cases:
        try:
            report[case.name] = _run_case(case, rank, world, meshes).errors
        except Exception as exc:
            report[case.name] = f"{type(exc).__name__}: {exc}"
    mesh = init_device_mesh("cpu", (world,))
    s = 37
    q, k, v = make_qkv(2, 2, 1, s, s, 8, seed=11)
    for layout in ("zigzag", "contiguous"):
        mask = left_padding_causal(2, s, [0, 9]) & documents(2, s, seed=3).logical_or(
            torch.eye(s, dtype=torch.bool))
        out, lse = _ring_out_lse(mesh, q, k, v, mask, True, layout)
        ref_out, ref_lse = cpattn.reference_attention(q, k, v, mask, True)
        report[f"empty_rows_{layout}"] = dict(
            lse_pattern=bool(torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))),
            empty_rows=int(torch.isneginf(ref_lse).sum()),
            nan=bool(torch.isnan(out).any() or torch.isnan(lse).any()),
            empty_out_zero=bool((out[torch.isneginf(ref_lse)] == 0).all()),
            out=float((out.double() - ref_out).abs().max()),
            lse=float((lse.double() - ref_lse)[torch.isfinite(ref_lse)].abs().max()),
        )
        # a NaN key j under causal: only rows >= j see it
        j = 23
        k_nan = k.clone()
        k_nan[:, :, j, 0] = math.nan
        out, lse = _ring_out_lse(mesh, q, k_nan, v, None, True, layout)
        ref_out, _ = cpattn.reference_attention(q, k, v, None, True)
        report[f"nan_key_{layout}"] = dict(
            before_finite=bool(torch.isfinite(out[:, :, :j]).all() and torch.isfinite(lse[:, :, :j]).all()),
            before_err=float((out[:, :, :j].double() - ref_out[:, :, :j]).abs().max()),
            after_nan=bool(torch.isnan(out[:, :, j:]).any(-1).all() and torch.isnan(lse[:, :, j:]).all()),
        )
    # float16: values near its max, logits beyond its range
    q16, k16 = (q * 8).half(), (k * 8).half()
    v16 = (60000 - v.abs() * 1000).clamp_min(0).half()
    for scale in (100.0, 0.01):
        out, _ = _ring_out_lse(mesh, q16, k16, v16, None, True, "zigzag", scale=scale)
        ref_out, _ = cpattn.reference_attention(q16, k16, v16, None, True, scale)
        max_logit = float((q16.double() @ k16.double().transpose(-1, -2)).abs().max() * scale)
        report[f"float16_{scale}"] = dict(finite=bool(torch.isfinite(out).all()), max_logit=max_logit,
                                          err=float((out.double() - ref_out).abs().max()), max_v=float(v16.abs().max()))
    return report


@pytest.fixture(scope="module")
def w8():
    result = run_ranks(8, _w8_checks, W8_CASES, timeout=240)
    for r in result.ranks:
        assert not r.killed and r.error is None, f"rank {r.rank}: {r.error or 'killed at the deadline'}"
    return result[0].value


@pytest.mark.distributed
@pytest.mark.parametrize("case", W8_CASES, ids=lambda c: c.name)
def test_ring_and_friends_at_w8_match_the_reference(w8, case):
    errors = w8[case.name]
    assert isinstance(errors, dict), errors
    dtype = getattr(torch, case.dtype)
    assert errors["out_finite"] == 1.0, "non-finite output"
    assert errors["out"] <= cp_tolerance(dtype, 8), f"out error {errors['out']:.3g}"
    for name in ("dq", "dk", "dv"):
        assert errors[name] <= cp_tolerance(dtype, 8, "grad"), f"{name} error {errors[name]:.3g}"


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_lse_of_empty_rows_is_minus_inf_on_every_rank_at_w8(w8, layout):
    r = w8[f"empty_rows_{layout}"]
    assert r["empty_rows"] > 0
    assert r["lse_pattern"], "ring lse is -inf exactly where the reference's is"
    assert not r["nan"] and r["empty_out_zero"]
    assert r["out"] <= cp_tolerance(torch.float32, 8) and r["lse"] <= cp_tolerance(torch.float32, 8)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_keeps_a_nan_key_to_the_rows_that_see_it_at_w8(w8, layout):
    r = w8[f"nan_key_{layout}"]
    assert r["before_finite"], "rows before the NaN key must stay finite"
    assert r["before_err"] <= cp_tolerance(torch.float32, 8)
    assert r["after_nan"], "rows that attend to the NaN key are NaN (out and lse), as on one device"


@pytest.mark.distributed
@pytest.mark.parametrize("scale", [100.0, 0.01])
def test_ring_float16_near_overflow_at_w8(w8, scale):
    """As test_float16_near_overflow, through ring_forward on 8 ranks (float16 blocks merged in float32)."""
    r = w8[f"float16_{scale}"]
    assert r["finite"] and (scale < 1 or r["max_logit"] > 65504), r
    assert r["err"] <= logit_tolerance(torch.float16, r["max_logit"], r["max_v"]) * (1 + 7 / 4), r
