"""Windows, softcaps and sinks through `flash` and `flash_varlen`, against the float64 reference.

The FlashAttention stand-in (tests/support/standins/flash_attn_standin.py) computes exact float32 math with each
generation's conventions (bottom-right windows, -1 or None for an unbounded side, softcap, FA4's learnable_sink),
so these tests check the glue: how a top-left band reaches the kernels, which functions get which argument, the
log-sum-exp with sinks, the sink gradient. Tolerances are float32's on top of the one rounding of the kernels'
float16 results (outputs), and a few float16 units of the largest value for gradients (the kernels' backward reads
their float16 output).
"""

from __future__ import annotations

import sys

import pytest
import torch

from cpattn import attention_dispatch, attention_provider
from cpattn.call import make_call
from cpattn.ops.window import trim_block
from cpattn.providers import PROVIDERS
from cpattn.reference import reference_attention
from helpers import make_qkv
from standins import flash_attn_standin as standin

FLASH, VARLEN = PROVIDERS["flash"], PROVIDERS["flash_varlen"]
DTYPE = torch.float16
EPS = torch.finfo(DTYPE).eps
SLACK = 2e-5  # float32 against float64, for these sizes

GENERATIONS = {
    "fa2": lambda: standin.fa2_modules(),  # >= 2.7: window_size_left/_right in custom ops
    "fa2-2.6": lambda: standin.fa2_modules("2.6.3"),  # window_size pairs
    "fa3": lambda: standin.fa3_modules(),
    "fa4": lambda: standin.fa4_modules(),  # None for unbounded sides, learnable_sink
}
FORWARD = {"fa2": "_flash_attn_forward", "fa2-2.6": "_flash_attn_forward", "fa3": "_flash_attn_forward",
           "fa4": "_flash_attn_fwd"}


def install(monkeypatch, modules: dict) -> None:
    """Stand-in modules in sys.modules, every other FlashAttention name blocked, both providers probing again."""
    for name in standin.MODULE_NAMES:
        monkeypatch.setitem(sys.modules, name, modules.get(name))
    for provider in (FLASH, VARLEN):
        monkeypatch.setattr(provider, "_availability", None)
        monkeypatch.setattr(provider, "_generation", None)


@pytest.fixture(params=list(GENERATIONS))
def generation(request, monkeypatch) -> str:
    install(monkeypatch, GENERATIONS[request.param]())
    return request.param


# -- comparisons ------------------------------------------------------------------------------------------------


def assert_out_close(got, ref, what="out", roundings=1):
    """float32 math rounded `roundings` times to float16 (twice where sinks rescale the kernel's output, see
    `roundings_of`): within half a float16 unit per rounding, plus float32's slack."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    excess = (got.double() - ref).abs() - (roundings * EPS / 2 * (ref.abs() + SLACK) + SLACK)
    assert excess.max() <= 0, f"{what}: {excess.max().item():.3g} beyond rounding"


def assert_lse_close(got, ref, what="lse"):
    assert got.dtype == torch.float32 and got.shape == ref.shape, f"{what}: {got.dtype} {tuple(got.shape)}"
    assert not torch.isnan(got).any() and not torch.isposinf(got).any(), f"{what}: NaN or +inf"
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), f"{what}: -inf pattern differs"
    finite = torch.isfinite(ref)
    if finite.any():
        err = (got.double()[finite] - ref[finite]).abs().max().item()
        assert err <= SLACK * (1 + ref[finite].abs().max().item()), f"{what}: max abs error {err:.3g}"


def assert_grad_close(got, ref, what):
    """Rounded once to float16, and off by what the kernels' float16 output changes in rowsum(dO * O)."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    bound = EPS / 2 * ref.abs() + 2 * EPS * ref.abs().max() + SLACK
    excess = (got.double() - ref).abs() - bound
    assert excess.max() <= 0, f"{what}: {excess.max().item():.3g} beyond the bound"


