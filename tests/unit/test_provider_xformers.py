"""The xformers provider against the float64 reference, through a CPU stand-in of `xformers`.

The stand-in (tests/support/standins/xformers_standin.py) computes exact float32 attention behind xformers' Python
API, so these tests check the adapter's glue (layouts, GQA, bias construction and alignment, LSE padding,
backward with an external (out, lse), availability probing), not xformers' CUDA kernels.
"""

from __future__ import annotations

import sys

import pytest
import torch

import cpattn
from cpattn.call import make_call
from helpers import OUT_ATOL, assert_close, assert_lse_close, make_qkv, random_bool_mask, reference_with_grads
from standins import xformers_standin as standin

ATOL = OUT_ATOL[torch.float32]  # the stand-in is exact float32 math
GRAD_ATOL = 1e-4


def _provider():
    return cpattn.get_provider("xformers")


@pytest.fixture
def install_xformers(monkeypatch):
    """Install stand-in `xformers` modules; the probe is redone with them, and again afterwards."""

    def install(version: str = "0.0.35", **options):
        modules = standin.build(version, **options)
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        _provider()._availability = None
        return modules

    yield install
    _provider()._availability = None


def _call(q, k, v, mask=None, causal=False, scale=None):
    return make_call(q, k, v, mask, 0.0, causal, scale, True)


def _masks(b, sq, sk):
    """Each kind of mask the adapter turns into a bias; the bool one hides every key of query row 1."""
    return {
        "none": None,
        "bool": random_bool_mask((b, 1, sq, sk), seed=1, empty_row=1),
        "additive": torch.randn(1, 4, sq, sk, generator=torch.Generator().manual_seed(2)),
        "key_padding": torch.arange(sk).expand(b, 1, 1, sk) < torch.tensor([sk, sk - 4]).view(b, 1, 1, 1),
    }


# -- forward through the contract and the dispatcher ---------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "key_padding"])
def test_forward_out_and_lse_match_reference(install_xformers, mask_kind, causal):
    install_xformers()
    q, k, v = make_qkv(2, 4, 2, 9, 13, 16)  # Sk = 13: bias rows need aligned storage; Sq = 9: lse is padded
    mask = _masks(2, 9, 13)[mask_kind]
    out, lse = _provider().forward(_call(q, k, v, mask, causal, scale=0.4))
    ref_out, ref_lse = cpattn.reference_attention(q, k, v, mask, causal, 0.4)
    assert_close(out, ref_out, ATOL, f"{mask_kind} out")
    assert_lse_close(lse, ref_lse, ATOL, f"{mask_kind} lse")


@pytest.mark.parametrize("causal", [False, True])
def test_dispatch_with_gradients_matches_reference(install_xformers, causal):
    install_xformers()
    q, k, v = make_qkv(2, 4, 2, 8, 8, 16, requires_grad=True)
    dout = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(5))
    with cpattn.attention_provider("xformers"):
        out = cpattn.attention_dispatch(q, k, v, is_causal=causal, enable_gqa=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_out, _, ref_grads = reference_with_grads(q, k, v, dout, causal=causal)
    assert_close(out, ref_out, ATOL, "out")
    for name, g, ref in zip("qkv", grads, ref_grads):
        assert_close(g, ref, GRAD_ATOL, f"d{name}")


def test_heads_equal_seq_len_with_gqa_and_a_mask(install_xformers):
    """heads == seq_len: a (B, H, S, D) vs (B, M, H, K) mix-up would still run, with wrong numbers."""
    install_xformers()
    q, k, v = make_qkv(2, 6, 3, 6, 6, 8, dv=16, seed=4)
    mask = random_bool_mask((2, 6, 6, 6), seed=4)
    with cpattn.attention_provider("xformers"):
        out = cpattn.attention_dispatch(q, k, v, attn_mask=mask, enable_gqa=True)
    assert_close(out, cpattn.reference_attention(q, k, v, mask)[0], ATOL, "out")


# -- backward with an external (out, lse), as ring backward uses it -------------------------------------


@pytest.mark.parametrize("mask_kind", ["none", "bool", "key_padding"])
def test_backward_with_global_out_and_lse_matches_reference(install_xformers, mask_kind):
    install_xformers()
    q, k, v = make_qkv(2, 4, 2, 9, 13, 16, seed=6)
    mask = _masks(2, 9, 13)[mask_kind]
    dout = torch.randn(2, 4, 9, 16, generator=torch.Generator().manual_seed(7))
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, dout, mask=mask)
    grads = _provider().backward(_call(q, k, v, mask), dout, ref_out.float(), ref_lse.float())
    for name, g, ref in zip("qkv", grads, ref_grads):
        assert_close(g, ref, GRAD_ATOL, f"d{name}")


