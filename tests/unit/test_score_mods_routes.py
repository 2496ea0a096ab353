"""How window, softcap and sinks reach each provider: the refusals and what they name, `auto`'s choice, flex's
block masks (a window skips blocks), the contract's forward/backward with the modifications (what schedules
call), and the support matrix's columns.

Parity of the single-device path, provider by provider: test_score_mods_single_device.py.
"""

from __future__ import annotations

import sys

import pytest
import torch

import cpattn
from cpattn import reference_attention, scoremods
from cpattn.call import make_call
from cpattn.contract import structure_reasons
from cpattn.info import provider_rows, render, support_matrix_markdown
from cpattn.masks import select_keys
from cpattn.ops.window import local_band_mask
from cpattn.providers import AUTO, PROVIDERS
from cpattn.providers import flex as flex_module
from cpattn.providers.auto import Auto, measure_ms
from cpattn.providers.native import DENSE_WINDOW_NOTE
from helpers import OUT_ATOL, assert_close, assert_lse_close, make_qkv, random_bool_mask
from standins import sageattention_standin, xformers_standin

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

LSE_ATOL = 1e-6  # the contract's log-sum-exp is float32
GRAD_ATOL = 1e-6  # float64 gradients computed with that log-sum-exp


@pytest.fixture
def standins(monkeypatch):
    """xformers and sageattention 2.x stand-ins installed, their providers probed again (and after)."""
    for name, module in xformers_standin.build().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "sageattention", sageattention_standin.build("2.2.0"))
    names = [n for n, p in PROVIDERS.items() if p.family in ("xformers", "sage")]
    for name in names:
        PROVIDERS[name]._availability = None
    yield
    for name in names:
        PROVIDERS[name]._availability = None


def _qkv(sq=6, sk=10, dtype=torch.float64, grad=False, hq=4, hkv=2, d=8, dv=None, seed=0):
    return make_qkv(1, hq, hkv, sq, sk, d, dtype=dtype, dv=dv, seed=seed, requires_grad=grad)


def _sinks(heads=4, grad=False, dtype=torch.float64):
    return torch.linspace(-1.0, 1.5, heads, dtype=dtype).requires_grad_(grad)


def _refusal(name, q, k, v, **kwargs) -> str:
    with cpattn.attention_provider(name):
        with pytest.raises(cpattn.UnsupportedInputError) as info:
            cpattn.attention_dispatch(q, k, v, enable_gqa=True, **kwargs)
    return str(info.value)


# -- refusals: the provider, the argument, an alternative ---------------------------------------------------


REFUSALS = [
    # provider, dtype, the call's modifications, gradients, words the message must hold
    ("native", torch.float64, {"softcap": 2.0}, False, ["softcap=2.0", "'_native_math'", "'flex'"]),
    ("_native_flash", torch.float64, {"softcap": 2.0}, True, ["softcap=2.0", "'_native_math'"]),
    ("xformers", torch.float32, {"softcap": 30.0}, False, ["softcap=30.0", "'flash'", "'_native_math'"]),
    ("sage", torch.float32, {"window": (2, 1)}, False, ["window=(2, 1)", "neither a window nor a boolean mask",
                                                        "'flex'"]),
    ("sage", torch.float32, {"softcap": 2.0}, False, ["softcap=2.0", "'flex'"]),
    ("sage_varlen", torch.float32, {"sinks": True}, False, ["sinks", "returns no log-sum-exp", "'native'"]),
    ("sage", torch.float32, {"sinks": True}, True, ["sinks with gradients", "'native'"]),
    ("flex", torch.float64, {"sinks": True}, True, ["sinks with gradients", "'native'", "no backward on CPU"]),
    ("flex", torch.float64, {"softcap": 2.0}, True, ["no backward on CPU", "'_native_math'"]),
]


@pytest.mark.parametrize("name,dtype,mods,grad,words", REFUSALS,
                         ids=[f"{r[0]}-{'-'.join(r[2])}{'-grad' if r[3] else ''}" for r in REFUSALS])
def test_a_refusal_names_the_provider_the_argument_and_an_alternative(standins, name, dtype, mods, grad, words):
    q, k, v = _qkv(8, 8, dtype=dtype, grad=grad, d=16)
    mods = {**mods, "sinks": _sinks(dtype=dtype)} if "sinks" in mods else mods
    message = _refusal(name, q, k, v, **mods)
    assert f"provider '{name}' cannot take these inputs" in message
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"
    suggested = message.split("Use instead: provider '")[1].split("'")[0]
    with cpattn.attention_provider(suggested):  # the suggestion takes the very same call
        cpattn.attention_dispatch(q, k, v, enable_gqa=True, **mods)


