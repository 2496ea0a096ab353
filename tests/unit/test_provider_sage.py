"""Sage providers against the float64 reference, through a CPU stand-in of `sageattention`.

The stand-in (tests/support/standins/sageattention_standin.py) computes exact float32 attention behind the library's
Python API, so these tests check the adapter's glue (calls, layouts, padding, LSE base and smoothing
correction, version probing), not SageAttention's INT8 kernels.
"""

from __future__ import annotations

import sys

import pytest
import torch

import cpattn
from cpattn.call import make_call
from cpattn.ops.merge import merge_two
from helpers import OUT_ATOL, assert_close, assert_lse_close, make_qkv, max_err
from standins import sageattention_standin as standin

V2_ONLY = (
    "_sage_qk_int8_pv_fp8_cuda",
    "_sage_qk_int8_pv_fp8_cuda_sm90",
    "_sage_qk_int8_pv_fp16_cuda",
    "_sage_qk_int8_pv_fp16_triton",
)
WITH_LSE = ("sage",) + V2_ONLY  # dense providers that return an LSE with sageattention 2.x
ALL_SAGE = ("sage", "sage_varlen") + V2_ONLY
ATOL = OUT_ATOL[torch.float32]  # the stand-in is exact float32 math


def _reset_probes() -> None:
    for name in ALL_SAGE:
        cpattn.get_provider(name)._availability = None


@pytest.fixture
def install_sage(monkeypatch):
    """Install a stand-in `sageattention` module; every probe is redone with it, and again afterwards."""

    def install(version: str = "2.2.0", **options):
        module = standin.build(version, **options)
        monkeypatch.setitem(sys.modules, "sageattention", module)
        _reset_probes()
        return module

    yield install
    _reset_probes()


def _qkv(b=2, hq=4, hkv=2, sq=8, sk=8, d=16, dtype=torch.float32, key_offset=2.0, seed=0):
    """Random q, k, v; keys get a common offset so that K smoothing shifts the LSE visibly."""
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=dtype, seed=seed)
    return q, (k.double() + key_offset).to(dtype), v


def _call(q, k, v, causal=False, mask=None, scale=None):
    return make_call(q, k, v, mask, 0.0, causal, scale, True)


def _true_lse(q, k, causal=False, scale=None):
    return cpattn.reference_attention(q, k, k, None, causal, scale)[1]


# -- forward through the contract -------------------------------------------------------------------


@pytest.mark.parametrize("corrects_lse", [True, False], ids=["library-corrects", "library-offset"])
@pytest.mark.parametrize("name", WITH_LSE)
def test_forward_out_and_lse_match_reference(install_sage, name, corrects_lse):
    install_sage(corrects_lse=corrects_lse)
    q, k, v = _qkv()
    out, lse = cpattn.get_provider(name).forward(_call(q, k, v, scale=0.3))
    ref_out, ref_lse = cpattn.reference_attention(q, k, v, scale=0.3)
    assert_close(out, ref_out, ATOL, f"{name} out")
    assert_lse_close(lse, ref_lse, ATOL, f"{name} lse")


@pytest.mark.parametrize("name", WITH_LSE)
def test_lse_is_logsumexp_of_the_true_scores_despite_k_smoothing(install_sage, name):
    module = install_sage(corrects_lse=False)
    q, k, v = _qkv(hq=2, hkv=2, key_offset=3.0)
    scale = 0.25
    true_lse = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * scale, dim=-1)
    # The scenario is real: the library's own LSE is off by scale * q . mean(K) here.
    _, raw_lse = module.sageattn_qk_int8_pv_fp16_triton(q, k, v, sm_scale=scale, return_lse=True)
    assert max_err(raw_lse, true_lse) > 0.5
    _, lse = cpattn.get_provider(name).forward(_call(q, k, v, scale=scale))
    assert_lse_close(lse, true_lse, ATOL, f"{name} lse")


