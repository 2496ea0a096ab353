"""Window, softcap and sinks on one device, provider by provider, against the float64 reference.

Each provider that takes a modification on CPU (natively, a window as a mask, sinks through its log-sum-exp) is
run through `attention_dispatch` and compared with `cpattn.reference_attention`: the output, and the gradients
of q, k, v and the sinks where the provider trains. xformers and sage run through their CPU stand-ins
(tests/support/standins), which check the adapters' glue, not the libraries' kernels.

Tolerances: float64 inputs 1e-9 where nothing passes through the contract's float32 log-sum-exp, 1e-6 where
sinks do (times the largest reference value where that exceeds 1: the log-sum-exp's float32 rounding is relative
to the scores); the stand-ins compute in float32 (1e-5, gradients 1e-4).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cpattn
from cpattn import reference_attention
from helpers import assert_close, make_qkv, random_bool_mask
from standins import sageattention_standin, xformers_standin

# Calling flex eagerly on CPU is deliberate (see cpattn/providers/flex.py); its performance hint is noise here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

EXACT, THROUGH_LSE = 1e-9, 1e-6  # float64 inputs
STANDIN_OUT, STANDIN_GRAD = 1e-5, 1e-4  # float32 stand-ins


@dataclass(frozen=True)
class Runs:
    """How a provider runs on CPU in these tests."""

    dtype: torch.dtype = torch.float64
    trains: bool = True
    window: bool = True
    softcap: bool = False
    same_head_dims: bool = False  # refuses a value head dim != query head dim
    head_dims: tuple[int, ...] = (4, 6, 8)  # drawn head dims it takes
    standin: str | None = None  # the stand-in library it needs


PROVIDERS = {
    "native": Runs(),
    "_native_math": Runs(softcap=True),
    "_native_flash": Runs(same_head_dims=True),
    "flex": Runs(trains=False, softcap=True),
    "xformers": Runs(dtype=torch.float32, standin="xformers", head_dims=(8, 16)),
    "sage": Runs(dtype=torch.float32, trains=False, window=False, standin="sage"),
}


def _reset(names) -> None:
    for name in names:
        cpattn.get_provider(name)._availability = None


@pytest.fixture
def use(monkeypatch):
    """use(name): the provider's stand-in library installed where it needs one (probes redone, and after)."""
    touched = []

    def install(name: str) -> Runs:
        runs = PROVIDERS[name]
        if runs.standin == "xformers":
            for module_name, module in xformers_standin.build().items():
                monkeypatch.setitem(sys.modules, module_name, module)
        elif runs.standin == "sage":
            monkeypatch.setitem(sys.modules, "sageattention", sageattention_standin.build("2.2.0"))
        touched.append(name)
        _reset([name])
        return runs

    yield install
    _reset(touched)


# -- problems -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    b: int
    hq: int
    hkv: int
    sq: int
    sk: int
    d: int = 8
    dv: int | None = None


SHAPES = {
    "square": Shape(2, 4, 2, 9, 9),
    "heads_eq_seq": Shape(1, 6, 3, 6, 6, dv=16),  # a (B, H, S, D) / (B, S, H, D) mix-up would still run
    "gqa_value_dim": Shape(2, 4, 1, 7, 7, dv=16),
    "q_shorter": Shape(1, 4, 2, 5, 13),
    "q_longer": Shape(1, 4, 2, 13, 5),  # under a window, the rows past the keys see none
}


@dataclass(frozen=True)
class Mods:
    window: tuple | None = None
    causal: bool = False
    softcap: float | None = None
    sinks: bool = False
    scale: float | None = None
    extra: dict = field(default_factory=dict)


MODS = {
    "window": Mods(window=(2, 1)),
    "window_causal": Mods(window=(3, None), causal=True),
    "diagonal": Mods(window=(0, 0)),
    "window_covers_all": Mods(window=(64, 64)),
    "left_only": Mods(window=(None, 2)),
    "softcap": Mods(softcap=2.0, scale=1.0),
    "causal_softcap": Mods(softcap=1.5, causal=True),
    "sinks": Mods(sinks=True),
    "causal_sinks": Mods(sinks=True, causal=True),
    "window_sinks_scale": Mods(window=(1, 1), sinks=True, scale=0.3),
    "window_softcap": Mods(window=(2, 0), softcap=1.0),
    "all_three": Mods(window=(2, 0), softcap=1.5, sinks=True, scale=0.7),
}

# Every modification with every shape, in pairs chosen so the table stays small.
CASES = [(mods, shape) for i, mods in enumerate(MODS) for shape in (list(SHAPES)[i % 5], list(SHAPES)[(i + 2) % 5])]


def takes(runs: Runs, mods: Mods, shape: Shape) -> bool:
    return ((mods.window is None or runs.window) and (mods.softcap is None or runs.softcap)
            and not (runs.same_head_dims and shape.dv not in (None, shape.d))
            and not (runs.standin == "sage" and mods.causal and shape.sq != shape.sk))


