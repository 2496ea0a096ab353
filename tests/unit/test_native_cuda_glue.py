"""The CUDA-only native adapters' Python glue, run on CPU with the aten kernels replaced by recorders.

The kernels themselves are checked on a GPU by benchmarks/gpu_check.py; this catches Python errors in the
paths CI never executes otherwise (argument order, helper calls, contiguity of what reaches the kernel).
"""

import pytest
import torch

import cpattn
from cpattn.call import make_call
from helpers import make_qkv


class _Recorder:
    def __init__(self, result):
        self.calls, self.result = [], result
        self.default = self  # adapters call the `.default` overload

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result(*args)


@pytest.fixture
def fake_efficient(monkeypatch):
    import cpattn.providers.native as native

    def fwd(q, k, v, bias, lse_flag, dropout, causal):
        b, h, s, _ = q.shape
        return torch.zeros(b, h, s, v.shape[-1]), torch.zeros(b, h, s), torch.zeros(()), torch.zeros(())

    def bwd(dout, q, k, v, *rest):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None

    class FakeAten:
        _scaled_dot_product_efficient_attention = _Recorder(fwd)
        _scaled_dot_product_efficient_attention_backward = _Recorder(bwd)

    monkeypatch.setattr(native, "aten", FakeAten)
    return FakeAten


def test_efficient_forward_and_backward_glue_hands_dense_kv(fake_efficient):
    adapter = cpattn.get_provider("_native_efficient")
    q, k, v = make_qkv(1, 2, 2, 8, 12, 8)  # no GQA: expanding KV heads would make a dense copy anyway
    k_view, v_view = k[:, :, 2:10], v[:, :, 2:10]  # a ring's column slice: a strided view
    call = make_call(q, k_view, v_view, None, 0.0, False, None, False)
    out, lse = adapter.forward(call)
    assert out.shape == (1, 2, 8, 8) and lse.dtype == torch.float32
    grads = adapter.backward(call, torch.zeros_like(out), out, lse)
    assert grads[1].shape == (1, 2, 8, 8)
    for recorder in (fake_efficient._scaled_dot_product_efficient_attention,
                     fake_efficient._scaled_dot_product_efficient_attention_backward):
        args, _ = recorder.calls[-1]
        kernel_k = args[2] if recorder is fake_efficient._scaled_dot_product_efficient_attention_backward else args[1]
        assert kernel_k.is_contiguous(), "the CUTLASS kernel must get dense K/V"


def test_efficient_backward_gets_out_stored_sequence_major(fake_efficient):
    """The CUTLASS backward derives out's sequence stride as H*D; a ring's merged out is stored (B, H, S, D)."""
    adapter = cpattn.get_provider("_native_efficient")
    q, k, v = make_qkv(1, 3, 3, 8, 8, 8)  # H != S != D: a wrong stride cannot pass by coincidence
    call = make_call(q, k, v, None, 0.0, False, None, False)
    merged = torch.randn(1, 3, 8, 8)  # (B, H, S, D) storage, as the ring's float32 merge cast back produces
    adapter.backward(call, torch.zeros_like(merged), merged, torch.zeros(1, 3, 8))
    kernel_out = fake_efficient._scaled_dot_product_efficient_attention_backward.calls[-1][0][5]
    assert kernel_out.transpose(1, 2).is_contiguous() and kernel_out.stride(2) == 3 * 8
    assert torch.equal(kernel_out, merged)
    kernel_own = torch.randn(1, 8, 3, 8).transpose(1, 2)  # the forward's own output: passed through, no copy
    adapter.backward(call, torch.zeros_like(merged), kernel_own, torch.zeros(1, 3, 8))
    assert fake_efficient._scaled_dot_product_efficient_attention_backward.calls[-1][0][5] is kernel_own


@pytest.mark.parametrize("q_len, kv_len, refused", [(30, 1739, True), (1930, 990, True), (64, 64, False)])
def test_native_flash_refuses_unequal_causal_lengths_off_cpu(q_len, kv_len, refused):
    """PyTorch's CUDA flash kernel aligns is_causal to the bottom-right corner, SDPA's is_causal is top-left: with
    q_len != kv_len its outputs were off by up to 3.7 on an H100 (these lengths were two of the failing draws).
    The reason is given for any device but the CPU, whose kernel aligns top-left (meta tensors stand for CUDA)."""
    adapter = cpattn.get_provider("_native_flash")
    q, k, v = (torch.empty(2, 2, n, 32, device="meta", dtype=torch.bfloat16) for n in (q_len, kv_len, kv_len))
    reasons = adapter.extra_reasons(make_call(q, k, v, None, 0.0, True, None, False), adapter.capabilities("cuda"))
    assert any("bottom-right" in r and "_native_efficient" in r for r in reasons) == refused
    assert not adapter.extra_reasons(make_call(q, k, v, None, 0.0, False, None, False), adapter.capabilities("cuda"))
    cpu = [t.new_empty(t.shape, device="cpu") for t in (q, k, v)]  # the CPU kernel takes it
    assert not adapter.reasons(make_call(*cpu, None, 0.0, True, None, False))


class _CudnnLike:
    """torch.ops.aten with the cuDNN forward and backward replaced: the backward raises cuDNN's own error for
    s_q = s_kv = 1, as cuDNN 9.19 did on an H100."""

    def __init__(self):
        def fwd(q, k, v, bias, lse_flag, *rest, **kwargs):
            b, h, s, _ = q.shape
            return torch.zeros(b, h, s, v.shape[-1]), torch.zeros(b, h, s, 1), None, None, 0, 0, None, None, None

        def bwd(dout, q, k, v, *rest, **kwargs):
            if q.shape[2] == 1 and k.shape[2] == 1:
                raise RuntimeError("cuDNN Frontend error: s_q = s_kv = 1 is not supported.")
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        self._scaled_dot_product_cudnn_attention = _Recorder(fwd)
        self._scaled_dot_product_cudnn_attention_backward = _Recorder(bwd)

    def __getattr__(self, name):
        return getattr(torch.ops.aten, name)


def test_cudnn_one_by_one_with_gradients_takes_the_math_path(monkeypatch):
    import cpattn.providers.native as native

    fake = _CudnnLike()
    monkeypatch.setattr(native, "aten", fake)
    adapter = cpattn.get_provider("_native_cudnn")
    q, k, v = make_qkv(2, 4, 4, 1, 1, 8, requires_grad=True)
    call = make_call(q, k, v, None, 0.0, True, None, False)
    out = adapter.attention(call)  # single device, with autograd
    dout = torch.randn_like(out)
    out.backward(dout)
    assert not fake._scaled_dot_product_cudnn_attention.calls, "1 x 1 with gradients must not reach cuDNN"
    torch.testing.assert_close(out, v.detach())  # one key: the output is its value
    torch.testing.assert_close(v.grad, dout)
    # the contract's backward (a ring's 1 x 1 block) too, with an external (out, lse)
    lse = torch.zeros(2, 4, 1)
    dq, dk, dv = adapter.backward(call, dout, out.detach(), lse + (q * k).sum(-1).detach() * call.scale)
    torch.testing.assert_close(dv, dout)
    assert not fake._scaled_dot_product_cudnn_attention_backward.calls
    longer = make_call(*make_qkv(1, 2, 2, 2, 2, 8), None, 0.0, True, None, False)
    adapter.backward(longer, torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2))
    assert fake._scaled_dot_product_cudnn_attention_backward.calls, "other shapes keep cuDNN's backward"
