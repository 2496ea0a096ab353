"""Windows, softcaps and sinks per document of a packed stream on one device: `cpattn.packed.packed_attention`
(the packed ring's one step) and `cpattn.flash_varlen_attention`, forward and backward (the sinks' gradient
too), against a float64 reference built one document at a time (tests/support/cp_harness.documents_reference).
Providers: `native` and `_native_math` in float64, `flash_varlen` and `flash` on the CPU stand-ins of
FlashAttention-2 and -4 (tests/support/standins) in bfloat16. And what is still refused, by its message."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cpattn
from cp_harness import documents_reference
from cpattn import packed
from cpattn.providers import PROVIDERS
from standins import flash_attn_standin as standin

BOUNDS = [0, 1, 4, 34, 35, 42, 42, 54, 60]  # lengths 1, 3, 30, 1, 7, 0 (empty), 12, 6
TOLERANCE = {torch.float64: (1e-6, 1e-5, 1e-5), torch.bfloat16: (3e-2, 6e-2, 0.1)}  # out, dq/dk/dv, dsinks
MODS = {  # name: (is_causal, window, softcap, sinks)
    "causal-window": (True, (3, 0), None, False),
    "window-0-0-sinks": (False, (0, 0), None, True),
    "two-sided-softcap-sinks": (False, (2, 5), 5.0, True),
    "wider-than-documents-softcap": (True, (100, 100), 3.0, False),
    "sinks-only": (True, None, None, True),
}


@pytest.fixture(params=["fa2", "fa4"])
def flash_standin(request, monkeypatch):
    modules = standin.fa4_modules() if request.param == "fa4" else standin.fa2_modules()
    for name in standin.MODULE_NAMES:
        monkeypatch.setitem(sys.modules, name, modules.get(name))
    for name in ("flash", "flash_varlen"):
        monkeypatch.setattr(PROVIDERS[name], "_availability", None)
        monkeypatch.setattr(PROVIDERS[name], "_generation", None)
    return request.param


def _problem(seed: int, dtype, heads=(4, 2), dim=8, bounds=BOUNDS):
    """q, k, v, dout and sinks of the stream, float64 values `dtype` holds exactly."""
    gen = torch.Generator().manual_seed(seed)
    total = bounds[-1]
    q, k, v, dout = (torch.randn(total, h, dim, generator=gen, dtype=torch.float64).to(dtype).double()
                     for h in (heads[0], heads[1], heads[1], heads[0]))
    sinks = (2 * torch.randn(heads[0], generator=gen, dtype=torch.float64)).to(dtype).double()
    return q, k, v, dout, sinks


def _check(run, dtype, causal, window, softcap, with_sinks, seed=0, heads=(4, 2), bounds=BOUNDS):
    """Run `run(q, k, v, sinks)` on leaves of `dtype`, backward, and compare with the per-document reference."""
    q, k, v, dout, sinks = _problem(seed, dtype, heads, bounds=bounds)
    sinks = sinks if with_sinks else None
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    sink_leaf = None if sinks is None else sinks.to(dtype).requires_grad_()
    out = run(*leaves, sink_leaf)
    out.backward(dout.to(dtype))
    ref_out, ref_grads, ref_dsinks = documents_reference(q, k, v, dout, bounds, causal, window, softcap, sinks)
    out_tol, grad_tol, sinks_tol = TOLERANCE[dtype]
    assert out.isfinite().all()
    assert (out.double() - ref_out).abs().max() < out_tol
    for leaf, ref in zip(leaves, ref_grads):
        assert (leaf.grad.double() - ref).abs().max() < grad_tol
    if sinks is not None:
        assert (sink_leaf.grad.double() - ref_dsinks).abs().max() < sinks_tol


def _packed(provider, causal, window, softcap, bounds=BOUNDS):
    def run(q, k, v, sinks):
        with cpattn.attention_provider(provider):
            return packed.packed_attention(q, k, v, torch.tensor(bounds, dtype=torch.int32), is_causal=causal,
                                           window=window, softcap=softcap, sinks=sinks)
    return run


@pytest.mark.parametrize("mods", MODS)
@pytest.mark.parametrize("provider", ["native", "_native_math"])
def test_packed_attention_per_document(provider, mods):
    causal, window, softcap, sinks = MODS[mods]
    if provider == "native" and softcap is not None:
        pytest.skip("native has no softcap: test_a_softcap_on_native_names_who_has_one")
    _check(_packed(provider, causal, window, softcap), torch.float64, causal, window, softcap, sinks)


@pytest.mark.parametrize("mods", MODS)
@pytest.mark.parametrize("provider", ["flash_varlen", "flash"])
def test_packed_attention_per_document_on_flash(flash_standin, provider, mods):
    causal, window, softcap, sinks = MODS[mods]
    _check(_packed(provider, causal, window, softcap), torch.bfloat16, causal, window, softcap, sinks, seed=1)


@pytest.mark.parametrize("mods", ["causal-window", "two-sided-softcap-sinks"])
def test_flash_varlen_attention_per_sequence(flash_standin, mods):
    causal, window, softcap, sinks = MODS[mods]
    cu, longest = torch.tensor(BOUNDS, dtype=torch.int32), 30

    def run(q, k, v, sink_leaf):
        return cpattn.flash_varlen_attention(q, k, v, cu, cu, longest, longest, is_causal=causal, window=window,
                                             softcap=softcap, sinks=sink_leaf)

    _check(run, torch.bfloat16, causal, window, softcap, sinks, seed=2, heads=(4, 1))


def test_flash_varlen_attention_softcap_on_cross_attention_sequences(flash_standin):
    """A softcap alone runs in the one varlen call, whatever the sequences' lengths."""
    gen = torch.Generator().manual_seed(3)
    cu_q, cu_k = torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 6, 9], dtype=torch.int32)
    q = torch.randn(8, 2, 8, generator=gen, dtype=torch.float64).to(torch.bfloat16)
    k, v = (torch.randn(9, 2, 8, generator=gen, dtype=torch.float64).to(torch.bfloat16) for _ in range(2))
    out = cpattn.flash_varlen_attention(q, k, v, cu_q, cu_k, 5, 6, softcap=2.0)
    bhsd = lambda t: t.double().unsqueeze(0).transpose(1, 2)  # noqa: E731
    for (a, b), (c, d) in zip(zip([0, 3], [3, 8]), zip([0, 6], [6, 9])):
        ref, _ = cpattn.reference_attention(bhsd(q[a:b]), bhsd(k[c:d]), bhsd(v[c:d]), softcap=2.0)
        assert (out[a:b].double() - ref[0].transpose(0, 1)).abs().max() < 3e-2


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(0, 14), min_size=1, max_size=5), st.booleans(),
       st.tuples(st.one_of(st.none(), st.integers(0, 8)), st.one_of(st.none(), st.integers(0, 8))),
       st.one_of(st.none(), st.sampled_from([2.0, 6.0])), st.booleans())