def test_every_provider_refuses_only_what_it_cannot_apply():
    """Declarations and refusals agree: a softcap is refused exactly where it is not native; a window exactly
    where the provider has neither a window nor a boolean mask; sinks exactly where it returns no log-sum-exp."""
    q, k, v = _qkv(8, 8, dtype=torch.float64, d=16)
    for name, provider in PROVIDERS.items():
        for device, caps in provider.supports.items():
            call = make_call(q, k, v, None, 0.0, False, None, True, window=(1, 1), softcap=3.0, sinks=_sinks())
            reasons = " | ".join(structure_reasons(caps, call))
            assert ("softcap=3.0" in reasons) == (not caps.softcap), (name, device, reasons)
            assert ("window=(1, 1)" in reasons) == (not caps.window and not caps.bool_mask), (name, device)
            assert ("sinks are not supported" in reasons) == (not caps.sinks and not caps.returns_lse), (name, device)


# -- auto ------------------------------------------------------------------------------------------------------


def test_auto_on_cpu_sends_a_softcap_with_gradients_to_native_math():
    q, k, v = _qkv(grad=True)
    sinks = _sinks(grad=True)
    call = make_call(q, k, v, None, 0.0, True, None, True, window=(3, None), softcap=1.5, sinks=sinks)
    assert AUTO.choose(call).name == "_native_math"
    with cpattn.attention_provider("auto"):
        out = cpattn.attention_dispatch(q, k, v, is_causal=True, enable_gqa=True, window=(3, None), softcap=1.5,
                                        sinks=sinks)
    dout = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v, sinks), dout)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, sinks)]
    ref, _ = reference_attention(*leaves[:3], None, True, window=(3, None), softcap=1.5, sinks=leaves[3])
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    assert_close(out, ref, LSE_ATOL, "out")
    for what, got, want in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
        assert_close(got, want, GRAD_ATOL, what)


@pytest.mark.parametrize("mods,dv,chosen", [
    ({"window": (2, 2)}, None, "_native_flash"),  # as a mask: the CPU flash kernel takes bool masks
    ({"sinks": True}, None, "_native_flash"),  # through its log-sum-exp
    ({"window": (2, 2), "sinks": True}, 12, "_native_math"),  # the CPU flash kernel refuses Dv != D
    ({"softcap": 4.0}, None, "_native_math"),
])
def test_auto_chooses_a_provider_that_takes_the_modifications(mods, dv, chosen):
    q, k, v = _qkv(dv=dv, grad=True)
    mods = {**mods, "sinks": _sinks()} if "sinks" in mods else mods
    plain = make_call(q, k, v, None, 0.0, False, None, True)
    modified = make_call(q, k, v, None, 0.0, False, None, True, **mods)
    first = AUTO.choose(plain).name
    assert AUTO.choose(modified).name == chosen
    assert AUTO.choose(plain).name == first  # choices are remembered per signature, modifications included
    with cpattn.attention_provider("auto"):
        out = cpattn.attention_dispatch(q, k, v, enable_gqa=True, **mods)
    assert_close(out, reference_attention(q, k, v, **mods)[0], LSE_ATOL, "out")


def test_auto_contract_forward_and_backward_take_the_modifications():
    """What schedules call: (out, lse) with the sinks in both, and the backward given those global values."""
    q, k, v = _qkv(7, 11)
    mods = {"window": (2, 4), "sinks": _sinks()}
    call = make_call(q, k, v, None, 0.0, False, 0.4, True, **mods)
    out, lse = AUTO.forward(scoremods.as_kernel_call(AUTO, call))
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = reference_attention(*leaves, None, False, 0.4, **mods)
    assert_close(out, ref_out, LSE_ATOL, "out")
    assert_lse_close(lse, ref_lse, LSE_ATOL)
    dout = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
    grads = AUTO.backward(call, dout, out, lse)
    for what, got, want in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref_out, leaves, dout)):
        assert_close(got, want, GRAD_ATOL, what)


def test_autotune_times_the_call_with_its_modifications():
    q, k, v = _qkv()
    call = make_call(q, k, v, None, 0.0, False, None, True, window=(1, 1), sinks=_sinks())
    auto = Auto(PROVIDERS, autotune=True)
    chosen = auto.choose(call)
    assert chosen.name in ("_native_flash", "_native_math")
    assert all(isinstance(ms, float) for ms in auto.timings(call).values()), auto.timings(call)
    out = scoremods.attention(auto, call)
    assert_close(out, reference_attention(q, k, v, window=(1, 1), sinks=_sinks())[0], LSE_ATOL, "out")


def test_measure_runs_the_modified_call():
    """Timing a window call times the window: the runner given to the timer applies it."""
    q, k, v = _qkv(grad=True)
    seen = []
    provider = PROVIDERS["_native_flash"]
    original = provider.forward

    def recording_forward(call):
        seen.append(call)
        return original(call)

    provider.forward = recording_forward
    try:
        measure_ms(provider, make_call(q, k, v, None, 0.0, False, None, True, window=(0, 0), sinks=_sinks()))
    finally:
        del provider.forward
    assert seen and all(c.attn_mask is not None and c.window is None for c in seen)


