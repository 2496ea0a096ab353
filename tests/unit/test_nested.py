"""Jagged nested tensors (torch.nested, layout=torch.jagged): provider 'native' takes them as SDPA does; every
other provider and context parallelism refuse them with an error that says what to use instead."""

from __future__ import annotations

import warnings

import pytest
import torch

import cpattn
from cpattn import attention_dispatch, attention_provider
from cpattn.call import make_call
from helpers import GRAD_ATOL, OUT_ATOL, assert_close

LENGTHS = (5, 7)
HEADS, HEAD_DIM = 4, 8


OFFSETS = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])


def _jagged(seed: int, requires_grad: bool = False):
    """A (B, j, H, D) jagged tensor over shared offsets (as q, k and v projected from one batch are) and the dense
    (L, H, D) sequences it holds."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(sum(LENGTHS), HEADS, HEAD_DIM, generator=gen).requires_grad_(requires_grad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nested = torch.nested.nested_tensor_from_jagged(values, OFFSETS)
    return nested, values.detach().split(list(LENGTHS))


def test_native_takes_jagged_tensors_forward_and_backward():
    (q, q_seqs), (k, k_seqs), (v, v_seqs) = (_jagged(seed, requires_grad=True) for seed in (1, 2, 3))
    with attention_provider("native"):
        out = attention_dispatch(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # SDPA: no causal here
    assert out.is_nested
    outs = out.transpose(1, 2).unbind()
    for i, (qs, ks, vs) in enumerate(zip(q_seqs, k_seqs, v_seqs)):  # each sequence on its own, in float64
        qd, kd, vd = (t.double().transpose(0, 1).requires_grad_() for t in (qs, ks, vs))
        ref = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd)
        assert_close(outs[i].transpose(0, 1), ref, OUT_ATOL[torch.float32], f"out of sequence {i}")
    grads = torch.autograd.grad(sum(o.sum() for o in outs), (q, k, v))
    for i in range(len(LENGTHS)):
        qd, kd, vd = (t[i].double().transpose(0, 1).requires_grad_() for t in (q_seqs, k_seqs, v_seqs))
        ref = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd)
        ref_grads = torch.autograd.grad(ref.sum(), (qd, kd, vd))
        for name, g, r in zip("qkv", grads, ref_grads):
            assert_close(g.unbind()[i].transpose(0, 1), r, GRAD_ATOL[torch.float32], f"d{name} of sequence {i}")


@pytest.mark.parametrize("provider", ["_native_math", "_native_flash", "flex", "auto"])
def test_other_providers_refuse_them_and_name_native(provider):
    q, k, v = (_jagged(seed)[0].transpose(1, 2) for seed in (1, 2, 3))
    with attention_provider(provider), pytest.raises(cpattn.UnsupportedInputError) as err:
        attention_dispatch(q, k, v)
    assert f"provider '{provider}'" in str(err.value)
    assert "Use instead: provider 'native'" in str(err.value)
    if provider != "auto":
        assert "nested (jagged) tensors are not supported" in str(err.value)


def test_context_parallelism_refuses_them_before_any_collective():
    """The CP path checks its shards with make_call(sharded=True) on each rank before the schedule runs."""
    q, k, v = (_jagged(seed)[0].transpose(1, 2) for seed in (1, 2, 3))
    with pytest.raises(cpattn.InvalidArgumentError, match="nested .* cannot be sharded.*flash_varlen_attention"):
        make_call(q, k, v, None, 0.0, True, None, False, sharded=True)