def test_drawn_mixes_on_math(lengths, causal, window, softcap, sinks):
    if not sum(lengths):
        return
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    _check(_packed("_native_math", causal, window, softcap, bounds), torch.float64, causal, window, softcap,
           sinks, seed=4, bounds=bounds)


# -- what is still refused ----------------------------------------------------------------------------------------


def test_a_softcap_on_native_names_who_has_one():
    x = torch.randn(6, 2, 8, dtype=torch.float64)
    with cpattn.attention_provider("native"):
        with pytest.raises(cpattn.UnsupportedInputError, match=r"softcap=2.0 is not supported.*'_native_math'"):
            packed.packed_attention(x, x, x, torch.tensor([0, 6], dtype=torch.int32), softcap=2.0)


def test_a_window_on_cross_attention_sequences_is_refused(flash_standin):
    q, k = torch.randn(8, 2, 8, dtype=torch.bfloat16), torch.randn(9, 2, 8, dtype=torch.bfloat16)
    cu_q, cu_k = torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 6, 9], dtype=torch.int32)
    with pytest.raises(cpattn.UnsupportedInputError, match=r"window=\(2, 0\) and sinks with cu_seqlens_q != "
                                                           r"cu_seqlens_k.*attention_dispatch"):
        cpattn.flash_varlen_attention(q, k, k, cu_q, cu_k, 5, 6, window=(2, 0), sinks=torch.zeros(2))


