"""`attention_provider("auto", autotune=True)`: the choice follows measured times, once per input signature,
only where timing changes nothing, and the result and gradients are those of the whole problem."""

from __future__ import annotations

import pytest
import torch

from cpattn import attention_dispatch, attention_provider
from cpattn.call import make_call
from cpattn.errors import InvalidArgumentError
from cpattn.providers import AUTO_TUNED, PROVIDERS
from cpattn.providers.auto import Auto, can_time, measure_ms
from helpers import GRAD_ATOL, OUT_ATOL, assert_close, make_qkv, random_bool_mask, reference_with_grads


class FakeTimes:
    """A measure function with set times per provider name; records which providers it timed."""

    def __init__(self, **ms):
        self.ms, self.timed = ms, []

    def __call__(self, provider, call):
        self.timed.append(provider.name)
        value = self.ms[provider.name]
        if isinstance(value, Exception):
            raise value
        return value


def _call(dropout_p=0.0, requires_grad=True, seq=9):
    q, k, v = make_qkv(1, 4, 2, seq, seq, 16, requires_grad=requires_grad)
    return make_call(q, k, v, None, dropout_p, True, None, True)


@pytest.mark.parametrize("times, chosen", [
    ({"_native_flash": 5.0, "_native_math": 1.0}, "_native_math"),
    ({"_native_flash": 1.0, "_native_math": 5.0}, "_native_flash"),
    ({"_native_flash": 2.0, "_native_math": 2.0}, "_native_flash"),  # a tie goes to the fixed order
    ({"_native_flash": 2.0, "_native_math": 1.92}, "_native_flash"),  # 4% faster: within SWITCH_MARGIN, noise
    ({"_native_flash": 2.0, "_native_math": 1.88}, "_native_math"),  # 6% faster: beyond it
])
def test_autotune_chooses_the_clearly_fastest_once_per_signature(times, chosen):
    measure = FakeTimes(**times)
    auto = Auto(PROVIDERS, autotune=True, measure=measure)
    call = _call()
    assert auto.choose(call).name == chosen
    # each candidate timed twice, in order and then in reverse order
    assert measure.timed == ["_native_flash", "_native_math", "_native_math", "_native_flash"]
    assert auto.choose(call, need_lse=False, need_backward=False).name == chosen  # same signature: no new timing
    assert auto.choose(_call()).name == chosen  # new tensors, same signature
    assert len(measure.timed) == 4
    assert auto.timings(call) == times
    text = auto.explain(call)
    assert f"autotuned: chose {chosen} (another provider replaces the first in the order only if measured more " \
           "than 5% faster)" in text
    for name, ms in times.items():
        assert f"{name}: takes it, {ms:.3f} ms" in text


def test_each_candidate_keeps_its_faster_round():
    rounds = iter([9.0, 3.0, 4.0, 2.0])  # flash 9 then 2, math 3 then 4: flash's hiccup must not cost it the choice
    auto = Auto(PROVIDERS, autotune=True, measure=lambda provider, call: next(rounds))
    call = _call()
    assert auto.choose(call).name == "_native_flash"
    assert auto.timings(call) == {"_native_flash": 2.0, "_native_math": 3.0}


def test_autotune_keeps_the_fixed_order_where_timing_would_change_something():
    measure = FakeTimes(_native_flash=5.0, _native_math=1.0)
    auto = Auto(PROVIDERS, autotune=True, measure=measure)
    fixed = Auto(PROVIDERS)
    # dropout: timing would consume random numbers and change the caller's results
    dropout = _call(dropout_p=0.1)
    assert auto.choose(dropout) is fixed.choose(dropout)
    # the context-parallel contract path: every rank must choose alike without talking to the others
    need = {"need_lse": True, "need_backward": True}
    assert auto.choose(_call(), **need).name == fixed.choose(_call(), **need).name == "_native_flash"
    assert measure.timed == []
    assert "fixed order" in auto.explain(_call(dropout_p=0.1))
    # On CPU only the math kernel takes dropout, so ask the guard itself too
    assert not can_time(dropout) and can_time(_call())


def test_a_provider_that_fails_when_timed_is_not_chosen():
    measure = FakeTimes(_native_flash=RuntimeError("kernel launch failed"), _native_math=9.0)
    auto = Auto(PROVIDERS, autotune=True, measure=measure)
    call = _call()
    assert auto.choose(call).name == "_native_math"
    assert measure.timed == ["_native_flash", "_native_math", "_native_math"]  # a failure is not retried
    assert "failed when timed: RuntimeError: kernel launch failed" in auto.explain(call)


def test_autotune_is_an_option_of_auto_only():
    with pytest.raises(InvalidArgumentError, match="applies to provider 'auto' only.*provider 'flash'"):
        with attention_provider("flash", autotune=True):
            pass
    with pytest.raises(InvalidArgumentError, match="autotune='yes' is invalid"):
        with attention_provider("auto", autotune="yes"):
            pass
    with attention_provider("auto", autotune=True) as state:
        assert state.provider is AUTO_TUNED
    with pytest.raises(InvalidArgumentError, match="autotune=1 is invalid"):
        with attention_provider("auto", autotune=1):
            pass
    with attention_provider("auto", autotune=False) as state:
        assert state.provider is not AUTO_TUNED and not state.provider.autotune


