"""Provider 'flex' on CPU: forward against the float64 reference (masks, causal, GQA, odd shapes), the dispatcher,
the CPU no-backward error, the block-mask cache, and the ring-backward identity of `recompute_block_grads`.

Flex itself has no backward on CPU, so its CUDA backward is only checked here through the identity it relies
on, with a pure-torch differentiable attention standing in for flex.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import cpattn
from cpattn.contract import AttentionCall, default_scale
from cpattn.masks import select_keys
from cpattn.providers import flex as flex_module
from helpers import (
    GRAD_ATOL,
    OUT_ATOL,
    assert_close,
    assert_lse_close,
    make_qkv,
    max_err,
    random_bool_mask,
    reference_with_grads,
)

# Calling flex eagerly on CPU is deliberate (see cpattn/providers/flex.py); its performance hint is noise here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

LSE_ATOL = {torch.float64: 1e-5, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@pytest.fixture
def flex():
    """A fresh adapter, so every test starts with an empty block-mask cache."""
    return flex_module.Flex()


# -- problems -------------------------------------------------------------------------------------------------


def _additive(shape, seed, empty_row=None):
    """A float mask: random bias, some keys hidden with -inf, optionally a row hidden entirely."""
    gen = torch.Generator().manual_seed(seed + 2000)
    bias = torch.randn(shape, generator=gen, dtype=torch.float64)
    hidden = torch.rand(shape, generator=gen) < 0.2
    bias = bias.masked_fill(hidden, float("-inf"))
    if empty_row is not None:
        bias[..., empty_row, :] = float("-inf")
    return bias


def _key_padding_bool(b, sk):
    mask = torch.ones(b, 1, 1, sk, dtype=torch.bool)
    mask[0, ..., sk - 5 :] = False  # batch 0: the last keys are padding
    mask[1] = False  # batch 1: every key is padding, so every row of it sees nothing
    return mask


def _ragged_key_padding(sk, valid=(100, 250)):
    """Batch i sees only its first valid[i] keys: with sk > 128 whole key blocks are empty for one batch only."""
    return torch.arange(sk).expand(len(valid), 1, 1, sk) < torch.tensor(valid).view(-1, 1, 1, 1)


def _key_padding_additive(b, sk):
    return torch.zeros(b, 1, 1, sk, dtype=torch.float64).masked_fill(~_key_padding_bool(b, sk), float("-inf"))


@dataclass(frozen=True)
class Case:
    b: int
    hq: int
    hkv: int
    sq: int
    sk: int
    d: int = 16
    dv: int | None = None
    mask: Callable | None = None  # (case) -> mask tensor
    causal: bool = False
    scale: float | None = None


CASES = {
    "no_mask": Case(2, 2, 2, 16, 16),
    "causal": Case(2, 2, 2, 16, 16, causal=True),
    "causal_sq_lt_sk": Case(1, 2, 2, 13, 29, causal=True),
    "causal_sq_gt_sk": Case(1, 2, 2, 29, 13, causal=True),
    "bool_mask": Case(2, 3, 3, 12, 20, mask=lambda c: random_bool_mask((2, 3, 12, 20), empty_row=5)),
    "bool_mask_and_causal": Case(2, 3, 3, 12, 20, mask=lambda c: random_bool_mask((2, 1, 12, 20)), causal=True),
    "bool_mask_per_head_keys": Case(2, 3, 3, 12, 20, mask=lambda c: random_bool_mask((1, 3, 1, 20), p_keep=0.5)),
    "bool_mask_1d": Case(2, 2, 2, 12, 20, mask=lambda c: random_bool_mask((20,), p_keep=0.6)),
    "bool_mask_all_broadcast": Case(2, 2, 2, 12, 20, mask=lambda c: torch.ones(1, 1, 1, 1, dtype=torch.bool)),
    "additive_all_broadcast": Case(2, 2, 2, 12, 20, mask=lambda c: torch.full((1, 1), -0.5)),
    "additive": Case(2, 3, 3, 12, 20, mask=lambda c: _additive((2, 3, 12, 20), 0, empty_row=7)),
    "additive_and_causal": Case(2, 3, 3, 12, 20, mask=lambda c: _additive((1, 1, 12, 20), 1), causal=True),
    "key_padding_bool": Case(2, 2, 2, 12, 20, mask=lambda c: _key_padding_bool(2, 20)),
    "key_padding_additive": Case(2, 2, 2, 12, 20, mask=lambda c: _key_padding_additive(2, 20)),
    "gqa_causal": Case(2, 4, 2, 16, 16, causal=True),
    "gqa_bool_mask": Case(2, 4, 2, 12, 20, mask=lambda c: random_bool_mask((2, 4, 12, 20), empty_row=3)),
    "heads_eq_seq_per_head_mask": Case(2, 8, 8, 8, 8, mask=lambda c: random_bool_mask((2, 8, 8, 8), empty_row=2)),
    "heads_eq_seq_2d_mask": Case(2, 8, 8, 8, 8, mask=lambda c: random_bool_mask((8, 8), p_keep=0.6)),
    "odd_lengths": Case(2, 2, 2, 13, 29, mask=lambda c: random_bool_mask((1, 13, 29))),
    "odd_lengths_causal_scale": Case(1, 2, 2, 13, 29, causal=True, scale=0.3),
    # Several 128-blocks, lengths not multiples of 128: the compiled CUDA kernel skips blocks and pads here.
    "multi_block_ragged_padding_causal": Case(2, 2, 2, 140, 260, mask=lambda c: _ragged_key_padding(260), causal=True),
    "value_dim_differs": Case(2, 2, 2, 12, 20, d=16, dv=8, causal=True),
}


def build_problem(case: Case, dtype, seed=0):
    q, k, v = make_qkv(case.b, case.hq, case.hkv, case.sq, case.sk, case.d, dtype=dtype, dv=case.dv, seed=seed)
    mask = case.mask(case) if case.mask is not None else None
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    return q, k, v, mask


def make_call(q, k, v, mask=None, causal=False, scale=None) -> AttentionCall:
    scale = default_scale(q.shape[-1]) if scale is None else scale
    return AttentionCall(q, k, v, mask, causal, scale, enable_gqa=q.shape[1] != k.shape[1])


def assert_matches_reference(out, lse, q, k, v, mask, causal, scale, dtype):
    ref_out, ref_lse = cpattn.reference_attention(q, k, v, mask, causal, scale)
    assert out.dtype == dtype, f"out dtype {out.dtype}, inputs are {dtype}"
    assert_close(out, ref_out, OUT_ATOL[dtype], "out")
    assert_lse_close(lse, ref_lse, LSE_ATOL[dtype])
    empty = torch.isneginf(ref_lse)
    assert torch.all(out[empty] == 0), "rows that see no key must give out 0"


# -- forward against the reference -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_reference(flex, name, dtype):
    case = CASES[name]
    q, k, v, mask = build_problem(case, dtype)
    out, lse = flex.forward(make_call(q, k, v, mask, case.causal, case.scale))
    assert_matches_reference(out, lse, q, k, v, mask, case.causal, case.scale, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["bool_mask_and_causal", "additive", "gqa_causal"])
def test_forward_half_precision(flex, name, dtype):
    case = CASES[name]
    q, k, v, mask = build_problem(case, dtype)
    out, lse = flex.forward(make_call(q, k, v, mask, case.causal, case.scale))
    assert_matches_reference(out, lse, q, k, v, mask, case.causal, case.scale, dtype)


def test_key_padding_fully_padded_batch_gives_empty_rows(flex):
    """Batch 1 has every key padded: lse -inf and out exactly 0 on all of its rows, finite elsewhere."""
    q, k, v = make_qkv(2, 2, 2, 12, 20, 16, dtype=torch.float32)
    out, lse = flex.forward(make_call(q, k, v, _key_padding_bool(2, 20)))
    assert torch.isneginf(lse[1]).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(lse[0]).all()


def test_forward_takes_inputs_that_require_grad(flex):
    """Ring schedules call forward() on leaf tensors that require grad; flex on CPU must not see the flag."""
    q, k, v = make_qkv(1, 2, 2, 12, 20, 16, dtype=torch.float64, requires_grad=True)
    out, lse = flex.forward(make_call(q, k, v, causal=True))
    assert not out.requires_grad and not lse.requires_grad
    assert_matches_reference(out, lse, q.detach(), k.detach(), v.detach(), None, True, None, torch.float64)


# -- through the dispatcher -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gqa_bool_mask", "additive_and_causal", "key_padding_bool", "odd_lengths"])
def test_attention_dispatch_under_flex(name):
    case = CASES[name]
    q, k, v, mask = build_problem(case, torch.float32)
    with cpattn.attention_provider("flex"):
        out = cpattn.attention_dispatch(
            q, k, v, attn_mask=mask, is_causal=case.causal, scale=case.scale, enable_gqa=case.hq != case.hkv
        )
    ref_out, _ = cpattn.reference_attention(q, k, v, mask, case.causal, case.scale)
    assert out.dtype == torch.float32
    assert_close(out, ref_out, OUT_ATOL[torch.float32], "out")


def test_dispatch_under_no_grad_with_grad_tensors():
    """no_grad means no gradients are needed: flex must run even though the tensors require grad."""
    q, k, v = make_qkv(1, 2, 2, 12, 20, 16, dtype=torch.float32, requires_grad=True)
    with torch.no_grad(), cpattn.attention_provider("flex"):
        out = cpattn.attention_dispatch(q, k, v, is_causal=True)
    ref_out, _ = cpattn.reference_attention(q.detach(), k.detach(), v.detach(), is_causal=True)
    assert_close(out, ref_out, OUT_ATOL[torch.float32], "out")


def test_gradients_on_cpu_are_refused_with_a_clear_error():
    q, k, v = make_qkv(1, 2, 2, 12, 20, 16, dtype=torch.float32, requires_grad=True)
    with cpattn.attention_provider("flex"), pytest.raises(cpattn.UnsupportedInputError) as info:
        cpattn.attention_dispatch(q, k, v, is_causal=True)
    message = str(info.value)
    assert "'flex'" in message
    assert "no backward on CPU" in message


def test_backward_on_cpu_raises(flex):
    q, k, v = make_qkv(1, 2, 2, 12, 20, 16, dtype=torch.float64)
    call = make_call(q, k, v)
    out, lse = flex.forward(call)
    with pytest.raises(cpattn.UnsupportedInputError, match="no backward on CPU"):
        flex.backward(call, torch.ones_like(out), out, lse)


def test_capabilities_state_the_cpu_and_cuda_limits(flex):
    cpu, cuda = flex.capabilities("cpu"), flex.capabilities("cuda")
    assert cpu.dtypes == {torch.float16, torch.bfloat16, torch.float32, torch.float64}
    assert (cpu.backward, cpu.training, cpu.returns_lse) == (False, False, True)
    assert "CPU flex has no backward" in cpu.notes
    assert (cpu.causal, cpu.bool_mask, cpu.additive_mask, cpu.key_padding_mask, cpu.gqa) == (True,) * 5
    assert cuda.dtypes == {torch.float16, torch.bfloat16, torch.float32}
    assert (cuda.backward, cuda.training, cuda.returns_lse, cuda.dropout) == (True, True, True, False)
    assert cpattn.get_provider("flex").name == "flex"


# -- block masks and their cache ---------------------------------------------------------------------------


@pytest.fixture
def count_builds(monkeypatch):
    """Counts calls of torch's create_block_mask made by the adapter."""
    calls = []
    real = flex_module.build_block_mask

    def counting(*args, **kwargs):
        calls.append(args[1:5])  # batch, heads, q_len, kv_len
        return real(*args, **kwargs)

    monkeypatch.setattr(flex_module, "build_block_mask", counting)
    return calls