def problem(shape: Shape, mods: Mods, dtype, seed=0, grad=False):
    q, k, v = make_qkv(shape.b, shape.hq, shape.hkv, shape.sq, shape.sk, shape.d, dtype=dtype, dv=shape.dv,
                       seed=seed, requires_grad=grad)
    sinks = None
    if mods.sinks:
        gen = torch.Generator().manual_seed(seed + 7)
        sinks = torch.randn(shape.hq, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(grad)
    return q, k, v, sinks


def dispatch(name, q, k, v, mask=None, mods: Mods = Mods(), sinks=None):
    with cpattn.attention_provider(name):
        return cpattn.attention_dispatch(q, k, v, attn_mask=mask, is_causal=mods.causal, scale=mods.scale,
                                         enable_gqa=True, window=mods.window, softcap=mods.softcap, sinks=sinks)


def reference(q, k, v, dout, mask=None, mods: Mods = Mods(), sinks=None):
    """float64 (out, gradients of (q, k, v, sinks) or None where dout is None)."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    s64 = None if sinks is None else sinks.detach().double().requires_grad_(True)
    out, _ = reference_attention(*leaves, mask, mods.causal, mods.scale, window=mods.window, softcap=mods.softcap,
                                 sinks=s64)
    if dout is None:
        return out.detach(), None
    grads = torch.autograd.grad(out, leaves + ([s64] if s64 is not None else []), dout.double())
    return out.detach(), grads


def tolerances(runs: Runs, sinks) -> tuple[float, float]:
    if runs.dtype != torch.float64:
        return STANDIN_OUT, STANDIN_GRAD
    return (THROUGH_LSE, THROUGH_LSE) if sinks is not None else (EXACT, EXACT)


def check(name, runs: Runs, shape: Shape, mods: Mods, mask=None, seed=0):
    """The provider against the reference, forward and (where it trains) backward, sinks' gradient included."""
    q, k, v, sinks = problem(shape, mods, runs.dtype, seed, grad=runs.trains)
    out = dispatch(name, q, k, v, mask, mods, sinks)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 3), dtype=out.dtype)
    ref_out, ref_grads = reference(q, k, v, dout if runs.trains else None, mask, mods, sinks)
    out_tol, grad_tol = tolerances(runs, sinks)
    assert out.dtype == runs.dtype
    assert_close(out, ref_out, out_tol, f"{name} out")
    if runs.trains:
        leaves = [q, k, v] + ([sinks] if sinks is not None else [])
        grads = torch.autograd.grad(out, leaves, dout)
        for what, got, want in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
            tol = grad_tol * max(1.0, want.abs().max().item()) if grad_tol == THROUGH_LSE else grad_tol
            assert_close(got, want, tol, f"{name} {what}")
    return out


# -- every provider x the modifications it takes --------------------------------------------------------------


@pytest.mark.parametrize("mods,shape", CASES, ids=[f"{m}-{s}" for m, s in CASES])
@pytest.mark.parametrize("name", list(PROVIDERS))
def test_matches_the_reference(use, name, mods, shape):
    runs = use(name)
    if not takes(runs, MODS[mods], SHAPES[shape]):
        pytest.skip(f"{name} does not take {mods} on {shape} (its refusals: test_score_mods_routes.py)")
    check(name, runs, SHAPES[shape], MODS[mods])


@pytest.mark.parametrize("name", [n for n, r in PROVIDERS.items() if not r.trains])
def test_sinks_gradient_without_a_backward_kernel(use, name):
    """Only the sinks need a gradient: a forward-only provider gives it from its (out, lse) alone."""
    runs = use(name)
    shape = SHAPES["square"]
    q, k, v, sinks = problem(shape, MODS["sinks"], runs.dtype)
    sinks.requires_grad_(True)
    out = dispatch(name, q, k, v, mods=MODS["sinks"], sinks=sinks)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    (dsinks,) = torch.autograd.grad(out, sinks, dout)
    _, ref_grads = reference(q, k, v, dout, mods=MODS["sinks"], sinks=sinks)
    assert_close(dsinks, ref_grads[3], tolerances(runs, sinks)[1], "dsinks")


# -- the edges of a window ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n, r in PROVIDERS.items() if r.window])
def test_a_window_covering_every_key_is_the_full_result(use, name):
    runs = use(name)
    shape = SHAPES["q_shorter"]
    q, k, v, _ = problem(shape, Mods(), runs.dtype)
    full = dispatch(name, q, k, v)
    for window in ((shape.sk, shape.sk), (None, shape.sk), (shape.sq, None)):
        out = dispatch(name, q, k, v, mods=Mods(window=window))
        assert_close(out, full, tolerances(runs, None)[0], f"window={window}")