# -- flex: the window in the block mask ------------------------------------------------------------------------


def _visited_blocks(block_mask) -> int:
    full = block_mask.full_kv_num_blocks
    return int(block_mask.kv_num_blocks.sum()) + (0 if full is None else int(full.sum()))


def test_flex_skips_the_key_blocks_outside_a_window():
    """A window of 100 keys over 512 tokens in 128-blocks: each query block visits at most 2 key blocks."""
    flex = flex_module.Flex()
    q, k, v = make_qkv(1, 2, 2, 512, 512, 8, dtype=torch.float32)
    causal = make_call(q, k, v, None, 0.0, True, None, False)
    windowed = make_call(q, k, v, None, 0.0, True, None, False, window=(100, None))
    assert _visited_blocks(flex.block_mask(causal)) == 10
    assert _visited_blocks(flex.block_mask(windowed)) == 7  # 1 + 2 + 2 + 2 of 16
    out, lse = flex.forward(windowed)
    ref_out, ref_lse = reference_attention(q, k, v, None, True, window=(100, None))
    assert_close(out, ref_out, OUT_ATOL[torch.float32], "out")
    assert_lse_close(lse, ref_lse, 1e-5)


def test_flex_block_masks_are_cached_per_band():
    flex = flex_module.Flex()
    q, k, v = _qkv(12, 20)
    mask = random_bool_mask((1, 1, 12, 20))
    for window, causal in (((3, 1), False), ((3, 1), False), ((3, 2), False), (None, True), ((None, 5), True)):
        flex.forward(make_call(q, k, v, mask, 0.0, causal, None, True, window=window))
    # (None, 5) under is_causal is causal itself: the band (None, 0), already built
    assert (flex.block_masks.builds, flex.block_masks.hits) == (3, 2)


@pytest.mark.parametrize("sq,sk", [(5, 13), (13, 5), (9, 9)])
def test_flex_contract_forward_on_a_rectangular_block(sq, sk):
    """A block call as schedules make it (top-left window, q_len != kv_len) with a mask, causal and a softcap."""
    q, k, v = _qkv(sq, sk)
    mask = random_bool_mask((1, 4, sq, sk), seed=4, p_keep=0.8)
    for causal, window, softcap in ((False, (2, 3), None), (True, (1, None), 2.0), (False, (0, 0), 0.7)):
        call = make_call(q, k, v, mask, 0.0, causal, 0.6, True, window=window, softcap=softcap)
        out, lse = PROVIDERS["flex"].forward(call)
        ref_out, ref_lse = reference_attention(q, k, v, mask, causal, 0.6, window=window, softcap=softcap)
        assert_close(out, ref_out, 1e-9, f"out {window}")
        assert_lse_close(lse, ref_lse, LSE_ATOL, f"lse {window}")


def test_flex_softcap_is_a_tensor_of_the_hook_made_once_per_value():
    """A Python float in the score_mod becomes a CPU scalar input when dynamo recompiles, which the compiled CUDA
    kernel rejects: the softcap reaches flex as a 0-d tensor on the inputs' device, one per value."""
    made = flex_module.softcap_tensor(2.0, torch.device("cpu"), torch.float32)
    assert made is flex_module.softcap_tensor(2.0, torch.device("cpu"), torch.float32)
    assert made.dim() == 0 and made.item() == 2.0
    q, k, v = _qkv(4, 6)
    score_mod = flex_module.score_mod_for(make_call(q, k, v, None, 0.0, False, None, True, softcap=2.0))
    scores = torch.tensor([-30.0, 0.5, 30.0], dtype=torch.float64)
    assert torch.allclose(score_mod(scores, 0, 0, 0, 0), 2.0 * torch.tanh(scores / 2.0), atol=0, rtol=1e-15)


def test_flex_takes_a_block_without_keys_under_a_window_and_softcap():
    q, k, v = _qkv(4, 0)
    out, lse = PROVIDERS["flex"].forward(make_call(q, k, v, None, 0.0, False, None, True, window=(1, 1),
                                                   softcap=2.0))
    assert (out == 0).all() and torch.isneginf(lse).all()


# -- _native_math: the softcap through the contract ----------------------------------------------------------


def test_native_math_contract_forward_with_a_softcap_and_a_window():
    q, k, v = _qkv(9, 5)
    call = make_call(q, k, v, None, 0.0, True, 0.8, True, window=(2, None), softcap=1.2)
    out, lse = PROVIDERS["_native_math"].forward(scoremods.as_kernel_call(PROVIDERS["_native_math"], call))
    ref_out, ref_lse = reference_attention(q, k, v, None, True, 0.8, window=(2, None), softcap=1.2)
    assert_close(out, ref_out, 1e-9, "out")
    assert_lse_close(lse, ref_lse, LSE_ATOL)