def test_same_call_twice_builds_the_block_mask_once(flex, count_builds):
    q, k, v, mask = build_problem(CASES["bool_mask_and_causal"], torch.float32)
    call = make_call(q, k, v, mask, causal=True)
    first, _ = flex.forward(call)
    second, _ = flex.forward(call)
    assert len(count_builds) == 1
    assert (flex.block_masks.builds, flex.block_masks.hits) == (1, 1)
    assert torch.equal(first, second)


def test_block_mask_dims_follow_the_mask_broadcast(flex, count_builds):
    q, k, v = make_qkv(2, 3, 3, 12, 20, 16)
    flex.forward(make_call(q, k, v, _key_padding_bool(2, 20)))
    flex.forward(make_call(q, k, v, random_bool_mask((1, 3, 12, 20))))
    flex.forward(make_call(q, k, v, causal=True))
    assert count_builds == [(2, None, 12, 20), (None, 3, 12, 20), (None, None, 12, 20)]


def test_cache_tells_apart_causal_lengths_and_masks(flex, count_builds):
    q, k, v = make_qkv(1, 2, 2, 12, 20, 16)
    mask = random_bool_mask((1, 1, 12, 20))
    flex.forward(make_call(q, k, v, mask))
    flex.forward(make_call(q, k, v, mask, causal=True))
    flex.forward(make_call(q, k, v, mask.clone()))  # equal values, another tensor: no identity match
    q2, k2, v2 = make_qkv(1, 2, 2, 12, 24, 16)
    flex.forward(make_call(q2, k2, v2, causal=True))
    flex.forward(make_call(q, k, v, causal=True))
    assert len(count_builds) == 5