@pytest.mark.parametrize("kwargs,words", [
    ({"window": (-1, 0)}, "each side must be an int >= 0"),
    ({"softcap": 0.0}, "must be a positive, finite number"),
    ({"sinks": torch.zeros(3)}, r"sinks must have shape \(2,\)"),
])
def test_malformed_modifications_are_refused(kwargs, words):
    x = torch.randn(6, 2, 8, dtype=torch.float64)
    with cpattn.attention_provider("_native_math"):
        with pytest.raises(cpattn.InvalidArgumentError, match=words):
            packed.packed_attention(x, x, x, torch.tensor([0, 6], dtype=torch.int32), **kwargs)


def _document_positions(bounds) -> torch.Tensor:
    starts = torch.tensor(bounds[:-1]).repeat_interleave(torch.tensor(bounds).diff())
    return torch.arange(bounds[-1]) - starts


def test_position_ids_of_the_documents_run_and_change_nothing(flash_standin):
    """Each token's position within its document passes the check (packed_position_ids gives the same), and the
    result is the call's without them."""
    q, k, v, _, _ = _problem(3, torch.bfloat16)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    cu = torch.tensor(BOUNDS, dtype=torch.int32)
    positions = _document_positions(BOUNDS)
    assert torch.equal(packed.packed_position_ids(cu, None), positions)
    with cpattn.attention_provider("_native_math"):
        plain = packed.packed_attention(q, k, v, cu, is_causal=True)
        checked = packed.packed_attention(q, k, v, cu, is_causal=True, position_ids=positions.int())
    assert torch.equal(plain, checked)
    longest = max(b - a for a, b in zip(BOUNDS, BOUNDS[1:]))
    varlen = cpattn.flash_varlen_attention(q, k, v, cu, cu, longest, longest, is_causal=True, position_ids=positions)
    assert torch.equal(varlen, cpattn.flash_varlen_attention(q, k, v, cu, cu, longest, longest, is_causal=True))


def test_position_ids_of_other_documents_are_refused(flash_standin):
    """Positions that restart elsewhere than cu_seqlens' documents: the model and the attention disagree."""
    x = torch.randn(BOUNDS[-1], 2, 8, dtype=torch.bfloat16)
    cu = torch.tensor(BOUNDS, dtype=torch.int32)
    shifted = _document_positions([0, 2, 34, 35, 42, 54, 60])
    words = r"position_ids are not each token's position within its document.*packed_position_ids"
    with cpattn.attention_provider("_native_math"):
        with pytest.raises(cpattn.InvalidArgumentError, match=words):
            packed.packed_attention(x, x, x, cu, position_ids=shifted)
    with pytest.raises(cpattn.InvalidArgumentError, match=words):
        cpattn.flash_varlen_attention(x, x, x, cu, cu, 30, 30, position_ids=shifted)
    with pytest.raises(cpattn.InvalidArgumentError, match=words):  # the per-document path (a window) checks too
        cpattn.flash_varlen_attention(x, x, x, cu, cu, 30, 30, window=(2, 0), position_ids=shifted)


@pytest.mark.parametrize("positions,words", [
    (torch.arange(60.0), "1-D integer tensor"),
    (torch.arange(60)[None], r"1-D integer tensor.*shape \(1, 60\)"),
    (torch.ones(60, dtype=torch.bool), "1-D integer tensor"),
    ([0] * 60, "got list"),
])
def test_malformed_position_ids_are_refused(positions, words):
    x = torch.randn(60, 2, 8, dtype=torch.float64)
    with cpattn.attention_provider("_native_math"):
        with pytest.raises(cpattn.InvalidArgumentError, match=words):
            packed.packed_attention(x, x, x, torch.tensor(BOUNDS, dtype=torch.int32), position_ids=positions)
