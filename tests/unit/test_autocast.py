"""`attention_dispatch` under torch.autocast does what autocast does to F.scaled_dot_product_attention: float32
inputs (and a float mask) are cast to the autocast dtype, float64 is left alone, gradients reach the inputs in
their own dtype, and nothing inside cpattn runs under autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cpattn
from cpattn import attention_dispatch, attention_provider
from cpattn.contract import ContractAttentionFunction
from cpattn.cp.comm import CommStats
from cpattn.cp.layout import ring_positions
from cpattn.cp.mesh import Group
from cpattn.cp.ring import RingSpec, ring_attention
from cpattn.call import make_call
from cpattn.providers.native import NativeMath
from helpers import GRAD_ATOL, OUT_ATOL, assert_close, make_qkv
from loopback_ring import LoopbackRing

PROVIDERS = ("native", "_native_math", "_native_flash")
BF16 = torch.bfloat16


def _autocast():
    return torch.autocast("cpu", dtype=BF16)


def _sdpa_under_autocast(q, k, v, dout, **kwargs):
    q, k, v = (t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
    with _autocast():
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    out.backward(dout)
    return out, (q.grad, k.grad, v.grad)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", [(1, 8, 8, 8, 8, 16), (2, 6, 2, 9, 9, 32)], ids=["heads_eq_seq", "gqa"])
@pytest.mark.parametrize("causal", [False, True])
def test_float32_inputs_run_in_bf16_like_sdpa(provider, shape, causal):
    b, hq, hkv, sq, sk, d = shape
    for seed in range(2):  # the second call of a shape runs the cached runner
        q, k, v = make_qkv(b, hq, hkv, sq, sk, d, seed=seed, requires_grad=True)
        dout = torch.randn(b, hq, sq, d, dtype=BF16)
        with _autocast(), attention_provider(provider):
            out = attention_dispatch(q, k, v, is_causal=causal, enable_gqa=hq != hkv)
        out.backward(dout)
        ref_out, ref_grads = _sdpa_under_autocast(q, k, v, dout, is_causal=causal, enable_gqa=hq != hkv)
        assert out.dtype == ref_out.dtype == BF16
        assert_close(out, ref_out, OUT_ATOL[BF16], f"out, seed {seed}")
        for name, t, g in zip("qkv", (q, k, v), ref_grads):
            assert t.grad.dtype == torch.float32, f"d{name} reached the input as {t.grad.dtype}"
            assert_close(t.grad, g, GRAD_ATOL[BF16], f"d{name}, seed {seed}")


def test_mixed_input_dtypes_are_cast_together():
    """q/k in float32 (say after a float32 norm) and v in bf16: SDPA takes them under autocast, and so does
    dispatch (outside autocast both refuse them)."""
    q, k, v = make_qkv(1, 4, 4, 7, 7, 16)
    v = v.to(BF16)
    with _autocast(), attention_provider("native"):
        out = attention_dispatch(q, k, v)
        ref = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == BF16
    assert_close(out, ref, OUT_ATOL[BF16], "out")
    with attention_provider("native"), pytest.raises(cpattn.InvalidArgumentError, match="share one dtype"):
        attention_dispatch(q, k, v)


def test_float_mask_is_cast_and_bool_mask_kept():
    q, k, v = make_qkv(2, 4, 4, 6, 9, 16)
    additive = torch.randn(2, 1, 6, 9)
    keep = torch.rand(2, 1, 6, 9) > 0.3
    keep[..., 0] = True
    for mask in (additive, keep):
        with _autocast(), attention_provider("_native_math"):
            out = attention_dispatch(q, k, v, attn_mask=mask)
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert out.dtype == ref.dtype == BF16
        assert_close(out, ref, OUT_ATOL[BF16], f"out, {mask.dtype} mask")


def test_float64_is_left_alone():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 8, dtype=torch.float64)
    with _autocast(), attention_provider("native"):
        out = attention_dispatch(q, k, v, is_causal=True)
    assert out.dtype == torch.float64
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), OUT_ATOL[torch.float64], "out")


def test_providers_run_with_autocast_off(monkeypatch):
    """Inside cpattn autocast is off for the inputs' device type (merges and float64 references keep their
    precision), as under torch.amp.custom_fwd(cast_inputs=...); it is back on after the call."""
    provider = cpattn.get_provider("_native_math")
    seen = []
    original = type(provider).attention

    def attention(self, call):
        seen.append((torch.is_autocast_enabled("cpu"), call.dtype))
        return original(self, call)
    monkeypatch.setattr(type(provider), "attention", attention)
    q, k, v = make_qkv(1, 2, 2, 5, 5, 8)
    with _autocast(), attention_provider("_native_math"):
        attention_dispatch(q, k, v, scale=0.123)  # a fresh cache key: the provider's attention runs
        assert torch.is_autocast_enabled("cpu")
    assert seen == [(False, BF16)]


def test_compiled_call_under_autocast_matches_eager():
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16, requires_grad=True)

    def attend(q, k, v):
        return attention_dispatch(q, k, v, is_causal=True, enable_gqa=True)
    with attention_provider("native"):
        with _autocast():
            eager = attend(q, k, v)
            compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)(q, k, v)
    assert compiled.dtype == eager.dtype == BF16
    assert_close(compiled, eager, OUT_ATOL[BF16], "compiled out")


class _RecordsAutocast(NativeMath):
    """_native_math recording whether autocast was on in each contract backward call."""

    def __init__(self):
        super().__init__()
        self.autocast_in_backward = []

    def backward(self, call, dout, out, lse):
        self.autocast_in_backward.append(torch.is_autocast_enabled("cpu"))
        return super().backward(call, dout, out, lse)


def test_backward_called_inside_autocast_runs_with_it_off():
    """`loss.backward()` inside an autocast block (on CPU it runs in the caller's thread, autocast on): the
    contract backward and the ring backward still run their float32 arithmetic with autocast off."""
    provider = _RecordsAutocast()
    q, k, v = make_qkv(1, 3, 3, 12, 12, 8, requires_grad=True)
    call = make_call(q.to(BF16), k.to(BF16), v.to(BF16), None, 0.0, True, None, False)
    with _autocast():
        out = ContractAttentionFunction.apply(provider, call, *(t.to(BF16) for t in (q, k, v)))
        out.float().sum().backward()
    world, total = 2, 12
    pos = [ring_positions(total, world, r, "zigzag") for r in range(world)]
    blocks = [(k.detach()[:, :, p].to(BF16), v.detach()[:, :, p].to(BF16)) for p in pos]
    lq = q.detach()[:, :, pos[0]].to(BF16).requires_grad_()
    spec = RingSpec(Group(None, 0, world, "loopback"), "zigzag", total, 60.0, CommStats(),
                    channel_factory=LoopbackRing(blocks, 0))
    with _autocast():
        ring_call = make_call(lq, *(t.requires_grad_() for t in blocks[0]), None, 0.0, True, None, False)
        ring_out = ring_attention(provider, ring_call, spec)
        ring_out.float().sum().backward()
    assert provider.autocast_in_backward and not any(provider.autocast_in_backward), provider.autocast_in_backward
    assert len(provider.autocast_in_backward) == 1 + world  # one contract call, then one per ring step