@pytest.mark.parametrize("name", [n for n, r in PROVIDERS.items() if r.window])
def test_window_0_0_is_the_diagonal(use, name):
    """Each query sees its own key alone: its output is that key's value."""
    runs = use(name)
    q, k, v, _ = problem(SHAPES["square"], Mods(), runs.dtype)
    out = dispatch(name, q, k, v, mods=Mods(window=(0, 0)))
    assert_close(out, v.repeat_interleave(2, dim=1), tolerances(runs, None)[0], "out")


@pytest.mark.parametrize("name", [n for n, r in PROVIDERS.items() if r.window])
def test_rows_that_see_no_key_with_sinks_give_zero(use, name):
    """Queries past the last key under a window, and a row a mask hides, see no key: with sinks in the
    denominator their output is 0, and nothing is NaN, gradients included."""
    runs = use(name)
    shape = SHAPES["q_longer"]
    mask = random_bool_mask((1, 1, shape.sq, shape.sk), seed=2, p_keep=0.9, empty_row=0)
    out = check(name, runs, shape, Mods(window=(1, 0), sinks=True), mask)
    assert (out[:, :, shape.sk + 1:] == 0).all() and (out[:, :, 0] == 0).all()


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("name", [n for n, r in PROVIDERS.items() if r.window])
def test_a_tensor_mask_combined_with_a_window(use, name, mask_kind):
    runs = use(name)
    shape = SHAPES["q_shorter"]
    gen = torch.Generator().manual_seed(11)
    mask = random_bool_mask((1, shape.hq, shape.sq, shape.sk), seed=3, p_keep=0.7)
    if mask_kind == "additive":
        mask = torch.randn(mask.shape, generator=gen, dtype=torch.float64).masked_fill(~mask, float("-inf"))
        mask = mask.to(runs.dtype)
    for mods in (Mods(window=(2, 3)), Mods(window=(4, None), causal=True, sinks=True),
                 Mods(window=(1, 2), softcap=1.5) if runs.softcap else Mods(window=(0, 4), scale=0.5)):
        check(name, runs, shape, mods, mask)


@pytest.mark.parametrize("name", [n for n, r in PROVIDERS.items() if r.window])
def test_a_mask_mod_combined_with_a_window(use, name):
    """A callable attn_mask (made a mask over positions 0..S-1 on one device) and a window together."""
    runs = use(name)
    shape = SHAPES["square"]

    def every_other_key_per_head(b, h, q_idx, kv_idx):
        return (kv_idx + h) % 2 == 0

    full = cpattn.masks.materialize_mask_mod(every_other_key_per_head, shape.b, shape.hq, torch.arange(shape.sq),
                                             torch.arange(shape.sk))
    mods = Mods(window=(3, 1), sinks=True)
    q, k, v, sinks = problem(shape, mods, runs.dtype)
    out = dispatch(name, q, k, v, every_other_key_per_head, mods, sinks)
    assert_close(out, reference(q, k, v, None, full, mods, sinks)[0], tolerances(runs, sinks)[0], "out")


def test_a_float_mask_that_requires_grad_with_a_window_under_native():
    """`native` is the provider with mask gradients: the window joins the mask without cutting them off."""
    shape = SHAPES["q_shorter"]
    q, k, v, _ = problem(shape, Mods(), torch.float64)
    bias = torch.randn(1, 1, shape.sq, shape.sk, dtype=torch.float64, requires_grad=True)
    out = dispatch("native", q, k, v, bias, Mods(window=(2, 2)))
    dout = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    (dbias,) = torch.autograd.grad(out, bias, dout)
    bias64 = bias.detach().clone().requires_grad_(True)
    ref, _ = reference_attention(q, k, v, bias64, window=(2, 2))
    (want,) = torch.autograd.grad(ref, bias64, dout)
    assert_close(dbias, want, EXACT, "d attn_mask")


# -- random combinations -----------------------------------------------------------------------------------------


@st.composite
def combinations(draw):
    name = draw(st.sampled_from(list(PROVIDERS)))
    runs = PROVIDERS[name]
    hkv, groups = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    sq, sk = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    d = draw(st.sampled_from(runs.head_dims))
    dv = d if runs.same_head_dims else draw(st.sampled_from(runs.head_dims))
    side = st.none() | st.integers(0, 11)
    window = draw(st.tuples(side, side)) if runs.window else None
    causal = draw(st.booleans()) and not (runs.standin == "sage" and sq != sk)
    mods = Mods(window=window if window != (None, None) else None, causal=causal,
                softcap=draw(st.none() | st.floats(0.5, 5.0)) if runs.softcap else None,
                sinks=draw(st.booleans()), scale=draw(st.none() | st.floats(0.1, 1.5)))
    return name, Shape(draw(st.integers(1, 2)), hkv * groups, hkv, sq, sk, d, dv), mods, draw(st.integers(0, 99))


@settings(max_examples=60, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(combinations())
def test_drawn_combinations_match_the_reference(use, drawn):
    name, shape, mods, seed = drawn
    check(name, use(name), shape, mods, seed=seed)