def test_native_math_backward_of_key_shards_with_the_global_result_adds_up():
    """Ring backward's use: each key shard's backward, given the whole row's (out, lse), gives its share."""
    q, k, v = _qkv(7, 12, dv=6)
    mask = random_bool_mask((1, 1, 7, 12), seed=5) & local_band_mask(7, 12, (3, 2), "cpu")
    dout = torch.randn(1, 4, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = reference_attention(*leaves, mask, False, 0.9, softcap=1.7)
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref_out, leaves, dout)
    math, parts = PROVIDERS["_native_math"], []
    for keys in (slice(0, 5), slice(5, 12)):
        call = make_call(q, k[:, :, keys], v[:, :, keys], select_keys(mask, keys), 0.0, False, 0.9, True,
                         softcap=1.7)
        parts.append(math.backward(call, dout, ref_out.detach(), ref_lse.float()))
    assert_close(parts[0][0] + parts[1][0], ref_dq, GRAD_ATOL, "dq")
    assert_close(torch.cat([p[1] for p in parts], dim=2), ref_dk, GRAD_ATOL, "dk")
    assert_close(torch.cat([p[2] for p in parts], dim=2), ref_dv, GRAD_ATOL, "dv")


def test_native_math_softcap_in_half_precision():
    q, k, v = _qkv(8, 8, dtype=torch.bfloat16, grad=True)
    with cpattn.attention_provider("_native_math"):
        out = cpattn.attention_dispatch(q, k, v, enable_gqa=True, softcap=2.0, scale=1.0)
    out.sum().backward()
    assert out.dtype == torch.bfloat16 and all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert_close(out, reference_attention(q, k, v, scale=1.0, softcap=2.0)[0], OUT_ATOL[torch.bfloat16], "out")


def test_native_math_softcap_with_dropout_keeps_its_expectation():
    """Dropout scales the kept probabilities by 1 / (1 - p): averaged over draws, the output is the same."""
    q, k, v = _qkv(4, 4, dtype=torch.float64)
    torch.manual_seed(0)
    with cpattn.attention_provider("_native_math"):
        outs = [cpattn.attention_dispatch(q.expand(256, -1, -1, -1), k.expand(256, -1, -1, -1),
                                          v.expand(256, -1, -1, -1), dropout_p=0.3, enable_gqa=True, softcap=2.0)]
    mean = outs[0].mean(dim=0, keepdim=True)
    assert_close(mean, reference_attention(q, k, v, softcap=2.0)[0], 0.2, "mean over dropout draws")
    assert not torch.allclose(outs[0][0], outs[0][1])


# -- what the providers and the support matrix declare ----------------------------------------------------------


def test_providers_that_take_windows_as_masks_say_so():
    for name, provider in PROVIDERS.items():
        for device, caps in provider.supports.items():
            dense = not caps.window and caps.bool_mask
            assert (DENSE_WINDOW_NOTE in caps.notes) == dense, (name, device)
    assert any("skipped" in note for note in PROVIDERS["flex"].supports["cpu"].notes)


def test_support_matrix_has_the_score_modification_columns_before_the_schedules():
    text = support_matrix_markdown()
    header = next(line for line in text.splitlines() if line.startswith("| provider |"))
    assert header.endswith("| LSE | window | softcap | sinks | cross-attention | ring | ulysses | hybrid | allgather |")
    assert "| flex | cpu | - | f16, bf16, f32, f64 | any | - | yes | bool, additive, key-padding | yes | - | - | yes | " \
           "native | native | lse | yes | fwd | fwd | fwd | fwd |" in text
    assert "| _native_math | cpu | math |" in text and "| mask | native | lse | yes | fwd+bwd |" in text
    assert "| native | cpu | - |" in text and "| mask | - | lse | yes | fwd+bwd |" in text
    assert "| sage_varlen | cuda |" in text and "| - | - | - | yes | - | fwd | - |" in text


def test_info_shows_how_each_provider_applies_them():
    rows = {row.name: row for row in provider_rows()}
    assert (rows["flex"].window, rows["flex"].softcap, rows["flex"].sinks) == ("native", "native", "lse")
    assert (rows["native"].window, rows["native"].softcap, rows["native"].sinks) == ("mask", "-", "lse")
    math = rows["_native_math (math)"]
    assert (math.window, math.softcap, math.sinks) == ("mask", "native", "lse")
    header = render(list(rows.values()), {}).splitlines()[1]
    assert "window" in header and "softcap" in header and "sinks" in header