def test_backward_of_kv_shards_adds_up_to_the_full_gradient(install_xformers):
    install_xformers()
    q, k, v = make_qkv(1, 4, 2, 8, 12, 16, seed=8)
    dout = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(9))
    ref_out, ref_lse, (ref_dq, ref_dk, ref_dv) = reference_with_grads(q, k, v, dout, causal=False)
    shards = [slice(0, 5), slice(5, 12)]
    parts = [
        _provider().backward(_call(q, k[:, :, s], v[:, :, s]), dout, ref_out.float(), ref_lse.float())
        for s in shards
    ]
    assert_close(sum(p[0] for p in parts), ref_dq, GRAD_ATOL, "dq")
    assert_close(torch.cat([p[1] for p in parts], dim=2), ref_dk, GRAD_ATOL, "dk")
    assert_close(torch.cat([p[2] for p in parts], dim=2), ref_dv, GRAD_ATOL, "dv")


# -- availability -------------------------------------------------------------------------------------


def test_extension_built_for_another_torch_is_reported(install_xformers):
    install_xformers(extension_built_for_torch="2.10.0+cu128")
    avail = _provider().availability()
    assert not avail.ok
    assert "xformers C++/CUDA extension did not load" in avail.reason
    assert "built for torch 2.10.0+cu128" in avail.reason
    assert f"install an xformers build matching torch {torch.__version__}" in avail.reason
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    with cpattn.attention_provider("xformers"):
        with pytest.raises(cpattn.UnsupportedInputError, match="extension did not load"):
            cpattn.attention_dispatch(q, k, v)


def test_too_old_xformers_is_reported(install_xformers):
    install_xformers("0.0.28.post1")
    avail = _provider().availability()
    assert not avail.ok and "needs xformers>=0.0.29.post3 (found 0.0.28.post1)" in avail.reason


def test_cpu_is_offered_only_by_a_declared_stand_in(install_xformers):
    modules = install_xformers()
    del modules["xformers"].__cpattn_standin_devices__
    _provider()._availability = None
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    with cpattn.attention_provider("xformers"):
        with pytest.raises(cpattn.UnsupportedInputError, match="runs on cuda only"):
            cpattn.attention_dispatch(q, k, v)


def test_without_the_library_the_error_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers` fail
    _provider()._availability = None
    try:
        assert not _provider().availability().ok
        q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
        with cpattn.attention_provider("xformers"):
            with pytest.raises(cpattn.UnsupportedInputError, match=r"pip install 'xformers>=0\.0\.29\.post3'"):
                cpattn.attention_dispatch(q, k, v)
    finally:
        _provider()._availability = None


def test_rows_that_see_no_key_get_zero_output_and_zero_gradients(install_xformers):
    """Single-device path with autograd: the stand-in's own backward makes NaN dQ/dK on a row that sees no key
    (exp(s - lse) with both -inf), as kernels may; the adapter opens such rows for the kernel and zeroes them."""
    install_xformers()
    q, k, v = make_qkv(2, 2, 2, 5, 6, 8, requires_grad=True)
    mask = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    mask[:, :, 1] = False  # row 1 sees no key
    mask[0, :, 3, 4:] = False
    with cpattn.attention_provider("xformers"):
        out = cpattn.attention_dispatch(q, k, v, attn_mask=mask)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_out, _, ref_grads = reference_with_grads(q, k, v, dout, mask)
    assert_close(out, ref_out, ATOL, "out")
    assert (out[:, :, 1] == 0).all()
    for got, want, name in zip((q.grad, k.grad, v.grad), ref_grads, "qkv"):
        assert_close(got, want, GRAD_ATOL, f"d{name}")