@pytest.mark.parametrize("name", WITH_LSE)
def test_two_kv_shards_merge_to_the_full_result(install_sage, name):
    """The ring's use: each KV shard has its own mean K, so uncorrected LSEs would merge wrongly."""
    install_sage(corrects_lse=False)
    q, k, v = _qkv(sk=12)
    k = torch.cat([k[:, :, :6] - 2.0, k[:, :, 6:] + 2.0], dim=2)  # shards with very different key means
    provider = cpattn.get_provider(name)
    out_a, lse_a = provider.forward(_call(q, k[:, :, :6], v[:, :, :6]))
    out_b, lse_b = provider.forward(_call(q, k[:, :, 6:], v[:, :, 6:]))
    out, lse = merge_two(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = cpattn.reference_attention(q, k, v)
    assert_close(out, ref_out, ATOL, f"{name} merged out")
    assert_lse_close(lse, ref_lse, ATOL, f"{name} merged lse")


# -- the dispatcher -----------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ALL_SAGE)
def test_dispatch_matches_reference(install_sage, name, causal):
    install_sage()
    q, k, v = _qkv(d=24)
    with cpattn.attention_provider(name):
        out = cpattn.attention_dispatch(q, k, v, is_causal=causal, enable_gqa=True)
    assert_close(out, cpattn.reference_attention(q, k, v, None, causal)[0], ATOL, name)


@pytest.mark.parametrize(
    "name, version", [(n, "2.2.0") for n in ALL_SAGE] + [("sage", "1.0.6"), ("sage_varlen", "1.0.6")]
)
def test_heads_equal_seq_len_and_value_dim_differs(install_sage, name, version):
    """heads == seq_len catches a transposed layout; dv != d checks the head-dim padding and slicing
    (1.x takes only head dims 64/96/128, varlen 64/128: the adapter pads). Causal, since 1.0.6 refuses
    non-causal key lengths that are not multiples of 64."""
    install_sage(version)
    q, k, v = make_qkv(1, 6, 3, 6, 6, 16, dv=8, seed=3)
    with cpattn.attention_provider(name):
        out = cpattn.attention_dispatch(q, k, v, is_causal=True, enable_gqa=True)
    assert_close(out, cpattn.reference_attention(q, k, v, None, True)[0], ATOL, name)


@pytest.mark.parametrize("name", ["sage", "_sage_qk_int8_pv_fp16_cuda"])
def test_half_precision_inputs(install_sage, name):
    install_sage()
    q, k, v = _qkv(dtype=torch.float16)
    with cpattn.attention_provider(name):
        out = cpattn.attention_dispatch(q, k, v, is_causal=True, enable_gqa=True)
    assert out.dtype == torch.float16
    assert_close(out, cpattn.reference_attention(q, k, v, None, True)[0], OUT_ATOL[torch.float16], name)


def test_varlen_takes_key_padding_masks(install_sage):
    install_sage()
    q, k, v = _qkv(b=3, sk=10)
    keep = torch.tensor([[True] * 10, [True, False] * 5, [False] * 10])  # full, scattered, no key at all
    mask = keep[:, None, None, :]
    with cpattn.attention_provider("sage_varlen"):
        out = cpattn.attention_dispatch(q, k, v, attn_mask=mask, enable_gqa=True)
    ref = cpattn.reference_attention(q, k, v, mask)[0]
    assert_close(out, ref, ATOL, "sage_varlen")
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_dense_sage_refuses_masks_and_rectangular_causal(install_sage):
    install_sage()
    q, k, v = _qkv(sk=10)
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    with cpattn.attention_provider("sage"):
        with pytest.raises(cpattn.UnsupportedInputError, match="key-padding mask"):
            cpattn.attention_dispatch(q, k, v, attn_mask=mask, enable_gqa=True)
        with pytest.raises(cpattn.UnsupportedInputError, match="q_len == kv_len"):
            cpattn.attention_dispatch(q, k, v, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("name", ALL_SAGE)
def test_gradients_are_refused_naming_the_provider(install_sage, name):
    install_sage()
    q, k, v = make_qkv(1, 2, 2, 4, 4, 16, requires_grad=True)
    with cpattn.attention_provider(name):
        with pytest.raises(cpattn.UnsupportedInputError, match="no backward") as info:
            cpattn.attention_dispatch(q, k, v)
    assert f"provider '{name}'" in str(info.value)


# -- versions, missing pieces --------------------------------------------------------------------------


@pytest.mark.parametrize("name", V2_ONLY)
def test_sageattention_1x_leaves_2x_providers_with_a_precise_reason(install_sage, name):
    install_sage("1.0.6")
    provider = cpattn.get_provider(name)
    assert not provider.availability().ok
    assert "needs sageattention>=2.1.1 (found 1.0.6)" in provider.availability().reason
    q, k, v = _qkv()
    with cpattn.attention_provider(name):
        with pytest.raises(cpattn.UnsupportedInputError, match=r"needs sageattention>=2\.1\.1 \(found 1\.0\.6\)"):
            cpattn.attention_dispatch(q, k, v, enable_gqa=True)


@pytest.mark.parametrize("name", ["sage", "sage_varlen"])
def test_sageattention_1x_runs_without_touching_the_callers_key(install_sage, name):
    install_sage("1.0.6")
    q, k, v = _qkv(d=64)  # a head dim 1.x takes as is, so no padding copy shields the caller's key
    k_before = k.clone()
    with cpattn.attention_provider(name):
        out = cpattn.attention_dispatch(q, k, v, is_causal=True, enable_gqa=True)
    assert_close(out, cpattn.reference_attention(q, k_before, v, None, True)[0], ATOL, name)
    assert torch.equal(k, k_before), "sageattention 1.x smooths K in place; the adapter must hand it a copy"
    reasons = cpattn.get_provider(name).reasons(_call(q, k, v), need_lse=True)
    assert any("log-sum-exp" in r for r in reasons)


@pytest.mark.parametrize("name", ["sage", "sage_varlen"])
def test_sageattention_1_0_6_non_causal_needs_key_lengths_in_blocks_of_64(install_sage, name):
    """1.0.6 counts the zero padding of its last 64-key block in the softmax: refuse, do not return wrong numbers."""
    install_sage("1.0.6")
    q, k, v = _qkv(sk=70)
    with cpattn.attention_provider(name):
        with pytest.raises(cpattn.UnsupportedInputError, match="multiple of 64 \\(here 70\\)"):
            cpattn.attention_dispatch(q, k, v, enable_gqa=True)
        q, k, v = _qkv(sk=64)
        out = cpattn.attention_dispatch(q, k, v, enable_gqa=True)
    assert_close(out, cpattn.reference_attention(q, k, v)[0], ATOL, name)


def test_sageattention_1_0_6_key_padding_is_checked_on_every_call(install_sage):
    """The 64-key rule reads the key-padding mask's values, so dispatch must not serve a later call with a mask of
    the same shape from the runner it cached for the first (found by tests/unit/test_fuzz_standins.py)."""
    install_sage("1.0.6")
    q, k, v = _qkv(b=2, sk=128)
    keeps = torch.ones(2, 1, 1, 128, dtype=torch.bool)
    keeps[1, ..., 64:] = False  # 128 and 64 keys: both whole blocks
    with cpattn.attention_provider("sage_varlen"):
        out = cpattn.attention_dispatch(q, k, v, attn_mask=keeps, enable_gqa=True)
        assert_close(out, cpattn.reference_attention(q, k, v, keeps)[0], ATOL, "64-key blocks")
        uneven = keeps.clone()
        uneven[1, ..., 64] = True  # 65 keys, same shape
        with pytest.raises(cpattn.UnsupportedInputError, match="multiple of 64 \\(here 65\\)"):
            cpattn.attention_dispatch(q, k, v, attn_mask=uneven, enable_gqa=True)


@pytest.mark.parametrize("name", ["sage", "sage_varlen"])
@pytest.mark.parametrize("seq", [24, 64, 100, 192, 256])
def test_sageattention_1_0_6_causal_runs_whole_query_blocks(install_sage, name, seq):
    """1.0.6's causal kernels read a K scale past their tensor when a sequence's last 128-query block holds at
    most 64 rows (the stand-in makes those rows NaN): the adapter appends zero rows up to a whole block, which
    the causal mask hides, and drops them from the output."""
    install_sage("1.0.6")
    q, k, v = make_qkv(2, 4, 2, seq, seq, 64, seed=4)
    with cpattn.attention_provider(name):
        out = cpattn.attention_dispatch(q, k, v, is_causal=True, enable_gqa=True)
    assert out.shape == q.shape
    assert_close(out, cpattn.reference_attention(q, k, v, None, True)[0], ATOL, name)


def test_sageattention_1_0_6_varlen_checks_every_kept_length(install_sage):
    install_sage("1.0.6")
    q, k, v = _qkv(b=2, sk=128)
    keep = torch.ones(2, 128, dtype=torch.bool)
    keep[1, 100:] = False
    with cpattn.attention_provider("sage_varlen"):
        with pytest.raises(cpattn.UnsupportedInputError, match="here 100"):
            cpattn.attention_dispatch(q, k, v, attn_mask=keep[:, None, None, :], enable_gqa=True)
        keep[1, 64:] = False
        out = cpattn.attention_dispatch(q, k, v, attn_mask=keep[:, None, None, :], enable_gqa=True)
    assert_close(out, cpattn.reference_attention(q, k, v, keep[:, None, None, :])[0], ATOL, "sage_varlen")


def test_kernels_missing_from_the_build_are_named(install_sage):
    install_sage(kernels_built=("sm80",))
    assert cpattn.get_provider("_sage_qk_int8_pv_fp16_cuda").availability().ok
    unbuilt = {"_sage_qk_int8_pv_fp8_cuda": "SM89_ENABLED", "_sage_qk_int8_pv_fp8_cuda_sm90": "SM90_ENABLED"}
    for name, flag in unbuilt.items():
        avail = cpattn.get_provider(name).availability()
        assert not avail.ok and flag in avail.reason


def test_cpu_is_offered_only_by_a_declared_stand_in(install_sage):
    module = install_sage()
    del module.__cpattn_standin_devices__
    _reset_probes()
    q, k, v = _qkv()
    with cpattn.attention_provider("sage"):
        with pytest.raises(cpattn.UnsupportedInputError, match="runs on cuda only"):
            cpattn.attention_dispatch(q, k, v, enable_gqa=True)


@pytest.mark.parametrize("name", ALL_SAGE)
def test_without_the_library_the_error_names_the_package(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "sageattention", None)  # makes `import sageattention` fail
    _reset_probes()
    try:
        provider = cpattn.get_provider(name)
        assert not provider.availability().ok
        q, k, v = _qkv()
        with cpattn.attention_provider(name):
            with pytest.raises(cpattn.UnsupportedInputError, match=r"pip install 'sageattention>=2\.1\.1'"):
                cpattn.attention_dispatch(q, k, v, enable_gqa=True)
    finally:
        _reset_probes()