def test_in_place_edit_of_the_mask_rebuilds(flex, count_builds):
    q, k, v = make_qkv(1, 2, 2, 12, 20, 16, dtype=torch.float64)
    mask = random_bool_mask((1, 1, 12, 20))
    flex.forward(make_call(q, k, v, mask))
    mask[..., 4, :] = False  # the same tensor now hides row 4 entirely
    out, lse = flex.forward(make_call(q, k, v, mask))
    assert len(count_builds) == 2
    assert_matches_reference(out, lse, q, k, v, mask, False, None, torch.float64)


def test_inference_mode_masks_are_not_cached_but_correct(flex, count_builds):
    q, k, v = make_qkv(1, 2, 2, 12, 20, 16, dtype=torch.float64)
    with torch.inference_mode():
        mask = random_bool_mask((1, 1, 12, 20), empty_row=1)
        for _ in range(2):
            out, lse = flex.forward(make_call(q, k, v, mask))
    assert len(count_builds) == 2 and len(flex.block_masks) == 0
    assert_matches_reference(out, lse, q, k, v, mask, False, None, torch.float64)


def test_no_block_mask_without_structure(flex, count_builds):
    """Additive masks go through score_mod only; with neither causal nor a bool mask nothing is built."""
    q, k, v, mask = build_problem(CASES["additive"], torch.float32)
    flex.forward(make_call(q, k, v, mask))
    flex.forward(make_call(q, k, v))
    assert count_builds == []


