"""How `flash` and `flash_varlen` route windows, softcaps and sinks: what each generation declares, which
function gets which argument (by parameter name), what is refused and in which words, and that FA4's sm90 fast
paths never take a call they cannot run. On the CPU stand-in (tests/support/standins/flash_attn_standin.py)."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import pytest
import torch

from cpattn import UnsupportedInputError, attention_dispatch, attention_provider
from cpattn.call import make_call
from cpattn.contract import AttentionCall
from cpattn.ops.window import trim_block
from cpattn.providers.flash import binding
from cpattn.providers.flash.fa4_sm90_backward import SharedAccumulatorBackward, Sm90BackwardKernels
from cpattn.providers.flash.score_mods import KernelMods, kernel_window
from cpattn.reference import reference_attention
from helpers import make_qkv
from standins import flash_attn_standin as standin
from test_flash_score_mods import (DTYPE, FLASH, VARLEN, assert_grad_close, assert_out_close, generation,  # noqa: F401
                                   install, make_sinks, random_like, reference)


# -- declarations -----------------------------------------------------------------------------------------------


def test_each_generation_declares_what_its_kernels_take(generation):
    for provider in (FLASH, VARLEN):
        caps = provider.capabilities("cuda")
        assert caps.window and caps.softcap, generation
        assert caps.sinks == (generation == "fa4"), generation
        notes = " ".join(caps.notes)
        assert "bottom-right" in notes
        assert ("learnable_sink" in notes) if generation == "fa4" else ("sinks through the log-sum-exp" in notes)


def test_trimmed_blocks_always_reach_the_kernels():
    """trim_block's claim, in the kernels' bottom-right terms: every block it keeps has window_size sides >= 0."""
    sides = [None, *range(-7, 8)]
    for q_len, k_len in itertools.product(range(1, 7), repeat=2):
        q, k = torch.empty(1, 1, q_len, 8), torch.empty(1, 1, k_len, 8)
        for window in itertools.product(sides, repeat=2):
            block = trim_block(q_len, k_len, window)
            if block is None or block.window is None:
                continue
            call = AttentionCall(q[:, :, block.q0:block.q1], k[:, :, block.k0:block.k1],
                                 k[:, :, block.k0:block.k1], window=block.window)
            assert kernel_window(call) is not None, (q_len, k_len, window, block)


# -- arguments by parameter name --------------------------------------------------------------------------------


def test_each_library_gets_its_own_spelling_of_the_window(generation):
    """Window (1, 2) with an unbounded side on a square call: -1 for FA2/FA3, None for FA4; the sink only to
    FA4's forward, never to a backward (the log-sum-exp it is handed holds the sinks)."""
    q, k, v = make_qkv(1, 2, 2, 6, 6, 8, dtype=DTYPE, seed=1)
    sinks = make_sinks(2)
    call = make_call(q, k, v, None, 0.0, False, None, False, window=(1, None), softcap=3.0, sinks=sinks)
    out, lse = FLASH.forward(call)
    FLASH.backward(call, random_like(out, 2), out, lse)
    forward, backward = (("_flash_attn_fwd", "_flash_attn_bwd") if generation == "fa4"
                         else ("_flash_attn_forward", "_flash_attn_backward"))
    for name in (forward, backward):
        seen = standin.SEEN[name]
        assert seen["window"] == (1, None) and seen["softcap"] == 3.0, (name, seen)
    assert standin.SEEN[forward]["sink"] == (generation == "fa4")
    assert not standin.SEEN[backward]["sink"]


def test_a_feature_is_never_passed_to_a_function_without_it(monkeypatch):
    install(monkeypatch, standin.fa4_modules(rename={"_flash_attn_fwd": {"softcap": "soft_cap"}}))
    gen = FLASH.generation()
    assert not gen._private_forward.takes("softcap") and gen._private_forward.takes("window")
    with pytest.raises(TypeError, match="cpattn passes 'softcap' to .*_flash_attn_fwd has no parameter 'softcap'"):
        gen._private_forward(q=None, k=None, v=None, softcap=2.0)


