"""Bad inputs on one device: each fails early with an error that names the problem, the provider and what to do.

Complements tests/unit/test_dispatch.py (wrong rank, dtype mix, GQA without enable_gqa, mask shape, int mask, dropout
range, head dim mismatch, integer inputs, unknown provider/option, CPATTN_PROVIDER nonsense, forward-only
provider with gradients, missing and broken libraries) and tests/unit/test_provider_flash.py (cu_seqlens with the
FlashAttention stand-in) without repeating them. Multi-rank bad calls live in tests/distributed/test_faults.py.

Non-finite inputs (NaN / +-Inf) are not errors: cpattn never inspects values (that would cost a device sync
per call). The documented behaviour, asserted by `test_nonfinite_inputs_behave_exactly_like_native_sdpa`:
no crash, forward or backward, and every provider returns bit-for-bit the NaN pattern of the PyTorch SDPA
backend it wraps, with every other entry as exact as for finite inputs. What SDPA does (torch 2.13, CPU):

* NaN or Inf in query row i: only row i is affected. The math backend (`_native_math`) gives NaN there; the
  CPU flash kernel (`native`, `_native_flash`) gives 0 for a NaN row and NaN for an Inf row.
* NaN in key j under is_causal: rows >= j are NaN (`native`, `_native_flash`, `flex`); `_native_math` adds the
  causal mask as a -inf bias and NaN + -inf = NaN, so every row of that head is NaN.
* NaN in a key that a mask hides: masks are added as a -inf bias, so every row of that head is NaN.
* +-Inf in value row j: rows that attend to j get +-Inf in that column; rows that do not attend to j get NaN
  there (probability 0 x Inf).
* Gradients: any NaN in the output poisons dQ/dK/dV of the head (as in SDPA); no crash.

Under context parallelism the ring never computes a block that causal masking hides entirely, so a NaN key
reaches only the rows that attend to it (tests/distributed/test_numerics.py checks that at W=8).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import cpattn
from cpattn import attention_dispatch, attention_provider
from cpattn.contract import Capabilities, Provider
from cpattn.call import make_call
from cpattn.ops.merge import PartialAttention, merge_two
from helpers import OUT_ATOL, assert_close, make_qkv, reference_with_grads

CPU_PROVIDERS = ("native", "_native_math", "_native_flash", "flex")


def _base(**changes):
    args = dict(query=torch.zeros(1, 2, 4, 8), key=torch.zeros(1, 2, 4, 8), value=torch.zeros(1, 2, 4, 8))
    args.update(changes)
    return args


# -- malformed arguments (provider-independent) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(query=[[1.0]]), "query must be a torch.Tensor, got list"),
        # (a batch of 1 against 2 broadcasts, as in SDPA; 2 against 3 does not)
        (dict(query=torch.zeros(2, 2, 4, 8), key=torch.zeros(3, 2, 4, 8), value=torch.zeros(3, 2, 4, 8)),
         "batch sizes differ: query 2, key 3"),
        (dict(value=torch.zeros(1, 2, 5, 8)), r"key \(1, 2, 4, 8\) and value \(1, 2, 5, 8\) must agree"),
        (dict(query=torch.zeros(1, 3, 4, 8), enable_gqa=True), "query heads 3 must be a multiple of key/value heads 2"),
        (dict(dropout_p=-0.1), r"dropout_p must be in \[0, 1\), got -0.1"),
        (dict(value=torch.zeros(1, 2, 4, 8, dtype=torch.bfloat16)), "share one dtype"),
        (dict(key=torch.zeros(1, 2, 4, 8, device="meta")), "must be on one device, got cpu, meta, cpu"),
        (dict(attn_mask=torch.ones(4, 4, dtype=torch.bool, device="meta")), "attn_mask is on meta but query is on cpu"),
        (dict(attn_mask=[[True]]), "attn_mask must be a torch.Tensor or None, got list"),
        (dict(attn_mask=torch.ones(1, 1, 1, 4, 4, dtype=torch.bool)), "attn_mask has 5 dims; at most 4"),
        (dict(attn_mask=torch.ones(3, 1, 4, 4, dtype=torch.bool)), r"does not broadcast to .* = \(1, 2, 4, 4\)"),
        (dict(attn_mask=torch.ones(1, 3, 4, 4, dtype=torch.bool)), "does not broadcast"),
        (dict(attn_mask=torch.ones(4, 4, dtype=torch.uint8)), r"must be bool \(True = attend\) or float .*uint8"),
        (dict(attn_mask=torch.ones(4, 4, dtype=torch.complex64)), "must be bool .* or float"),
    ],
)
@pytest.mark.parametrize("provider", ["native", "_native_flash"])
def test_malformed_arguments_are_refused_before_any_kernel(provider, changes, match):
    with attention_provider(provider):
        with pytest.raises(cpattn.InvalidArgumentError, match=match):
            attention_dispatch(**_base(**changes))


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(cp_timeout=0), "cp_timeout=0 must be a positive, finite number"),
        (dict(cp_timeout=-5), "must be a positive, finite number"),
        (dict(cp_timeout=math.inf), "cp_timeout=inf must be a positive, finite number"),
        (dict(cp_timeout=math.nan), "must be a positive, finite number"),
        (dict(cp_timeout=True), "cp_timeout=True must be a positive, finite number"),
        (dict(cp_timeout="30"), "cp_timeout='30' must be a positive, finite number"),
        (dict(cp_strategy="fastest"), "option cp_strategy='fastest' is invalid; choose one of auto, ring"),
        (dict(cp_layout="striped"), "option cp_layout='striped' is invalid; choose one of zigzag, contiguous"),
    ],
)
def test_invalid_option_values(options, match):
    with pytest.raises(cpattn.InvalidArgumentError, match=match):
        with attention_provider("native", **options):
            pass


def test_a_cp_mesh_without_torch_distributed_is_refused():
    if torch.distributed.is_initialized():
        pytest.skip("this process already runs torch.distributed")
    with pytest.raises(cpattn.InvalidArgumentError, match="torch.distributed is not initialised"):
        with attention_provider("native", cp_mesh=object()):
            pass


@pytest.mark.parametrize("name", [3, None, "Native", " native"])
def test_provider_names_are_exact(name):
    with pytest.raises(cpattn.InvalidArgumentError, match="unknown attention provider .*valid names: native"):
        with attention_provider(name):
            pass


def test_environment_names_an_unavailable_provider_at_call_time(monkeypatch):
    """CPATTN_PROVIDER may name a provider this machine lacks: import works, the call says what to install."""
    if cpattn.get_provider("xformers").availability().ok:
        pytest.skip("xformers is installed here")
    monkeypatch.setenv("CPATTN_PROVIDER", "xformers")
    with pytest.raises(cpattn.UnsupportedInputError) as info:
        attention_dispatch(*make_qkv(1, 2, 2, 4, 4, 8))
    msg = str(info.value)
    assert "provider 'xformers'" in msg and "pip install" in msg and "Use instead: provider '" in msg


# -- what a provider cannot honour ------------------------------------------------------------------------------


class _Picky(Provider):
    """A provider with narrow capabilities, to drive every generic capability check on CPU."""

    name = "picky"
    family = "test"
    supports = {"cpu": Capabilities(dtypes=frozenset({torch.float16}), max_head_dim=64, head_dim_multiple=8,
                                    causal=False, gqa=False, custom_scale=True)}
    calls = 0

    def forward(self, call):
        type(self).calls += 1
        raise AssertionError("the kernel must not run")


def test_every_capability_reason_is_listed_with_an_alternative():
    q, k, v = make_qkv(1, 4, 2, 8, 8, 68)  # float32, head dim 68 (> 64, not a multiple of 8), GQA
    mask = torch.ones(8, 8, dtype=torch.bool)
    with attention_provider(_Picky()):
        with pytest.raises(cpattn.UnsupportedInputError) as info:
            attention_dispatch(q, k, v, attn_mask=mask, is_causal=True, dropout_p=0.2, enable_gqa=True)
    msg = str(info.value)
    for reason in (
        "provider 'picky' cannot take these inputs",
        "dtype float32 is not supported (supported: float16)",
        "query/key head dim 68 exceeds its maximum 64",
        "query/key head dim 68 is not a multiple of 8",
        "is_causal=True is not supported",
        "a boolean attn_mask is not supported",
        "dropout_p=0.2 is not supported",
        "query heads (4) != key/value heads (2) (GQA) is not supported",
        "Use instead: provider 'native'",
    ):
        assert reason in msg, f"{reason!r} missing from:\n{msg}"
    assert _Picky.calls == 0


def test_dropout_on_a_provider_without_dropout_names_one_with_it():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16)
    with attention_provider("_native_flash"):  # the CPU flash kernel has no dropout
        with pytest.raises(cpattn.UnsupportedInputError) as info:
            attention_dispatch(q, k, v, dropout_p=0.1)
    msg = str(info.value)
    assert "provider '_native_flash'" in msg and "dropout_p=0.1 is not supported" in msg
    suggested = msg.split("Use instead: provider '")[1].split("'")[0]
    with attention_provider(suggested):  # the suggestion really takes the call
        assert attention_dispatch(q, k, v, dropout_p=0.1).shape == q.shape


def test_gradients_for_a_mask_only_where_the_provider_has_them():
    q, k, v = make_qkv(1, 2, 2, 6, 6, 8, requires_grad=True)
    bias = torch.randn(1, 2, 6, 6, dtype=torch.float64).float().requires_grad_()
    with attention_provider("_native_math"):
        with pytest.raises(cpattn.UnsupportedInputError, match="gradients with respect to attn_mask are not supported"):
            attention_dispatch(q, k, v, attn_mask=bias)
    with attention_provider("native"):  # SDPA differentiates the bias
        out = attention_dispatch(q, k, v, attn_mask=bias)
    (grad,) = torch.autograd.grad(out.sum(), bias)
    bias64 = bias.detach().double().requires_grad_()
    ref, _ = cpattn.reference_attention(q.detach(), k.detach(), v.detach(), bias64)
    (ref_grad,) = torch.autograd.grad(ref.sum(), bias64)
    assert_close(grad, ref_grad, 1e-5, "d attn_mask")


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.bfloat16])
def test_float_mask_of_another_dtype_works_on_every_provider(provider, mask_dtype):
    """SDPA itself refuses a float mask whose dtype is not the query's; cpattn's providers all cast it."""
    q, k, v = make_qkv(2, 2, 2, 5, 7, 8)
    mask = torch.randn(2, 1, 5, 7, dtype=torch.float64).masked_fill(torch.rand(2, 1, 5, 7) < 0.3, -math.inf)
    mask = mask.to(mask_dtype)
    with attention_provider(provider):
        out = attention_dispatch(q, k, v, attn_mask=mask)
    assert_close(out, cpattn.reference_attention(q, k, v, mask)[0], OUT_ATOL[torch.float32], provider)


@pytest.mark.parametrize("provider", ["native", "_native_math", "_native_flash"])
@pytest.mark.parametrize("lengths", [(0, 5), (5, 0), (0, 0)], ids=["no_queries", "no_keys", "empty"])
def test_zero_length_sequences_give_sdpa_results_not_a_crash(provider, lengths):
    """SDPA answers Sq = 0 with an empty output and Sk = 0 with zeros. The CPU flash kernel dies with SIGFPE
    (the whole process) on either; a context-parallel rank holding no token passes it exactly that."""
    sq, sk = lengths
    q, k, v = make_qkv(1, 2, 2, sq, sk, 8, requires_grad=True)
    with attention_provider(provider):
        out = attention_dispatch(q, k, v)
    assert out.shape == (1, 2, sq, 8)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))
    fwd_out, lse = cpattn.get_provider(provider).forward(make_call(q.detach(), k.detach(), v.detach(), None, 0.0,
                                                                  False, None, False))
    assert fwd_out.shape == (1, 2, sq, 8) and lse.shape == (1, 2, sq) and torch.isneginf(lse).all()


# -- packed sequences: cu_seqlens ------------------------------------------------------------------------------


def _packed(total=8):
    return (torch.zeros(total, 2, 8, dtype=torch.bfloat16), torch.zeros(total, 2, 8, dtype=torch.bfloat16),
            torch.zeros(total, 2, 8, dtype=torch.bfloat16))


def _cu(*values, **kw):
    return torch.tensor(values, dtype=torch.int32, **kw)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(cu_seqlens_q=_cu(0)), "must be 1-D with batch \\+ 1 >= 2 entries, got shape \\(1,\\)"),
        (dict(cu_seqlens_k=_cu(0, 3, 8, device="meta")), "cu_seqlens_k is on meta but q is on cpu"),
        (dict(cu_seqlens_q=torch.tensor([0.0, 3.0, 8.0])), "must be int32 .*got torch.float32"),
        (dict(cu_seqlens_q=_cu(0, 3, 5, 8)), "cu_seqlens_q describes 3 sequences but cu_seqlens_k 2"),
        (dict(cu_seqlens_k=_cu(0, 3, 9)), r"must end at the number of packed tokens of k \(8\), got 9"),
        (dict(max_seqlen_q=True), "max_seqlen_q must be an int, got bool"),
    ],
)
def test_invalid_cu_seqlens_are_refused_even_without_flash_attn(change, match):
    """Argument errors come first, whether or not FlashAttention is installed (this CPU machine has none)."""
    from cpattn.packed import flash_varlen_attention

    q, k, v = _packed()
    args = dict(q=q, k=k, v=v, cu_seqlens_q=_cu(0, 3, 8), cu_seqlens_k=_cu(0, 3, 8), max_seqlen_q=5, max_seqlen_k=5)
    args.update(change)
    with pytest.raises(cpattn.InvalidArgumentError, match=match):
        flash_varlen_attention(**args)


def test_valid_packed_call_without_flash_attn_names_what_to_install():
    from cpattn.packed import flash_varlen_attention

    if cpattn.get_provider("flash_varlen").availability().ok:
        pytest.skip("FlashAttention is available here")
    with pytest.raises(cpattn.ProviderUnavailableError, match="provider 'flash_varlen' is not available.*pip install"):
        flash_varlen_attention(*_packed(), _cu(0, 3, 8), _cu(0, 3, 8), 5, 5)


# -- NaN / Inf inputs -------------------------------------------------------------------------------------------

SDPA_BACKEND = {"native": None, "_native_math": SDPBackend.MATH, "_native_flash": SDPBackend.FLASH_ATTENTION}
S = 6


def _poisoned(kind):
    q, k, v = make_qkv(1, 2, 2, S, S, 8, seed=3)
    kw = {}
    if kind == "nan_query":
        q[0, :, 1, 0] = math.nan
    elif kind == "inf_query":
        q[0, :, 1, 0] = math.inf
    elif kind == "nan_key_causal":
        k[0, :, 3, 0], kw = math.nan, dict(is_causal=True)
    elif kind == "nan_key_masked":
        k[0, :, 3, 0] = math.nan
        mask = torch.ones(S, S, dtype=torch.bool)
        mask[:, 3] = False
        kw = dict(attn_mask=mask)
    elif kind == "inf_value_causal":
        v[0, :, 3, 0], kw = math.inf, dict(is_causal=True)
    return q, k, v, kw


def _sdpa(provider, q, k, v, kw):
    backend = SDPA_BACKEND[provider]
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize("kind", ["nan_query", "inf_query", "nan_key_causal", "nan_key_masked", "inf_value_causal"])
@pytest.mark.parametrize("provider", list(SDPA_BACKEND))
def test_nonfinite_inputs_behave_exactly_like_native_sdpa(provider, kind):
    """See the module docstring for the behaviour this pins down."""
    q, k, v, kw = _poisoned(kind)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with attention_provider(provider):
        out = attention_dispatch(*leaves, **kw)
    out.sum().backward()  # no crash in backward either
    expected = _sdpa(provider, q, k, v, kw)
    assert torch.equal(torch.isnan(out), torch.isnan(expected)), f"NaN pattern differs from SDPA ({provider})"
    assert torch.equal(torch.isinf(out), torch.isinf(expected)), f"Inf pattern differs from SDPA ({provider})"
    # Entries SDPA keeps finite are exact: against the float64 reference of the same problem without the poison
    # (a poisoned query row is left out: 0 there is the CPU flash kernel's answer, not attention).
    clean = [torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in (q, k, v)]
    ref = cpattn.reference_attention(*clean, kw.get("attn_mask"), kw.get("is_causal", False))[0]
    compared = torch.isfinite(expected)
    if kind in ("nan_query", "inf_query"):
        compared[:, :, 1] = False
    if compared.any():
        err = (out.double() - ref)[compared].abs().max().item()
        assert err <= OUT_ATOL[torch.float32], f"finite entries off by {err:.3g}"


@pytest.mark.parametrize("provider", ["native", "_native_flash", "flex"])
def test_a_nan_key_under_causal_stays_in_the_rows_that_see_it_through_forward(provider):
    """The contract forward (what ring attention merges): rows before the NaN key keep exact out and lse."""
    q, k, v, kw = _poisoned("nan_key_causal")
    out, lse = cpattn.get_provider(provider).forward(make_call(q, k, v, None, 0.0, True, None, False))
    clean = torch.nan_to_num(k, nan=0.0)
    ref_out, ref_lse = cpattn.reference_attention(q, clean, v, None, True)
    assert torch.isnan(out[:, :, 3:]).all(-1).any(-1).all() and torch.isnan(lse[:, :, 3:]).all()
    assert_close(out[:, :, :3], ref_out[:, :, :3], OUT_ATOL[torch.float32], "rows before the NaN key")
    assert_close(lse[:, :, :3], ref_lse[:, :, :3], 1e-5, "lse before the NaN key")


def test_merge_keeps_a_nan_row_to_itself():
    """A block whose row r is NaN (out and lse) poisons row r of the merged result and no other row."""
    q, k, v = make_qkv(1, 2, 2, 8, 16, 8, seed=5)
    native = cpattn.get_provider("native")
    blocks = [native.forward(make_call(q, k[:, :, s], v[:, :, s], None, 0.0, False, None, False))
              for s in (slice(0, 8), slice(8, 16))]
    poisoned_out, poisoned_lse = blocks[1][0].clone(), blocks[1][1].clone()
    poisoned_out[:, :, 2], poisoned_lse[:, :, 2] = math.nan, math.nan
    out, lse = merge_two(blocks[0][0], blocks[0][1], poisoned_out, poisoned_lse)
    acc = PartialAttention(1, 2, 8, 8, q.device)
    acc.add(*blocks[0])
    acc.add(poisoned_out, poisoned_lse)
    ref_out, ref_lse = cpattn.reference_attention(q, k, v)
    others = [r for r in range(8) if r != 2]
    for o, l in ((out, lse), acc.value()):
        assert torch.isnan(o[:, :, 2]).all() and torch.isnan(l[:, :, 2]).all()
        assert_close(o[:, :, others], ref_out[:, :, others], 1e-5, "merged rows")
        assert_close(l[:, :, others], ref_lse[:, :, others], 1e-5, "merged lse")


def test_reference_with_grads_matches_autograd_of_sdpa_for_a_fully_masked_row():
    """Sanity of the tools the other tests use: an empty row has out 0 and zero gradients in both."""
    q, k, v = make_qkv(1, 1, 1, 4, 4, 8, requires_grad=True)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2] = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    dout = torch.ones_like(out)
    out.backward(dout)
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, dout, mask)
    assert torch.isneginf(ref_lse[0, 0, 2]) and (ref_out[0, 0, 2] == 0).all() and (out[0, 0, 2] == 0).all()
    assert (q.grad[0, 0, 2] == 0).all() and (ref_grads[0][0, 0, 2] == 0).all()


def test_document_mask_rejects_bad_boundaries_and_builds_blocks():
    import cpattn

    with pytest.raises(ValueError, match="cu_seqlens"):
        cpattn.document_mask([0, 4, 2])
    with pytest.raises(ValueError, match="cu_seqlens"):
        cpattn.document_mask([1, 4])
    m = cpattn.document_mask([0, 2, 5])
    assert m.shape == (5, 5)
    assert m[:2, :2].all() and m[2:, 2:].all() and not m[:2, 2:].any() and not m[2:, :2].any()