@pytest.mark.parametrize("masked", [False, True])
def test_autotuned_dispatch_matches_the_reference_and_leaves_the_inputs_grads_alone(monkeypatch, masked):
    """Timing runs forward+backward before the real call: the caller's .grad must hold only the real backward."""
    timed = []

    def counting(provider, call):
        timed.append(provider.name)
        return measure_ms(provider, call)

    monkeypatch.setattr(AUTO_TUNED, "_measure", counting)
    b, hq, hkv, s, d = 2, 6, 2, 6, 6 + masked  # heads == seq_len; GQA 3:1; a shape no other test autotunes
    q, k, v = make_qkv(b, hq, hkv, s, s, d, requires_grad=True)
    mask = random_bool_mask((b, 1, s, s), empty_row=2) if masked else None
    dout = torch.randn(b, hq, s, d)
    with attention_provider("auto", autotune=True):
        out = attention_dispatch(q, k, v, attn_mask=mask, is_causal=not masked, enable_gqa=True)
        again = attention_dispatch(q, k, v, attn_mask=mask, is_causal=not masked, enable_gqa=True)  # cached
    assert sorted(timed) == ["_native_flash"] * 2 + ["_native_math"] * 2  # tuned once, on the first call
    call = make_call(q, k, v, mask, 0.0, not masked, None, True)
    assert all(isinstance(t, float) and t > 0 for t in AUTO_TUNED.timings(call).values())
    assert q.grad is None and k.grad is None and v.grad is None
    out.backward(dout)
    ref_out, _, ref_grads = reference_with_grads(q, k, v, dout, mask, not masked)
    assert_close(out, ref_out, OUT_ATOL[torch.float32], "out")
    assert_close(again, ref_out, OUT_ATOL[torch.float32], "cached out")
    for name, t, g in zip("qkv", (q, k, v), ref_grads):
        assert_close(t.grad, g, GRAD_ATOL[torch.float32], f"d{name}")


def test_measure_ms_times_forward_only_without_gradients():
    call = _call(requires_grad=False, seq=33)
    ms = measure_ms(PROVIDERS["_native_math"], call)
    assert 0 < ms < 1000
    assert call.query.grad is None


def test_autotune_times_no_more_than_max_timed_candidates(monkeypatch):
    import cpattn.providers.auto as auto_module

    monkeypatch.setattr(auto_module, "MAX_TIMED", 1)
    measure = FakeTimes(_native_flash=5.0, _native_math=1.0)
    auto = Auto(PROVIDERS, autotune=True, measure=measure)
    assert auto.choose(_call()).name == "_native_flash"  # one candidate left: nothing to compare, nothing timed
    assert measure.timed == []


class _FakeProvider:
    """Takes every call; `pads` says whether it would zero-pad the call's head dim (as `flash` does)."""

    def __init__(self, name, pads=False):
        self.name, self.pads = name, pads

    def availability(self):
        from cpattn.contract import Availability

        return Availability(True, "fake")

    def pads_head_dim(self, call):
        return self.pads

    def reasons(self, call, **need):
        return []


@pytest.mark.parametrize("pads, kv_len, first", [
    (True, 4096, "_native_cudnn"),  # a padded, short call: the padding's copies cost more than FA4 gains
    (True, 4097, "flash"),
    (False, 1024, "flash"),
])
def test_auto_tries_cudnn_first_for_short_calls_flash_would_pad(pads, kv_len, first):
    from types import SimpleNamespace

    from cpattn.providers.auto import ORDER, PADDED_FLASH_CUDNN_FIRST_UP_TO

    assert PADDED_FLASH_CUDNN_FIRST_UP_TO == 4096
    registry = {name: _FakeProvider(name, pads=pads and name == "flash") for name in ORDER["cuda"]}
    auto = Auto(registry)
    call = SimpleNamespace(device=torch.device("cuda"), kv_len=kv_len, head_dim=104, window=None)
    order = auto.order(call)
    assert order[0] == first and sorted(order) == sorted(ORDER["cuda"])
    assert order[2:] == ORDER["cuda"][2:]
    assert next(auto._takers(call, {})).name == first
    text = auto.explain(call)
    assert text.splitlines()[-1] == f"{first}: takes it"
    assert ("_native_cudnn is tried first" in text) == (first == "_native_cudnn")
    cpu = SimpleNamespace(device=torch.device("cpu"), kv_len=kv_len, head_dim=104, window=None)
    assert auto.order(cpu) == ORDER["cpu"]


def test_flash_says_when_it_pads_the_head_dim(monkeypatch):
    """`pads_head_dim` follows head_dim_multiple: the alignment of 8, and wider where the generation asks (here
    as FA4 on sm90 does: forward 104 to 128, backward to a multiple of 32)."""
    from cpattn.providers.flash import FlashAttention4

    flash = PROVIDERS["flash"]
    monkeypatch.setattr(type(flash), "generation", lambda self: FlashAttention4.__new__(FlashAttention4))
    monkeypatch.setattr(FlashAttention4, "forward_head_dim_multiple", lambda self, cc, d: 32 if d == 104 else 8)
    monkeypatch.setattr(FlashAttention4, "backward_head_dim_multiple", lambda self, cc: 32)
    for d, grad, pads in ((104, False, True), (112, False, False), (100, False, True), (96, True, False),
                          (80, True, True), (80, False, False), (20, False, True), (64, True, False)):
        q, k, v = make_qkv(1, 2, 2, 8, 8, d, dtype=torch.float16, requires_grad=grad)
        assert flash.pads_head_dim(make_call(q, k, v, None, 0.0, False, None, False)) == pads, (d, grad)