@pytest.mark.parametrize("modules, kwargs, message", [
    (lambda: standin.fa4_modules(rename={"_flash_attn_fwd": {"softcap": "soft_cap"}}), dict(softcap=2.0),
     "softcap=2.0 is not supported: FlashAttention-4 4.0.0b36: flash_attn.cute.interface._flash_attn_fwd has no "
     "parameter 'softcap'"),
    (lambda: standin.fa3_modules(rename={"_flash_attn_backward": {"window_size_left": "window_left"}}),
     dict(window=(2, 0)), "window=(2, 0) is not supported: FlashAttention-3 unknown: "
     "flash_attn_interface._flash_attn_backward has no parameter 'window_size' or "
     "'window_size_left'/'window_size_right'"),
    (lambda: standin.fa2_modules("2.6.3", rename={"flash_attn_func": {"softcap": "cap"}}), dict(softcap=1.0),
     "FlashAttention-2 2.6.3: flash_attn.flash_attn_interface.flash_attn_func has no parameter 'softcap'"),
])
def test_a_generation_without_the_parameter_refuses_naming_it(monkeypatch, modules, kwargs, message):
    message = re.escape(message)
    install(monkeypatch, modules())
    assert FLASH.availability().ok  # the rest of the generation still runs
    feature = next(iter(kwargs))
    assert not getattr(FLASH.capabilities("cuda"), feature)
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, dtype=DTYPE)
    with attention_provider("flash"), pytest.raises(UnsupportedInputError, match=message):
        attention_dispatch(q, k, v, **kwargs)
    with attention_provider("flash"):
        attention_dispatch(q, k, v)  # calls without it still run


def test_fa4_without_a_sink_gradient_takes_sinks_through_the_log_sum_exp(monkeypatch):
    """A release whose _flash_attn_bwd lacks learnable_sink gives no sink gradient: sinks are then not native, and
    still exact (forward and gradients) through the log-sum-exp."""
    install(monkeypatch, standin.fa4_modules(rename={"_flash_attn_bwd": {"learnable_sink": "sink"}}))
    caps = FLASH.capabilities("cuda")
    assert not caps.sinks and "has no parameter 'learnable_sink'" in " ".join(caps.notes)
    q, k, v = make_qkv(1, 4, 2, 6, 6, 8, dtype=DTYPE, seed=3, requires_grad=True)
    sinks = make_sinks(4, requires_grad=True)
    with attention_provider("flash"):
        out = attention_dispatch(q, k, v, enable_gqa=True, window=(2, 0), sinks=sinks)
    assert not standin.SEEN["_flash_attn_fwd"]["sink"]
    dout = random_like(out, 4)
    ref_out, _, ref_grads = reference(q, k, v, dout, False, dict(window=(2, 0), sinks=sinks))
    assert_out_close(out, ref_out, roundings=2)
    for got, want, name in zip(torch.autograd.grad(out, (q, k, v, sinks), dout), ref_grads, ("dq", "dk", "dv", "ds")):
        assert_grad_close(got, want, name)


# -- refusals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["flash", "flash_varlen"])
def test_a_band_with_a_negative_side_is_refused_in_words(generation, provider):
    # top-left (1, 1) on 4 queries x 8 keys is window_size (5, -3) at the bottom-right corner
    q, k, v = make_qkv(1, 2, 2, 4, 8, 8, dtype=DTYPE)
    with attention_provider(provider), pytest.raises(UnsupportedInputError) as info:
        attention_dispatch(q, k, v, window=(1, 1))
    text = str(info.value)
    assert "window=(1, 1) on q_len 4, kv_len 8" in text and "window_size (5, -3)" in text
    assert "bottom-right corner" in text and "trim_block" in text


def test_an_untrimmed_block_is_refused(generation):
    # a schedule's block below the diagonal, before trim_block: band (-2, 3) (keys 2 to the right and beyond)
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, dtype=DTYPE)
    call = AttentionCall(q, k, v, window=(-2, 3), scale=0.3)
    reasons = FLASH.reasons(call, need_lse=True, need_backward=True)
    assert any("window_size (-2, None)" in r for r in reasons), reasons  # its right side reaches every key