def test_block_mask_cache_is_a_bounded_lru(flex, count_builds):
    flex.block_masks.capacity = 2
    q, k, v = make_qkv(1, 2, 2, 12, 20, 16)
    masks = [random_bool_mask((1, 1, 12, 20), seed=i) for i in range(3)]
    for mask in masks:
        flex.forward(make_call(q, k, v, mask))
    assert len(flex.block_masks) == 2
    flex.forward(make_call(q, k, v, masks[2]))  # most recent: still cached
    assert len(count_builds) == 3
    flex.forward(make_call(q, k, v, masks[0]))  # least recent: evicted, built again
    assert len(count_builds) == 4


# -- backward identity (what ring backward needs) --------------------------------------------------------------


def _reference_block_fn(mask_block, scale):
    """A differentiable (out, lse) of one KV block, standing in for flex (which has no CPU backward)."""

    def fn(q, k, v):
        return cpattn.reference_attention(q, k, v, mask_block, False, scale)

    return fn


def _blockwise_grads(q, k, v, mask, dout, out, lse, split, scale, use_lse_grad=True):
    """Gradients of the whole problem assembled from two KV blocks, each given the global (out, lse)."""
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for keys in (slice(0, split), slice(split, k.shape[2])):
        block_mask = select_keys(mask, keys)
        call = make_call(q, k[:, :, keys], v[:, :, keys], block_mask, scale=scale)
        fn = _reference_block_fn(block_mask, scale)
        if use_lse_grad:
            bq, bk, bv = flex_module.recompute_block_grads(fn, call, dout, out, lse)
        else:  # the naive shortcut: treat the block's out as if it were the global one
            bq, bk, bv = _grads_ignoring_lse(fn, call, dout, out, lse)
        dq += bq
        dks.append(bk)
        dvs.append(bv)
    return dq, torch.cat(dks, dim=2), torch.cat(dvs, dim=2)


def _grads_ignoring_lse(fn, call, dout, out, lse):
    q, k, v = (t.detach().requires_grad_(True) for t in (call.query, call.key, call.value))
    block_out, block_lse = fn(q, k, v)
    grad_out, _ = flex_module.block_output_grads(dout, out, lse, block_out.detach(), block_lse.detach())
    return torch.autograd.grad(block_out, (q, k, v), grad_out)


