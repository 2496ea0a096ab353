"""`flash` and `flash_varlen` against a CPU stand-in of FlashAttention-2/3/4 (tests/support/standins).

The stand-in mimics the libraries' API (names, signatures, layouts, LSE conventions), so these tests check the
adapter's glue: probing, layout changes, LSE normalisation, key unpadding, the packed API and its checks. They
say nothing about the real CUDA kernels.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cpattn
from cpattn import ProviderUnavailableError, UnsupportedInputError, attention_dispatch, attention_provider
from cpattn.call import make_call
from cpattn.errors import InvalidArgumentError
from cpattn.providers import PROVIDERS
from cpattn.packed import flash_varlen_attention
from cpattn.providers.flash import PaddedBatch
from cpattn.reference import reference_attention
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
from standins import flash_attn_standin as standin

FLASH, VARLEN = PROVIDERS["flash"], PROVIDERS["flash_varlen"]
BF16 = torch.bfloat16
LSE_ATOL = 1e-3

GENERATIONS = {
    "fa2": lambda **kw: standin.fa2_modules(**kw),  # >= 2.7: private functions are torch custom ops
    "fa2-2.6": lambda **kw: standin.fa2_modules("2.6.3", **kw),  # window_size pairs, 8-value returns
    "fa3": lambda **kw: standin.fa3_modules(**kw),
    "fa4": lambda **kw: standin.fa4_modules(**kw),
}
BACKWARD_NAME = {"fa2": "_flash_attn_backward", "fa2-2.6": "_flash_attn_backward", "fa3": "_flash_attn_backward",
                 "fa4": "_flash_attn_bwd"}
FORWARD_NAME = {"fa2": "_flash_attn_forward", "fa2-2.6": "_flash_attn_forward", "fa3": "_flash_attn_forward",
                "fa4": "_flash_attn_fwd"}
VARLEN_FORWARD_NAME = {**FORWARD_NAME, "fa2": "_flash_attn_varlen_forward", "fa2-2.6": "_flash_attn_varlen_forward"}


def install(monkeypatch, modules: dict) -> None:
    """Put stand-in modules in sys.modules, block every other FlashAttention module name (so no real install
    is picked up), and make both providers probe again."""
    for name in standin.MODULE_NAMES:
        monkeypatch.setitem(sys.modules, name, modules.get(name))
    for provider in (FLASH, VARLEN):
        monkeypatch.setattr(provider, "_availability", None)
        monkeypatch.setattr(provider, "_generation", None)


@pytest.fixture(params=list(GENERATIONS))
def generation(request, monkeypatch) -> str:
    install(monkeypatch, GENERATIONS[request.param]())
    return request.param


@pytest.fixture
def fa2(monkeypatch) -> None:
    install(monkeypatch, standin.fa2_modules())


def random_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)


def assert_grads_close(grads, ref_grads, dtype):
    for got, want, name in zip(grads, ref_grads, ("dq", "dk", "dv")):
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}"
        assert_close(got, want, GRAD_ATOL[dtype], name)


# -- probing --------------------------------------------------------------------------------------------------------


def test_probe_records_generation_and_version(generation):
    expected = {"fa2": "flash-attn-2 2.7.4.post1", "fa2-2.6": "flash-attn-2 2.6.3", "fa3": "flash-attn-3 ",
                "fa4": "flash-attn-4 4.0.0b36"}[generation]
    for provider in (FLASH, VARLEN):
        availability = provider.availability()
        assert availability.ok, availability.reason
        assert availability.version.startswith(expected), availability.version


def test_import_cpattn_does_not_import_flash_attn():
    code = "import sys, cpattn; assert not any(m.startswith('flash_attn') for m in sys.modules), sorted(sys.modules)"
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert result.returncode == 0, result.stderr


def test_missing_library_names_the_package_to_install(monkeypatch):
    install(monkeypatch, {})  # every FlashAttention module name blocked
    availability = FLASH.availability()
    assert not availability.ok
    assert "pip install 'flash-attn>=2.6.3'" in availability.reason
    assert "pip install flash-attn-4" in availability.reason
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, dtype=BF16)
    with attention_provider("flash"), pytest.raises(UnsupportedInputError) as info:
        attention_dispatch(q, k, v)
    assert "flash-attn>=2.6.3" in str(info.value)
    with pytest.raises(ProviderUnavailableError, match="flash-attn>=2.6.3"):
        FLASH.require_available()
    cu = torch.tensor([0, 4], dtype=torch.int32)
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]
    with pytest.raises(ProviderUnavailableError, match="flash-attn"):
        flash_varlen_attention(*packed, cu, cu, 4, 4)


def test_renamed_private_parameter_makes_the_generation_unavailable(monkeypatch):
    install(monkeypatch, standin.fa4_modules(rename={"_flash_attn_bwd": {"lse": "softmax_lse"}}))
    availability = FLASH.availability()
    assert not availability.ok
    assert "FlashAttention-4" in availability.reason
    assert "flash_attn.cute.interface._flash_attn_bwd has no parameter 'lse'" in availability.reason
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, dtype=BF16)
    with attention_provider("flash"), pytest.raises(UnsupportedInputError, match="_flash_attn_bwd"):
        attention_dispatch(q, k, v)


def test_renamed_varlen_parameter_breaks_only_flash_varlen(monkeypatch):
    rename = {"_flash_attn_varlen_forward": {"cu_seqlens_k": "cu_seqlens_kv"}}
    install(monkeypatch, standin.fa2_modules("2.6.3", rename=rename))
    assert FLASH.availability().ok
    availability = VARLEN.availability()
    assert not availability.ok
    assert "FlashAttention-2" in availability.reason
    assert "_flash_attn_varlen_forward has no parameter 'cu_seqlens_k'" in availability.reason


def test_new_required_parameter_is_reported(monkeypatch):
    install(monkeypatch, standin.fa2_modules(custom_ops=False, add_required={"_flash_attn_forward": ["sink"]}))
    availability = FLASH.availability()
    assert not availability.ok
    assert "_flash_attn_forward has a new required parameter 'sink'" in availability.reason


def test_too_old_flash_attn_2_is_refused(monkeypatch):
    install(monkeypatch, standin.fa2_modules("2.5.9"))
    availability = FLASH.availability()
    assert not availability.ok
    assert "flash-attn 2.5.9 is older than 2.6.3" in availability.reason


def test_broken_preferred_generation_falls_back_with_a_warning(monkeypatch):
    # Without CUDA the order is FA3, FA4, FA2: a changed FA3 API must not hide a working FA2.
    broken_fa3 = standin.fa3_modules(rename={"_flash_attn_backward": {"softmax_lse": "lse"}})
    install(monkeypatch, {**standin.fa2_modules(), **broken_fa3})
    with pytest.warns(RuntimeWarning, match="_flash_attn_backward has no parameter 'softmax_lse'"):
        availability = FLASH.availability()
    assert availability.ok and availability.version.startswith("flash-attn-2")


class _BrokenFlashAttention3:
    """A meta-path finder that fails the way a build against another torch does."""

    def find_spec(self, name, path, target=None):
        if name == "flash_attn_interface":
            raise ImportError("flash_attn_3/_C.abi3.so: undefined symbol: _ZN3c104cuda9SetDevice")
        return None


def test_installed_but_broken_generation_is_reported_not_called_missing(monkeypatch):
    install(monkeypatch, standin.fa2_modules())
    monkeypatch.delitem(sys.modules, "flash_attn_interface")
    monkeypatch.setattr(sys, "meta_path", [_BrokenFlashAttention3(), *sys.meta_path])
    with pytest.warns(RuntimeWarning, match="importing flash_attn_interface failed .*undefined symbol"):
        availability = FLASH.availability()
    assert availability.ok and availability.version.startswith("flash-attn-2")


# -- capabilities ---------------------------------------------------------------------------------------------------


def test_capabilities_follow_the_generation(generation):
    caps, varlen_caps = FLASH.capabilities("cuda"), VARLEN.capabilities("cuda")
    assert caps.dtypes == {torch.float16, torch.bfloat16}
    assert caps.max_head_dim == 256
    assert caps.min_compute_capability == ((8, 0) if generation.startswith("fa2") else (9, 0))
    assert caps.dropout == generation.startswith("fa2")
    assert caps.backward and caps.training and caps.returns_lse and caps.gqa and caps.causal
    assert not caps.deterministic_backward
    assert not (caps.key_padding_mask or caps.bool_mask or caps.additive_mask or caps.varlen)
    assert varlen_caps.key_padding_mask and varlen_caps.varlen and not varlen_caps.bool_mask
    assert FLASH.capabilities("cpu") is not None  # only because the stand-in declares cpu


def test_cpu_is_accepted_only_from_a_declared_stand_in(monkeypatch):
    install(monkeypatch, standin.fa2_modules(standin_devices=()))
    assert FLASH.availability().ok
    assert FLASH.capabilities("cpu") is None
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, dtype=BF16)
    with attention_provider("flash"), pytest.raises(UnsupportedInputError, match="runs on cuda only"):
        attention_dispatch(q, k, v)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dtype=torch.float32), "dtype float32 is not supported"),
        (dict(d=264), "head dim 264 exceeds its maximum 256"),
        (dict(dv=16), "value head dim 16 != query head dim 8"),
        (dict(sk=6, causal=True), "bottom-right"),
    ],
)
def test_refusals_name_the_limit(generation, kwargs, message):
    kwargs = dict(kwargs)  # parametrize shares the dict between generations
    causal = kwargs.pop("causal", False)
    shape = dict(b=1, hq=2, hkv=2, sq=4, sk=4, d=8)
    shape.update({key: kwargs.pop(key) for key in list(kwargs) if key in shape})
    q, k, v = make_qkv(*shape.values(), dtype=kwargs.get("dtype", BF16), dv=kwargs.get("dv"))
    with attention_provider("flash"), pytest.raises(UnsupportedInputError, match=message):
        attention_dispatch(q, k, v, is_causal=causal)


def test_dropout_only_where_the_generation_has_it(generation):
    q, k, v = make_qkv(2, 4, 2, 8, 8, 16, dtype=torch.float16, requires_grad=True)
    if not generation.startswith("fa2"):
        with attention_provider("flash"), pytest.raises(UnsupportedInputError, match="dropout_p=0.5"):
            attention_dispatch(q, k, v, dropout_p=0.5, enable_gqa=True)
        return
    torch.manual_seed(0)
    with attention_provider("flash"):
        out = attention_dispatch(q, k, v, dropout_p=0.5, enable_gqa=True)
    assert max_err(out, cpattn.reference_attention(q, k, v)[0]) > 0.1, "dropout changed nothing"
    dout = random_like(out, 1)
    out.backward(dout)
    # out is linear in v for a fixed dropout mask: <out, dout> == <v, dv> only if backward reused the mask.
    forward_side = (out.double() * dout.double()).sum().item()
    backward_side = (v.double() * v.grad.double()).sum().item()
    assert abs(forward_side - backward_side) < 0.02 * (1 + abs(forward_side)), (forward_side, backward_side)


# -- flash: contract and dispatch -----------------------------------------------------------------------------------

SHAPES = [
    pytest.param((2, 6, 2, 12, 12, 12), id="gqa-head-dim-12"),
    pytest.param((1, 8, 2, 8, 8, 16), id="heads-eq-seq-len"),
    pytest.param((2, 4, 1, 5, 9, 8), id="mqa-cross"),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_flash_forward_and_backward_match_reference(generation, shape, causal):
    b, hq, hkv, sq, sk, d = shape
    if causal and sq != sk:
        pytest.skip("causal with q_len != kv_len is refused (tested above)")
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=BF16, seed=3)
    call = make_call(q, k, v, None, 0.0, causal, 0.3, hq != hkv)
    assert not FLASH.reasons(call, need_lse=True, need_backward=True)
    out, lse = FLASH.forward(call)
    dout = random_like(out, 4)
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, dout, causal=causal, scale=0.3)
    seen = standin.SEEN[FORWARD_NAME[generation]]
    assert seen["k"] == (b, sk, hkv, d + (-d) % 8), f"KV must arrive as (B, S, Hkv, D_aligned), got {seen['k']}"
    if d % 8 == 0:
        assert not seen["q_contiguous"], "q should be a transpose view, not a copy"
    assert out.dtype == BF16
    assert_close(out, ref_out, OUT_ATOL[BF16], "out")
    assert_lse_close(lse, ref_lse, LSE_ATOL)
    # The external (global) out may arrive in float32, as ring schedules keep it.
    grads = FLASH.backward(call, dout, ref_out.float(), ref_lse.float())
    assert_grads_close(grads, ref_grads, BF16)


def test_flash_dispatch_uses_the_public_function_with_autograd(generation):
    dtype = torch.float16  # bf16 runs through the contract tests above
    q, k, v = make_qkv(2, 8, 2, 8, 8, 12, dtype=dtype, seed=5, requires_grad=True)  # heads == seq_len, GQA
    with attention_provider("flash"):
        out = attention_dispatch(q, k, v, is_causal=True, scale=0.2, enable_gqa=True)
    dout = random_like(out, 6)
    out.backward(dout)
    ref_out, _, ref_grads = reference_with_grads(q, k, v, dout, causal=True, scale=0.2)
    assert_close(out, ref_out, OUT_ATOL[dtype], "out")
    assert_grads_close((q.grad, k.grad, v.grad), ref_grads, dtype)
    assert standin.CALLS["flash_attn_func"] == 1
    assert standin.CALLS[BACKWARD_NAME[generation]] == 1
    assert standin.SEEN[FORWARD_NAME[generation]]["k"][2] == 2, "KV heads must not be expanded (GQA is native)"


@pytest.mark.parametrize("d", [16, 12], ids=["runner", "padded-head-dim"])
def test_flash_cached_calls_match_the_reference(generation, monkeypatch, d):
    """After a shape's first call, dispatch runs the cached runner (the public function with its keywords bound once
    on transpose views; for FA4, its forward alone without gradients, and with gradients its forward and backward
    kernels as one autograd node; head dims that need padding are padded and sliced around the same kernels):
    every later call, with and without gradients, matches float64, and none is checked again."""
    import cpattn.dispatch as dispatch

    checked = []
    monkeypatch.setattr(dispatch, "make_call", lambda *a, **kw: checked.append(1) or make_call(*a, **kw))
    dtype = torch.float16
    for seed in range(3):
        for grad in (False, True):
            q, k, v = make_qkv(2, 8, 2, 8, 8, d, dtype=dtype, seed=seed, requires_grad=grad)  # heads == seq_len
            with attention_provider("flash"):
                out = attention_dispatch(q, k, v, is_causal=True, scale=0.21, enable_gqa=True)
            dout = random_like(out, 7 + seed)
            ref_out, _, ref_grads = reference_with_grads(q, k, v, dout, causal=True, scale=0.21)
            assert out.shape == (2, 8, 8, d)
            assert_close(out, ref_out, OUT_ATOL[dtype], f"out, seed {seed}")
            if grad:
                if seed and generation == "fa4" and d % 8 == 0:  # one node between the output and the leaves
                    assert type(out.grad_fn).__name__ == "_TransposedFlashBackward"
                    assert [type(f).__name__ for f, _ in out.grad_fn.next_functions[:3]] == ["AccumulateGrad"] * 3
                out.backward(dout)
                assert_grads_close((q.grad, k.grad, v.grad), ref_grads, dtype)
    assert len(checked) == 2, "calls after the first of each (shape, grad) were checked again: no cache hit"
    # FA4's cached runners skip the public function's autograd wrapper: only the first call of each reaches it.
    assert standin.CALLS["flash_attn_func"] == (2 if generation == "fa4" else 6)
    assert standin.SEEN[FORWARD_NAME[generation]]["k"][2] == 2, "KV heads must not be expanded (GQA is native)"
    runners = {run.__qualname__ for avail, run in FLASH._accepted.values() if avail is FLASH._availability}
    assert runners == {"Flash.runner.<locals>.<lambda>"}


def test_flash_refuses_masks_and_suggests_flash_varlen(generation):
    q, k, v = make_qkv(2, 2, 2, 4, 6, 8, dtype=BF16)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    with attention_provider("flash"), pytest.raises(UnsupportedInputError) as info:
        attention_dispatch(q, k, v, attn_mask=mask)
    assert "key-padding mask" in str(info.value)
    assert "flash_varlen" in str(info.value)


# -- flash_varlen: padded batches with key-padding masks ----------------------------------------------------------


def padding_mask(b, sk, seed, empty_rows=(), shared=False):
    """(B or 1, 1, 1, Sk) bool; rows in `empty_rows` hide every key, the others keep at least one."""
    mask = random_bool_mask((1 if shared else b, 1, 1, sk), seed=seed, p_keep=0.6)
    mask[..., 0] = True
    for row in empty_rows:
        mask[row] = False
    return mask


@pytest.mark.parametrize("shape", [(3, 4, 2, 6, 10, 16), (2, 8, 8, 8, 8, 12)], ids=["gqa-cross", "heads-eq-seq"])
def test_varlen_key_padding_contract_with_an_empty_batch_row(generation, shape):
    b, hq, hkv, sq, sk, d = shape
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=BF16, seed=7)
    mask = padding_mask(b, sk, seed=7, empty_rows=(1,))
    call = make_call(q, k, v, mask, 0.0, False, 0.4, hq != hkv)
    assert not VARLEN.reasons(call, need_lse=True, need_backward=True)
    out, lse = VARLEN.forward(call)
    dout = random_like(out, 8)
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, dout, mask=mask, scale=0.4)
    assert torch.equal(out[1], torch.zeros_like(out[1])), "fully padded row: out must be 0"
    assert torch.isneginf(lse[1]).all(), "fully padded row: lse must be -inf"
    assert_close(out, ref_out, OUT_ATOL[BF16], "out")
    assert_lse_close(lse, ref_lse, LSE_ATOL)
    grads = VARLEN.backward(call, dout, ref_out.float(), ref_lse.float())
    assert_grads_close(grads, ref_grads, BF16)
    hidden = ~mask.expand(b, 1, 1, sk).reshape(b, 1, sk, 1)
    assert not grads[1].masked_select(hidden).any(), "hidden keys must get no gradient"


@pytest.mark.parametrize("shared", [False, True], ids=["per-batch-mask", "broadcast-mask"])
def test_varlen_dispatch_uses_the_public_function_with_autograd(generation, shared):
    b, hq, hkv, sq, sk, d = 3, 4, 2, 5, 7, 16
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=BF16, seed=9, requires_grad=True)
    mask = padding_mask(b, sk, seed=9, empty_rows=() if shared else (2,), shared=shared)
    with attention_provider("flash_varlen"):
        out = attention_dispatch(q, k, v, attn_mask=mask, scale=0.35, enable_gqa=True)
    dout = random_like(out, 10)
    out.backward(dout)
    ref_out, _, ref_grads = reference_with_grads(q, k, v, dout, mask=mask, scale=0.35)
    assert_close(out, ref_out, OUT_ATOL[BF16], "out")
    assert_grads_close((q.grad, k.grad, v.grad), ref_grads, BF16)
    assert standin.CALLS["flash_attn_varlen_func"] == 1
    kept = int(mask.expand(b, 1, 1, sk).sum())
    assert standin.SEEN[VARLEN_FORWARD_NAME[generation]]["k"] == (kept, hkv, d), "keys must arrive unpadded"
    assert standin.SEEN[VARLEN_FORWARD_NAME[generation]]["q"] == (b * sq, hq, d), "queries stay padded"


def test_varlen_every_key_hidden_gives_zeros_without_a_kernel_call(generation):
    q, k, v = make_qkv(2, 2, 2, 4, 5, 8, dtype=BF16, requires_grad=True)
    mask = torch.zeros(2, 1, 1, 5, dtype=torch.bool)
    with attention_provider("flash_varlen"):
        out = attention_dispatch(q, k, v, attn_mask=mask)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in (q, k, v))
    _, lse = VARLEN.forward(make_call(q, k, v, mask, 0.0, False, None, False))
    assert torch.isneginf(lse).all()
    assert not standin.CALLS, f"no kernel should run, got {dict(standin.CALLS)}"


def test_varlen_without_mask_is_plain_attention(generation):
    q, k, v = make_qkv(2, 4, 2, 6, 6, 8, dtype=BF16, seed=11, requires_grad=True)
    with attention_provider("flash_varlen"):
        out = attention_dispatch(q, k, v, is_causal=True, enable_gqa=True)
    dout = random_like(out, 12)
    out.backward(dout)
    ref_out, _, ref_grads = reference_with_grads(q, k, v, dout, causal=True)
    assert_close(out, ref_out, OUT_ATOL[BF16], "out")
    assert_grads_close((q.grad, k.grad, v.grad), ref_grads, BF16)


@pytest.mark.parametrize(
    "mask_shape, causal, message",
    [
        ((2, 1, 1, 6), True, "is_causal together with a key-padding mask"),
        ((2, 1, 6, 6), False, "only key-padding masks"),
    ],
)
def test_varlen_refuses_what_it_cannot_express(generation, mask_shape, causal, message):
    q, k, v = make_qkv(2, 2, 2, 6, 6, 8, dtype=BF16)
    mask = torch.ones(mask_shape, dtype=torch.bool)
    with attention_provider("flash_varlen"), pytest.raises(UnsupportedInputError, match=message):
        attention_dispatch(q, k, v, attn_mask=mask, is_causal=causal)


def test_varlen_lse_layouts_are_normalised():
    q, k, v = make_qkv(2, 3, 3, 4, 4, 8)
    batch = PaddedBatch.from_call(make_call(q, k, v, None, 0.0, False, None, False))
    bhs = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    packed = bhs.permute(1, 0, 2).reshape(3, 8)  # (H, total_q), flash-attn >= 2.6, FA3, FA4
    padded = torch.cat([bhs, torch.full((2, 3, 4), 99.0)], dim=-1)  # (B, H, max_seqlen_q rounded), before 2.6
    assert torch.equal(batch.lse_from_kernel(packed), bhs)
    assert torch.equal(batch.lse_from_kernel(padded), bhs)
    assert torch.equal(batch.lse_to_kernel(bhs), packed)


# -- packed API -----------------------------------------------------------------------------------------------------


def packed_problem(lengths_q, lengths_k, hq=4, hkv=2, d=12, dtype=BF16, seed=13):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(lens), h, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
               for lens, h in ((lengths_q, hq), (lengths_k, hkv), (lengths_k, hkv)))
    cu = [torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
          for lens in (lengths_q, lengths_k)]
    return q, k, v, cu[0], cu[1]


@pytest.mark.parametrize("causal", [False, True])
def test_packed_api_matches_reference_per_sequence(generation, causal):
    lengths_q = [3, 2, 1, 7]
    lengths_k = lengths_q if causal else [4, 0, 2, 7]  # a sequence without keys gives out 0
    q, k, v, cu_q, cu_k = packed_problem(lengths_q, lengths_k)
    out = flash_varlen_attention(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), is_causal=causal, scale=0.3)
    dout = random_like(out, 14)
    out.backward(dout)
    ref_out, ref_grads = [], [[], [], []]
    for (q0, q1), (k0, k1) in zip(zip(cu_q.tolist(), cu_q.tolist()[1:]), zip(cu_k.tolist(), cu_k.tolist()[1:])):
        as_bhsd = lambda t: t.detach().transpose(0, 1).unsqueeze(0)  # noqa: E731
        o, _, grads = reference_with_grads(as_bhsd(q[q0:q1]), as_bhsd(k[k0:k1]), as_bhsd(v[k0:k1]),
                                           as_bhsd(dout[q0:q1]), causal=causal, scale=0.3)
        ref_out.append(o[0].transpose(0, 1))
        for acc, g in zip(ref_grads, grads):
            acc.append(g[0].transpose(0, 1))
    assert_close(out, torch.cat(ref_out), OUT_ATOL[BF16], "out")
    assert_grads_close((q.grad, k.grad, v.grad), [torch.cat(g) for g in ref_grads], BF16)
    assert standin.CALLS["flash_attn_varlen_func"] == 1


def _cu(*values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(cu_seqlens_q=[0, 3, 8, 15]), "must be an int32 torch.Tensor"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 8, 15])), "must be int32"),
        (dict(cu_seqlens_q=_cu(0, 3, 8, 15).reshape(1, 4)), "must be 1-D"),
        (dict(cu_seqlens_q=_cu(1, 3, 8, 15)), "must start at 0"),
        (dict(cu_seqlens_q=_cu(0, 8, 3, 15)), "non-decreasing; it drops from 8 to 3"),
        (dict(cu_seqlens_q=_cu(0, 3, 8, 14)), r"must end at the number of packed tokens of q \(15\)"),
        (dict(cu_seqlens_k=_cu(0, 4, 15)), "3 sequences but cu_seqlens_k 2"),
        (dict(max_seqlen_q=6), "max_seqlen_q=6 is smaller than the longest sequence \\(7\\)"),
        (dict(max_seqlen_k=7.0), "max_seqlen_k must be an int"),
        (dict(is_causal=True, cu_seqlens_k=_cu(0, 4, 9, 15)), "is_causal=True needs every query sequence"),
        (dict(k=torch.zeros(15, 3, 12, dtype=BF16), v=torch.zeros(15, 3, 12, dtype=BF16)), "multiple of k/v heads"),
        (dict(q=torch.zeros(15, 4, 12, dtype=BF16)[None]), r"packed \(total, heads, head_dim\)"),
    ],
)
def test_packed_api_validates_its_arguments(fa2, change, message):
    q, k, v, cu_q, cu_k = packed_problem([3, 5, 7], [3, 5, 7])
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=7, max_seqlen_k=7)
    args.update(change)
    with pytest.raises(InvalidArgumentError, match=message):
        flash_varlen_attention(**args)
    assert not standin.CALLS


def test_packed_api_checks_the_provider_limits(fa2):
    q, k, v, cu_q, cu_k = packed_problem([3, 5], [3, 5], dtype=torch.float32)
    with pytest.raises(UnsupportedInputError, match="dtype float32 is not supported"):
        flash_varlen_attention(q, k, v, cu_q, cu_k, 5, 5)


def test_fa4_backward_head_dims_are_padded_to_32_on_hopper():
    """FA4's sm90 backward is wrong at head dims 16, 48, 72, 80 and right at multiples of 32: on sm90 its
    backward runs on head dims padded to a multiple of 32."""
    from cpattn.providers.flash import HEAD_DIM_ALIGN, FlashAttention2, FlashAttention4

    fa4 = FlashAttention4.__new__(FlashAttention4)
    assert fa4.backward_head_dim_multiple((9, 0)) == 32
    assert fa4.backward_head_dim_multiple((10, 0)) == fa4.backward_head_dim_multiple(None) == HEAD_DIM_ALIGN
    assert FlashAttention2.__new__(FlashAttention2).backward_head_dim_multiple((9, 0)) == HEAD_DIM_ALIGN


def test_fa4_forward_pads_head_dims_97_to_104_to_128_on_hopper():
    """FA4's sm90 forward at head dim 104 is much slower than padded to 128; at 80, 112 and 120 padding does not
    pay for its copy."""
    from cpattn.providers.flash import HEAD_DIM_ALIGN, FlashAttention2, FlashAttention4

    fa4 = FlashAttention4.__new__(FlashAttention4)
    for d in (97, 100, 104):
        assert fa4.forward_head_dim_multiple((9, 0), d) == 32, d
    for d in (64, 80, 96, 105, 112, 120, 128):
        assert fa4.forward_head_dim_multiple((9, 0), d) == HEAD_DIM_ALIGN, d
    assert fa4.forward_head_dim_multiple((10, 0), 104) == fa4.forward_head_dim_multiple(None, 104) == HEAD_DIM_ALIGN
    assert FlashAttention2.__new__(FlashAttention2).forward_head_dim_multiple((9, 0), 104) == HEAD_DIM_ALIGN


def test_forward_runs_on_the_generations_forward_head_dim_multiple(monkeypatch):
    """With a generation whose forward is padded wider for a head dim (FA4 on sm90 at 104), every forward path
    pads to it (dispatch without gradients, its cached runner, the contract forward of CP, flash_varlen's
    key-padding path) and slices back: outputs match float64, and with gradients both kernels see the width."""
    from cpattn.providers.flash import FlashAttention4

    install(monkeypatch, GENERATIONS["fa4"]())
    monkeypatch.setattr(FlashAttention4, "forward_head_dim_multiple", lambda self, cc, d: 32 if d == 40 else 8)
    dtype = torch.float16
    for seed in range(2):  # the second call runs dispatch's cached runner
        q, k, v = make_qkv(2, 4, 2, 24, 24, 40, dtype=dtype, seed=seed)
        standin.SEEN.clear()
        with attention_provider("flash"):
            out = attention_dispatch(q, k, v, is_causal=True, enable_gqa=True)
        assert {seen["q"][-1] for seen in standin.SEEN.values()} == {64}
        ref_out, _ = reference_attention(q, k, v, is_causal=True)
        assert out.shape == (2, 4, 24, 40)
        assert_close(out, ref_out, OUT_ATOL[dtype], "out")
    call = make_call(q, k, v, None, 0.0, True, None, True)
    standin.SEEN.clear()
    out, lse = FLASH.forward(call)
    assert standin.SEEN["_flash_attn_fwd"]["q"][-1] == 64
    assert_close(out, ref_out, OUT_ATOL[dtype], "contract forward out")
    keep = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    keep[1, ..., 17:] = False
    standin.SEEN.clear()
    with attention_provider("flash_varlen"):
        out = attention_dispatch(q, k, v, attn_mask=keep, enable_gqa=True)
    assert {seen["q"][-1] for seen in standin.SEEN.values()} == {64}
    assert_close(out, reference_attention(q, k, v, attn_mask=keep)[0], OUT_ATOL[dtype], "varlen out")
    q, k, v = make_qkv(2, 4, 2, 24, 24, 40, dtype=dtype, seed=5, requires_grad=True)
    standin.SEEN.clear()
    with attention_provider("flash"):
        out = attention_dispatch(q, k, v, is_causal=True, enable_gqa=True)
    out.backward(random_like(out, 6))
    assert {seen["q"][-1] for seen in standin.SEEN.values()} == {64}


@pytest.mark.parametrize("d", [20, 64])
def test_backward_runs_on_the_generations_head_dim_multiple(monkeypatch, d):
    """With a generation whose backward needs head dims padded to 32 (FA4 on sm90), every path that runs the
    backward kernel pads to it (first dispatch, the cached runner, the ring's contract backward), gradients still
    match float64, and calls without gradients keep the usual alignment of 8."""
    from cpattn.providers.flash import FlashAttention4

    install(monkeypatch, GENERATIONS["fa4"]())
    monkeypatch.setattr(FlashAttention4, "backward_head_dim_multiple", lambda self, cc: 32)
    padded = -(-d // 32) * 32
    dtype = torch.float16
    for seed in range(2):  # the second call runs dispatch's cached runner
        q, k, v = make_qkv(2, 4, 2, 24, 24, d, dtype=dtype, seed=seed, requires_grad=True)
        with attention_provider("flash"):
            out = attention_dispatch(q, k, v, is_causal=True, enable_gqa=True)
        dout = random_like(out, 3 + seed)
        out.backward(dout)
        assert standin.SEEN["_flash_attn_bwd"]["q"][3] == padded
        ref_out, _, ref_grads = reference_with_grads(q, k, v, dout, causal=True)
        assert_close(out, ref_out, OUT_ATOL[dtype], "out")
        assert_grads_close((q.grad, k.grad, v.grad), ref_grads, dtype)
    call = make_call(q.detach(), k.detach(), v.detach(), None, 0.0, True, None, True)
    out, lse = FLASH.forward(call)
    assert standin.SEEN["_flash_attn_fwd"]["q"][3] == -(-d // 8) * 8, "forward alone keeps the alignment of 8"
    grads = FLASH.backward(call, dout, out, lse)
    assert standin.SEEN["_flash_attn_bwd"]["q"][3] == padded
    assert_grads_close(grads, ref_grads, dtype)


def test_declared_windows_and_softcaps_match_every_generation(generation):
    """The table shown without the library (the support matrix) says what every generation does once found."""
    declared = type(FLASH).supports["cuda"]
    for provider in (FLASH, VARLEN):
        found = provider.capabilities("cuda")
        assert (found.window, found.softcap) == (declared.window, declared.softcap) == (True, True), generation
        assert found.sinks == (generation == "fa4"), generation  # native only where learnable_sink exists


def test_fa4_varlen_backward_on_sm90_follows_the_kernel_signature():
    """flash_attn_varlen's training calls on sm90 are refused only where the release's sm90 backward kernel takes
    no cu_seqlens (FlashAttentionBackwardSm90.__call__ without mCuSeqlensQ/K), with the release named."""
    from types import SimpleNamespace

    from cpattn.providers.flash.fa4 import FlashAttention4, sm90_backward_takes_cu_seqlens

    class Varlen:
        def __call__(self, mQ, mK, mV, mdO, mLSE, mdPsum, mdQaccum, mdK, mdV, softmax_scale, mCuSeqlensQ=None,
                     mCuSeqlensK=None, stream=None):
            pass

    class Dense:
        def __call__(self, mQ, mK, mV, mdO, mLSE, mdPsum, mdQaccum, mdK, mdV, softmax_scale, stream=None):
            pass

    assert sm90_backward_takes_cu_seqlens(SimpleNamespace(FlashAttentionBackwardSm90=Varlen))
    assert not sm90_backward_takes_cu_seqlens(SimpleNamespace(FlashAttentionBackwardSm90=Dense))
    assert not sm90_backward_takes_cu_seqlens(SimpleNamespace())
    fa4 = FlashAttention4.__new__(FlashAttention4)
    fa4.varlen, fa4.version = True, "4.0.0b1"
    call = SimpleNamespace(needs_grad=True, softcap=None)
    for takes, refused in ((True, False), (False, True)):
        fa4.sm90_varlen_backward = takes
        reasons = [r for r in fa4.limits(call, (9, 0)) if "varlen backward" in r]
        assert bool(reasons) == refused
    assert "FlashAttention-4 4.0.0b1 has no varlen backward on Hopper" in reasons[0]
    assert not [r for r in fa4.limits(call, (10, 0)) if "varlen backward" in r]  # sm100 has one