def test_varlen_refuses_a_window_with_a_key_padding_mask(generation):
    q, k, v = make_qkv(2, 2, 2, 6, 6, 8, dtype=DTYPE)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    with attention_provider("flash_varlen"), pytest.raises(UnsupportedInputError,
                                                           match="window=.2, 0. together with a key-padding mask"):
        attention_dispatch(q, k, v, attn_mask=mask, window=(2, 0))


def test_value_head_dim_other_than_the_query_s_is_refused_with_modifications(generation):
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, dtype=DTYPE, dv=16)
    with attention_provider("flash"), pytest.raises(UnsupportedInputError,
                                                    match="value head dim 16 != query head dim 8"):
        attention_dispatch(q, k, v, window=(1, 0), softcap=2.0, sinks=make_sinks(2))


# -- FA4's sm90 fast paths --------------------------------------------------------------------------------------


class _FastPath:
    """A fast path that says it can launch everything and counts its launches (it must get no modified call)."""

    def __init__(self):
        self.launches = 0

    def can_launch(self, q, k, v):
        return True

    can_launch_backward = can_launch

    def __call__(self, q, k, v, scale, causal, return_lse):
        self.launches += 1
        return standin._dense_forward(q, k, v, scale, causal, 0.0, 0, float("-inf"))

    def launch_backward(self, q, k, v, out, dout, lse, scale, causal):
        self.launches += 1
        return standin._dense_backward(dout, q, k, v, out, lse, scale, causal, 0.0, 0)


@pytest.mark.parametrize("mods, forward_fast, backward_fast", [
    (KernelMods(), True, True),
    (KernelMods(window=(2, 0)), False, False),
    (KernelMods(softcap=2.0), False, False),
    (KernelMods(sinks=torch.zeros(2)), False, True),  # a backward needs no sink: its lse holds it
])
def test_fa4_fast_paths_take_only_calls_they_run(monkeypatch, mods, forward_fast, backward_fast):
    install(monkeypatch, standin.fa4_modules())
    gen = FLASH.generation()
    fast = _FastPath()
    monkeypatch.setattr(gen, "_direct_forward", fast)
    monkeypatch.setattr(gen, "_backward_kernels", fast)
    q, k, v = (t.transpose(1, 2) for t in make_qkv(1, 2, 2, 6, 6, 8, dtype=DTYPE, seed=5))
    out, lse = gen.forward(q, k, v, 0.3, False, mods)
    assert (fast.launches, standin.CALLS["_flash_attn_fwd"]) == ((1, 0) if forward_fast else (0, 1))
    gen.backward(random_like(out, 6), q, k, v, out, lse, 0.3, False, False, mods)
    assert fast.launches == forward_fast + backward_fast


@dataclass(frozen=True)
class _Tile:
    m_block_size: int = 4
    dKV_swapAB: bool = False


class _AccumulatorKernels:
    """The shared dQ accumulator's kernels, which a windowed or softcapped block must never reach."""

    head_dim_rounded = staticmethod(Sm90BackwardKernels.head_dim_rounded)

    def tile_config(self, head_dim, head_dim_v, causal):
        return _Tile()

    def preprocess(self, *args):
        pass

    def main(self, *args):
        raise AssertionError("a block with a window or softcap reached the accumulator's kernel")


@pytest.mark.parametrize("mods", [dict(window=(2, 0)), dict(softcap=2.0)])
def test_a_ring_rank_s_modified_blocks_take_the_per_block_backward(monkeypatch, mods):
    install(monkeypatch, standin.fa4_modules())
    q, k, v = make_qkv(1, 2, 2, 8, 8, 8, dtype=DTYPE, seed=7)
    call = make_call(q, k, v, None, 0.0, False, None, False, **mods)
    out, lse = FLASH.forward(call)
    dout = random_like(out, 8)
    rows = SharedAccumulatorBackward(FLASH, call, dout, out, lse, _AccumulatorKernels())
    dk, dv = rows.block(call, slice(0, 8), dout, out, lse)
    want = FLASH.backward(call, dout, out, lse)
    for got, ref in zip((rows.dq(DTYPE), dk, dv), want):
        assert torch.equal(got, ref)
    ref_out, _ = reference_attention(q, k, v, **mods)
    assert_out_close(out, ref_out)