def _ring_problem():
    """GQA, a causal-shaped bool mask (so a block misses whole rows) and one row that sees no key at all."""
    q, k, v = make_qkv(2, 4, 2, 12, 20, 16, dtype=torch.float64, seed=3)
    mask = torch.ones(12, 20, dtype=torch.bool).tril(diagonal=4).expand(2, 4, 12, 20).clone()
    mask[1, 2, 6, :] = False
    dout = torch.randn(2, 4, 12, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return q, k, v, mask, dout


def test_recompute_block_grads_matches_full_autograd():
    q, k, v, mask, dout = _ring_problem()
    scale = default_scale(16)
    out, lse, (dq_ref, dk_ref, dv_ref) = reference_with_grads(q, k, v, dout, mask=mask, scale=scale)
    lse32 = lse.float()  # what a provider's forward and the merge hand over (the contract's float32 lse)
    dq, dk, dv = _blockwise_grads(q, k, v, mask, dout, out, lse32, split=8, scale=scale)
    for name, got, want in (("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)):
        assert_close(got, want, GRAD_ATOL[torch.float64], name)


def test_block_lse_gradient_is_needed_when_the_block_is_a_strict_subset():
    """Guards the test above: without dL/dlse_b the block gradients are wrong, so that test can fail."""
    q, k, v, mask, dout = _ring_problem()
    scale = default_scale(16)
    out, lse, (dq_ref, dk_ref, _) = reference_with_grads(q, k, v, dout, mask=mask, scale=scale)
    dq, dk, _ = _blockwise_grads(q, k, v, mask, dout, out, lse.float(), 8, scale, use_lse_grad=False)
    assert max_err(dq, dq_ref) > 1e-2 and max_err(dk, dk_ref) > 1e-2


def test_block_output_grads_for_a_block_that_is_the_whole_row():
    """When the block is the whole row (lse == lse_b, out == o_b): dL/do_b = dout and dL/dlse_b = 0."""
    q, k, v = make_qkv(1, 2, 2, 12, 20, 16, dtype=torch.float64)
    out, lse = cpattn.reference_attention(q, k, v, is_causal=True)
    dout = torch.randn_like(out)
    grad_out, grad_lse = flex_module.block_output_grads(dout, out, lse.float(), out, lse)
    assert_close(grad_out, dout, 1e-6, "grad_out")
    assert_close(grad_lse, torch.zeros_like(grad_lse), 1e-6, "grad_lse")


def test_block_output_grads_zero_on_rows_no_block_reaches():
    lse = torch.tensor([[[0.5, float("-inf")]]])
    block_lse = torch.tensor([[[float("-inf"), float("-inf")]]], dtype=torch.float64)
    out = torch.zeros(1, 1, 2, 3, dtype=torch.float64)
    grad_out, grad_lse = flex_module.block_output_grads(torch.ones_like(out), out, lse, out, block_lse)
    assert torch.equal(grad_out, torch.zeros_like(grad_out)) and torch.equal(grad_lse, torch.zeros_like(grad_lse))


# -- compile failures on CUDA (the kernel is faked: only the adapter's handling is under test) -----------------


class _CudaCall(AttentionCall):
    """A call that reports a CUDA device, so the compiled-path error handling runs without a GPU."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0)


def _fake_kernel(monkeypatch, flex, error_text):
    """Replace the kernel launch: default tiles raise a compile error, any explicit kernel_options succeed."""
    from torch._dynamo.exc import TorchDynamoException

    launches = []

    def run_kernel(call, q, k, v, kernel_options):
        launches.append(kernel_options)
        if kernel_options is None:
            raise TorchDynamoException(error_text)
        return torch.zeros(1), torch.zeros(1)

    monkeypatch.setattr(flex, "_run_kernel", run_kernel)
    return launches


def test_shared_memory_overflow_retries_with_small_tiles_and_remembers(flex, monkeypatch):
    launches = _fake_kernel(monkeypatch, flex, "No valid triton configs. OutOfMemoryError: out of resource: x")
    q, k, v = make_qkv(1, 2, 2, 12, 20, 64, dtype=torch.bfloat16)
    call = _CudaCall(q, k, v, None, True, 0.125)
    flex._flex(call, q, k, v)
    flex._flex(call, q, k, v)
    assert launches == [None, flex_module.SMALL_TILES, flex_module.SMALL_TILES]


def test_other_compile_failures_raise_a_clear_error(flex, monkeypatch):
    _fake_kernel(monkeypatch, flex, "triton is not installed")
    q, k, v = make_qkv(1, 2, 2, 12, 20, 64, dtype=torch.bfloat16)
    with pytest.raises(cpattn.ProviderUnavailableError, match=r"torch.compile\(flex_attention\) failed.*native"):
        flex._flex(_CudaCall(q, k, v, None, True, 0.125), q, k, v)


def test_cuda_refuses_head_dims_below_16(flex):
    q, k, v = make_qkv(1, 2, 2, 12, 20, 8)
    reasons = flex.extra_reasons(_CudaCall(q, k, v, None, False, 0.3), flex.capabilities("cuda"))
    assert any("below 16" in r for r in reasons)
    q, k, v = make_qkv(1, 2, 2, 12, 20, 16)
    assert flex.extra_reasons(_CudaCall(q, k, v, None, False, 0.3), flex.capabilities("cuda")) == []