def roundings_of(generation: str, mods: dict) -> int:
    """Sinks without a sink argument (FA2, FA3) rescale the kernel's rounded output and round again."""
    return 2 if "sinks" in mods and generation != "fa4" else 1


def random_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)


def make_sinks(heads: int, seed: int = 0, requires_grad: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 50)
    return (torch.randn(heads, generator=gen) + 0.5).requires_grad_(requires_grad)


def reference(q, k, v, dout, causal, mods):
    """float64 (out, lse, grads of q, k, v and, with sinks, the sinks)."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    sinks = mods.get("sinks")
    if sinks is not None:
        leaves.append(sinks.detach().double().requires_grad_(True))
    kw = dict(mods, sinks=leaves[3] if sinks is not None else None)
    out, lse = reference_attention(*leaves[:3], is_causal=causal, **kw)
    grads = torch.autograd.grad(out, leaves, dout.double())
    return out.detach(), lse.detach(), grads


# -- the cases --------------------------------------------------------------------------------------------------
# Each shape carries a window its band can take (bottom-right sides >= 0): rectangular bands shift by kv_len - q_len.

SHAPES = {
    "heads-eq-seq-gqa": ((2, 6, 2, 6, 6, 16), (2, 1), False),
    "q-shorter": ((1, 4, 4, 5, 9, 8), (3, 4), False),  # window_size (7, 0)
    "q-longer-causal": ((2, 4, 2, 9, 5, 8), (4, None), True),  # band (4, 0): window_size (0, 4)
}


def causal_of(shape_name: str, mods: dict) -> bool:
    """A shape's is_causal, where a window holds it: alone it needs q_len == kv_len (flash-attn aligns it to
    the bottom-right corner), within a band it is shifted there like the rest of the band."""
    causal = SHAPES[shape_name][2]
    return causal and ("window" in mods or SHAPES[shape_name][0][3] == SHAPES[shape_name][0][4])
MODS = ["window", "softcap", "sinks", "window+softcap", "window+sinks", "softcap+sinks", "window+softcap+sinks"]


def mods_of(name: str, window, heads: int, sinks_grad: bool = False) -> dict:
    parts = set(name.split("+"))
    out = {}
    if "window" in parts:
        out["window"] = window
    if "softcap" in parts:
        out["softcap"] = 1.5  # scores of these inputs reach 3 or so: the cap bends them
    if "sinks" in parts:
        out["sinks"] = make_sinks(heads, requires_grad=sinks_grad)
    return out


@pytest.mark.parametrize("mods_name", MODS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_single_device_forward_and_backward(generation, shape_name, mods_name):
    (b, hq, hkv, sq, sk, d), window, _ = SHAPES[shape_name]
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=DTYPE, seed=1, requires_grad=True)
    mods = mods_of(mods_name, window, hq, sinks_grad=True)
    causal = causal_of(shape_name, mods)
    with attention_provider("flash"):
        out = attention_dispatch(q, k, v, is_causal=causal, enable_gqa=hq != hkv, **mods)
    dout = random_like(out, 2)
    ref_out, _, ref_grads = reference(q, k, v, dout, causal, mods)
    assert_out_close(out, ref_out, roundings=roundings_of(generation, mods))
    leaves = [q, k, v] + ([mods["sinks"]] if "sinks" in mods else [])
    grads = torch.autograd.grad(out, leaves, dout)
    for got, want, name in zip(grads, ref_grads, ("dq", "dk", "dv", "dsinks")):
        assert got.dtype == (torch.float32 if name == "dsinks" else DTYPE), name
        assert_grad_close(got, want, name)


@pytest.mark.parametrize("provider", [FLASH, VARLEN], ids=["flash", "flash_varlen"])
@pytest.mark.parametrize("mods_name", MODS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_contract_forward_and_backward(generation, provider, shape_name, mods_name):
    """What schedules call: (out, lse) with the sinks in lse, and the q/k/v gradients from a global (out, lse)."""
    (b, hq, hkv, sq, sk, d), window, _ = SHAPES[shape_name]
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=DTYPE, seed=3)
    mods = mods_of(mods_name, window, hq)
    causal = causal_of(shape_name, mods)
    call = make_call(q, k, v, None, 0.0, causal, 0.3, hq != hkv, **mods)
    assert not provider.reasons(call, need_lse=True, need_backward=True)
    out, lse = provider.forward(call)
    dout = random_like(out, 4)
    ref_out, ref_lse, ref_grads = reference(q, k, v, dout, causal, dict(mods, scale=0.3))
    assert out.dtype == DTYPE
    assert_out_close(out, ref_out, roundings=roundings_of(generation, mods))
    assert_lse_close(lse, ref_lse)
    grads = provider.backward(call, dout, ref_out.float(), ref_lse.float())
    for got, want, name in zip(grads, ref_grads, ("dq", "dk", "dv")):
        assert_grad_close(got, want, name)


def test_sinks_gradient_alone(generation):
    """Only the sinks want a gradient: it still comes, natively on FA4, through the log-sum-exp elsewhere."""
    q, k, v = make_qkv(2, 4, 2, 7, 7, 8, dtype=DTYPE, seed=5)
    sinks = make_sinks(4, seed=5, requires_grad=True)
    with attention_provider("flash"):
        out = attention_dispatch(q, k, v, is_causal=True, enable_gqa=True, window=(3, 0), sinks=sinks)
    dout = random_like(out, 6)
    (dsinks,) = torch.autograd.grad(out, sinks, dout)
    _, _, ref_grads = reference(q, k, v, dout, True, dict(window=(3, 0), sinks=sinks))
    assert_grad_close(dsinks, ref_grads[3], "dsinks")


# -- windows the kernels see ------------------------------------------------------------------------------------


@pytest.mark.parametrize("window, causal, seen", [
    ((20, 30), False, None),  # wider than the sequence: no window at all
    ((0, 0), False, (0, 0)),  # the diagonal only
    ((None, 0), False, (None, None)),  # only causal: the kernels' causal mask, no window
    ((2, None), True, (2, 0)),
    ((None, 3), False, (None, 3)),
])
def test_square_windows_reach_the_kernels_as_they_are(generation, window, causal, seen):
    q, k, v = make_qkv(1, 4, 4, 8, 8, 16, dtype=DTYPE, seed=7, requires_grad=True)
    with attention_provider("flash"):
        out = attention_dispatch(q, k, v, is_causal=causal, window=window)
    dout = random_like(out, 8)
    ref_out, _, ref_grads = reference(q, k, v, dout, causal, dict(window=window))
    assert_out_close(out, ref_out)
    for got, want, name in zip(torch.autograd.grad(out, (q, k, v), dout), ref_grads, ("dq", "dk", "dv")):
        assert_grad_close(got, want, name)
    received = standin.SEEN[FORWARD[generation]]["window"]
    assert received == (seen or (None, None)), received


def test_rectangular_band_is_shifted_to_the_bottom_right_corner(generation):
    # top-left (1, 6) on 4 queries x 8 keys: query i sees keys i - 1 .. i + 6, i.e. window_size (5, 2)
    q, k, v = make_qkv(1, 2, 2, 4, 8, 8, dtype=DTYPE, seed=9)
    call = make_call(q, k, v, None, 0.0, False, None, False, window=(1, 6))
    out, lse = FLASH.forward(call)
    ref_out, ref_lse = reference_attention(q, k, v, window=(1, 6))
    assert_out_close(out, ref_out)
    assert_lse_close(lse, ref_lse)
    assert standin.SEEN[FORWARD[generation]]["window"] == (5, 2)


def test_blocks_trimmed_off_the_diagonal(generation):
    """A schedule's blocks: a global window over a sequence of 12 in blocks of 4 (queries) and 5 (keys), each block
    cut by trim_block to what its band reaches (its sides >= 0), matches the reference of that sub-block."""
    q, k, v = make_qkv(1, 4, 2, 12, 15, 8, dtype=DTYPE, seed=11)
    checked = 0
    for window in ((3, 0), (6, 2), (None, 1), (2, None)):
        for qa in range(0, 12, 4):
            for ka in range(0, 15, 5):
                left, right = window
                shifted = (None if left is None else left - (qa - ka), None if right is None else right + (qa - ka))
                block = trim_block(4, 5, shifted)
                if block is None:
                    continue
                rows, keys = slice(qa + block.q0, qa + block.q1), slice(ka + block.k0, ka + block.k1)
                qb, kb, vb = q[:, :, rows], k[:, :, keys], v[:, :, keys]
                call = make_call(qb, kb, vb, None, 0.0, False, None, True, window=block.window, softcap=2.0)
                assert not FLASH.reasons(call, need_lse=True, need_backward=True), (window, qa, ka, block)
                out, lse = FLASH.forward(call)
                dout = random_like(out, qa + ka)
                ref_out, ref_lse, ref_grads = reference(qb, kb, vb, dout, False,
                                                        dict(window=block.window, softcap=2.0))
                assert_out_close(out, ref_out, f"out {window} {qa} {ka}")
                assert_lse_close(lse, ref_lse)
                for got, want, name in zip(FLASH.backward(call, dout, ref_out, ref_lse.float()), ref_grads, "qkv"):
                    assert_grad_close(got, want, f"d{name} {window} {qa} {ka}")
                checked += 1
    assert checked >= 12


# -- rows without keys ------------------------------------------------------------------------------------------


def test_varlen_sequences_without_keys_and_sinks(generation):
    """A batch row whose keys are all hidden attends only its sinks: out 0, lse = the sink, no NaN anywhere."""
    b, hq, hkv, sq, sk = 3, 4, 2, 5, 7
    q, k, v = make_qkv(b, hq, hkv, sq, sk, 8, dtype=DTYPE, seed=13, requires_grad=True)
    mask = torch.ones(b, 1, 1, sk, dtype=torch.bool)
    mask[1] = False
    mask[2, ..., 3:] = False
    sinks = make_sinks(hq, seed=13, requires_grad=True)
    with attention_provider("flash_varlen"):
        out = attention_dispatch(q, k, v, attn_mask=mask, enable_gqa=True, softcap=2.0, sinks=sinks)
    dout = random_like(out, 14)
    ref_out, ref_lse, ref_grads = reference(q, k, v, dout, False, dict(attn_mask=mask, softcap=2.0, sinks=sinks))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_out_close(out, ref_out, roundings=roundings_of(generation, {"sinks": sinks}))
    for got, want, name in zip(torch.autograd.grad(out, (q, k, v, sinks), dout), ref_grads, ("dq", "dk", "dv", "ds")):
        assert_grad_close(got, want, name)
    call = make_call(q.detach(), k.detach(), v.detach(), mask, 0.0, False, None, True, softcap=2.0,
                     sinks=sinks.detach())
    out_c, lse_c = VARLEN.forward(call)
    assert_out_close(out_c, ref_out, roundings=2)  # a batch row without keys: sinks join after the kernel
    assert_lse_close(lse_c, ref_lse)
    assert torch.allclose(lse_c[1], sinks.detach().view(-1, 1).expand(hq, sq)), "no key: lse is the sink"


def test_every_key_hidden_with_sinks(generation):
    q, k, v = make_qkv(2, 2, 2, 4, 5, 8, dtype=DTYPE, requires_grad=True)
    mask = torch.zeros(2, 1, 1, 5, dtype=torch.bool)
    sinks = make_sinks(2, requires_grad=True)
    with attention_provider("flash_varlen"):
        out = attention_dispatch(q, k, v, attn_mask=mask, sinks=sinks)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in (q, k, v, sinks))
    _, lse = VARLEN.forward(make_call(q, k, v, mask, 0.0, False, None, False, sinks=sinks))
    assert torch.equal(lse, sinks.detach().view(1, -1, 1).expand(2, 2, 4))
