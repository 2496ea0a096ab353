"""Single-device dispatch on CPU: the native providers against the float64 reference, and the public API."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
import torch.nn.functional as F

import cpattn
from cpattn import attention_dispatch, attention_provider
from cpattn.call import make_call
from helpers import GRAD_ATOL, OUT_ATOL, assert_close, assert_lse_close, make_qkv, random_bool_mask, reference_with_grads

CPU_TRAINING = ("native", "_native_math", "_native_flash")

SHAPES = [  # (B, Hq, Hkv, Sq, Sk, D)
    (2, 4, 4, 16, 16, 32),
    (1, 8, 8, 8, 8, 16),  # heads == seq_len: a (B,S,H,D) / (B,H,S,D) mix-up keeps the shape
    (2, 6, 2, 13, 29, 24),  # GQA 3:1, odd lengths, Sq != Sk
    (1, 3, 1, 7, 7, 7),  # odd head dim, GQA 3:1
]


def _mask(kind, b, hq, sq, sk, dtype):
    if kind is None:
        return None
    if kind == "bool":
        return random_bool_mask((b, 1, sq, sk), empty_row=1)
    if kind == "additive":
        return torch.randn(b, hq, sq, sk, dtype=torch.float64).to(dtype)
    if kind == "key_padding":
        m = torch.ones(b, 1, 1, sk, dtype=torch.bool)
        m[0, ..., sk // 2 :] = False
        return m
    if kind == "broadcast2d":
        return random_bool_mask((sq, sk))
    raise ValueError(kind)


@pytest.mark.parametrize("provider", CPU_TRAINING)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive", "key_padding", "broadcast2d"])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_backward_match_reference(provider, shape, mask_kind, causal):
    b, hq, hkv, sq, sk, d = shape
    dtype = torch.float32
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=dtype, requires_grad=True)
    mask = _mask(mask_kind, b, hq, sq, sk, dtype)
    dout = torch.randn(b, hq, sq, d, dtype=dtype)
    with attention_provider(provider):
        out = attention_dispatch(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=hq != hkv)
    out.backward(dout)
    ref_out, _, ref_grads = reference_with_grads(q, k, v, dout, mask, causal)
    assert_close(out, ref_out, OUT_ATOL[dtype], "out")
    for name, t, g in zip("qkv", (q, k, v), ref_grads):
        assert_close(t.grad, g, GRAD_ATOL[dtype], f"d{name}")


@pytest.mark.parametrize("provider", CPU_TRAINING + ("auto",))
@pytest.mark.parametrize("shape", [(1, 4, 4, 4, 4, 8), (1, 6, 2, 9, 9, 16)], ids=["heads_eq_seq", "gqa"])
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("causal", [False, True])
def test_cached_calls_match_the_reference(monkeypatch, provider, shape, scale, causal):
    """After a shape's first call, dispatch runs the provider's cached runner without checks (for most native
    calls a bare aten call): on fresh values every such call, with and without gradients, matches float64."""
    import cpattn.dispatch as dispatch

    b, hq, hkv, sq, sk, d = shape
    checked = []
    monkeypatch.setattr(dispatch, "make_call", lambda *a, **kw: checked.append(1) or make_call(*a, **kw))
    torch.manual_seed(0)  # the shape is fresh in this process: the scale differs from any other test's
    scale = scale if scale is None else scale + 0.001 * sq
    for seed in range(3):
        for grad in (False, True):
            q, k, v = make_qkv(b, hq, hkv, sq, sk, d, seed=seed, requires_grad=grad)
            dout = torch.randn(b, hq, sq, d)
            with attention_provider(provider):
                out = attention_dispatch(q, k, v, is_causal=causal, scale=scale, enable_gqa=hq != hkv)
            ref_out, _, ref_grads = reference_with_grads(q, k, v, dout, None, causal, scale)
            assert_close(out, ref_out, OUT_ATOL[torch.float32], f"out, seed {seed}")
            if grad:
                out.backward(dout)
                for name, t, g in zip("qkv", (q, k, v), ref_grads):
                    assert_close(t.grad, g, GRAD_ATOL[torch.float32], f"d{name}, seed {seed}")
    assert len(checked) <= 2, "calls after the first of each (shape, grad) were checked again: no cache hit"


def test_cache_never_skips_the_checks_a_changed_argument_needs():
    """The cache key holds everything a check reads: a call that differs from an accepted one in dtype, mask,
    dropout or gradient mode is checked (and refused or run) on its own."""
    q, k, v = make_qkv(1, 2, 2, 5, 5, 8)
    with attention_provider("_native_flash"):
        attention_dispatch(q, k, v)
        attention_dispatch(q, k, v)
        with pytest.raises(cpattn.InvalidArgumentError, match="share one dtype"):
            attention_dispatch(q, k.double(), v)
        with pytest.raises(cpattn.UnsupportedInputError, match="dropout_p=0.5 is not supported"):
            attention_dispatch(q, k, v, dropout_p=0.5)
        mask = random_bool_mask((5, 5))
        ref_out, _, _ = reference_with_grads(q, k, v, torch.zeros(1, 2, 5, 8), mask)
        assert_close(attention_dispatch(q, k, v, attn_mask=mask), ref_out, OUT_ATOL[torch.float32], "masked out")
    with attention_provider("_native_cudnn"), pytest.raises(cpattn.UnsupportedInputError, match="runs on cuda"):
        attention_dispatch(q, k, v)  # another provider: its own cache
    sig = dispatch_signature(q, k, v)
    torch.use_deterministic_algorithms(True)
    try:
        assert dispatch_signature(q, k, v) != sig  # some backward kernels are refused in deterministic mode
    finally:
        torch.use_deterministic_algorithms(False)


def test_cached_runner_launches_on_the_tensors_gpu(monkeypatch):
    """With several GPUs a cached call switches to its tensors' GPU when another is current (as the first call
    does); with one GPU the runner is kept bare, so a cached call pays for no device check."""
    import contextlib
    import types

    from cpattn.dispatch import on_tensors_device

    current, entered = [0], []

    @contextlib.contextmanager
    def switch_to(index):
        entered.append(index)
        yield

    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: current[0], raising=False)
    monkeypatch.setattr(torch.cuda, "device", switch_to)
    query = types.SimpleNamespace(is_cuda=True, get_device=lambda: 1)  # stands in for a tensor on GPU 1
    run = lambda q, k, v, mask: ("ran", q)  # noqa: E731
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert on_tensors_device(query, run) is run
    assert on_tensors_device(types.SimpleNamespace(is_cuda=False), run) is run
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    wrapped = on_tensors_device(query, run)
    assert wrapped("q", "k", "v", None) == ("ran", "q") and entered == [1]  # GPU 0 current: switched to 1
    current[0] = 1
    assert wrapped("q", "k", "v", None) == ("ran", "q") and entered == [1]  # already on GPU 1: no switch


RANK_CASES = {  # query, key, value shapes and a mask shape, as F.scaled_dot_product_attention takes them
    "2d": ((5, 8), (6, 8), (6, 8), None),
    "3d": ((3, 5, 8), (3, 6, 8), (3, 6, 8), (3, 5, 6)),
    "5d_gqa": ((2, 3, 4, 5, 8), (2, 3, 2, 6, 8), (2, 3, 2, 6, 8), (2, 1, 1, 5, 6)),
    "5d_broadcast_batch": ((2, 1, 4, 5, 8), (1, 3, 4, 6, 8), (1, 3, 4, 6, 8), (5, 6)),
    "3d_query_4d_kv": ((4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8), None),
}


@pytest.mark.parametrize("provider", CPU_TRAINING)
@pytest.mark.parametrize("case", list(RANK_CASES))
def test_other_ranks_run_as_sdpa_takes_them(provider, case):
    """Inputs with fewer or more than 4 dims (and leading dims that broadcast) give SDPA's output shape and
    values, and gradients of the inputs' own shapes, on the first call and the cached one."""
    q_shape, k_shape, v_shape, mask_shape = RANK_CASES[case]
    gqa = q_shape[-3:-2] != k_shape[-3:-2] if len(q_shape) > 2 else False
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64).float().requires_grad_()
                   for shape in (q_shape, k_shape, v_shape))
        mask = None if mask_shape is None else torch.rand(mask_shape, generator=gen) > 0.3
        if mask is not None:
            mask[..., 0] = True
        with attention_provider(provider):
            out = attention_dispatch(q, k, v, attn_mask=mask, enable_gqa=gqa)
        ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*ref_in, attn_mask=mask, enable_gqa=gqa)
        assert out.shape == ref.shape
        assert_close(out, ref, OUT_ATOL[torch.float32], f"out, seed {seed}")
        dout = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        out.backward(dout.float())
        ref.backward(dout)
        for name, t, r in zip("qkv", (q, k, v), ref_in):
            assert t.grad.shape == t.shape
            assert_close(t.grad, r.grad, GRAD_ATOL[torch.float32], f"d{name}, seed {seed}")


@pytest.mark.parametrize("provider", CPU_TRAINING)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_three_dim_mask_on_every_cpu_provider(provider, kind):
    """A (heads, q_len, kv_len) mask broadcasts over the batch as in SDPA, through dispatch and through the
    contract's forward/backward (the CPU flash kernel itself takes only 2-D and 4-D masks)."""
    q, k, v = make_qkv(2, 3, 3, 5, 6, 8, seed=4, requires_grad=True)
    mask = random_bool_mask((3, 5, 6), seed=5, empty_row=2) if kind == "bool" else torch.randn(3, 5, 6)
    dout = torch.randn(2, 3, 5, 8)
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, dout, mask)
    with attention_provider(provider):
        out = attention_dispatch(q, k, v, attn_mask=mask)
    out.backward(dout)
    assert_close(out, ref_out, OUT_ATOL[torch.float32], "out")
    for name, t, g in zip("qkv", (q, k, v), ref_grads):
        assert_close(t.grad, g, GRAD_ATOL[torch.float32], f"d{name}")
    adapter = cpattn.get_provider(provider)
    call = make_call(q.detach(), k.detach(), v.detach(), mask, 0.0, False, None, False)
    c_out, c_lse = adapter.forward(call)
    assert_close(c_out, ref_out, OUT_ATOL[torch.float32], "contract out")
    assert_lse_close(c_lse, ref_lse, 1e-4)
    for name, got, g in zip("qkv", adapter.backward(call, dout, ref_out.float(), ref_lse.float()), ref_grads):
        assert_close(got, g, GRAD_ATOL[torch.float32], f"contract d{name}")


def test_other_ranks_take_a_mask_mod():
    """A mask_mod with 3-D inputs is evaluated on the folded (1, H, L, S) problem: here a causal one."""
    q, k, v = (torch.randn(3, 6, 8) for _ in range(3))
    with attention_provider("_native_math"):
        out = attention_dispatch(q, k, v, attn_mask=lambda b, h, qi, ki: qi >= ki)
    assert out.shape == (3, 6, 8)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), OUT_ATOL[torch.float32], "out")


def dispatch_signature(q, k, v):
    from cpattn.dispatch import call_signature

    return call_signature(q, k, v, None, 0.0, False, None, False)


@pytest.mark.parametrize("provider", CPU_TRAINING)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_and_custom_scale(provider, dtype):
    if dtype == torch.float16 and provider == "_native_flash":
        pytest.skip("CPU flash kernel has no float16")
    q, k, v = make_qkv(2, 4, 2, 9, 11, 16, dtype=dtype, requires_grad=True)
    dout = torch.randn(2, 4, 9, 16).to(dtype)
    with attention_provider(provider):
        out = attention_dispatch(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    out.backward(dout)
    ref_out, _, ref_grads = reference_with_grads(q, k, v, dout, None, True, 0.3)
    assert out.dtype == dtype
    assert_close(out, ref_out, OUT_ATOL[dtype], "out")
    for t, g in zip((q, k, v), ref_grads):
        assert_close(t.grad, g, GRAD_ATOL[dtype], "grad")


@pytest.mark.parametrize("provider", CPU_TRAINING + ("flex",))
@pytest.mark.parametrize("mask_kind", [None, "bool", "key_padding"])
def test_contract_forward_lse_and_external_backward(provider, mask_kind):
    """forward() gives float32 natural-log LSE (B, Hq, Sq) with -inf on empty rows; backward() takes it."""
    b, hq, hkv, sq, sk, d = 2, 4, 2, 10, 12, 16
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=torch.float64)
    mask = _mask(mask_kind, b, hq, sq, sk, torch.float64)
    call = make_call(q, k, v, mask, 0.0, mask_kind is None, None, True)
    adapter = cpattn.get_provider(provider)
    out, lse = adapter.forward(call)
    dout = torch.randn_like(out)
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, dout, mask, mask_kind is None)
    assert_close(out, ref_out, 1e-6, "out")
    assert_lse_close(lse, ref_lse, 1e-5)
    if mask_kind == "bool":
        assert torch.isneginf(lse[:, :, 1]).all(), "the fully masked row must have lse -inf"
        assert (out[:, :, 1] == 0).all(), "the fully masked row must have output 0"
    if adapter.supports["cpu"].backward:
        grads = adapter.backward(call, dout, out, lse)
        for g, r in zip(grads, ref_grads):
            assert_close(g, r, 1e-5, "grad")


def test_native_block_kernel_on_cpu_is_the_flash_kernel():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    assert cpattn.get_provider("native").block_kernel(make_call(q, k, v, None, 0.0, False, None, False)).name == "_native_flash"


def test_dropout_is_applied_and_scaled():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16)
    with attention_provider("native"):
        plain = attention_dispatch(q, k, v)
        torch.manual_seed(0)
        dropped = attention_dispatch(q, k, v, dropout_p=0.5)
        torch.manual_seed(0)
        again = attention_dispatch(q, k, v, dropout_p=0.5)
    assert not torch.allclose(plain, dropped)
    assert torch.equal(dropped, again)


# -- errors -------------------------------------------------------------------------------------


def test_unsupported_inputs_name_provider_reasons_and_alternative():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, requires_grad=True)
    with attention_provider("flex"):  # no backward on CPU
        with pytest.raises(cpattn.UnsupportedInputError) as info:
            attention_dispatch(q, k, v)
    msg = str(info.value)
    assert "provider 'flex'" in msg and "backward" in msg and "Use instead: provider '" in msg


def test_missing_library_names_the_package():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    with attention_provider("xformers"):
        with pytest.raises(cpattn.UnsupportedInputError, match="pip install"):
            attention_dispatch(q, k, v)


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(query=torch.zeros(8)), "at least 2 dims"),
        (dict(key=torch.zeros(1, 2, 4, 8, dtype=torch.float64)), "share one dtype"),
        (dict(key=torch.zeros(1, 3, 4, 8), value=torch.zeros(1, 3, 4, 8)), "enable_gqa=True"),
        (dict(attn_mask=torch.ones(4, 5, dtype=torch.bool)), "does not broadcast"),
        (dict(attn_mask=torch.ones(4, 4, dtype=torch.int32)), "bool .* or float"),
        (dict(dropout_p=1.5), "dropout_p"),
        (dict(key=torch.zeros(1, 2, 4, 6)), "head dim"),
        (dict(query=torch.zeros(1, 2, 4, 8, dtype=torch.int64), key=torch.zeros(1, 2, 4, 8, dtype=torch.int64),
              value=torch.zeros(1, 2, 4, 8, dtype=torch.int64)), "floating-point"),
    ],
)
def test_bad_arguments_raise_clear_errors(args, match):
    base = dict(query=torch.zeros(1, 2, 4, 8), key=torch.zeros(1, 2, 4, 8), value=torch.zeros(1, 2, 4, 8))
    base.update(args)
    with pytest.raises(cpattn.InvalidArgumentError, match=match):
        attention_dispatch(**base)


def test_unknown_provider_and_option():
    with pytest.raises(cpattn.InvalidArgumentError, match="unknown attention provider 'nope'"):
        with attention_provider("nope"):
            pass
    with pytest.raises(cpattn.InvalidArgumentError, match="unknown attention_provider option"):
        with attention_provider("native", colour="red"):
            pass
    with pytest.raises(cpattn.InvalidArgumentError, match="need cp_mesh"):
        with attention_provider("native", cp_strategy="ring"):
            pass


# -- context, environment, patching --------------------------------------------------------------


def test_context_nests_and_restores_on_exception():
    assert cpattn.current_provider().name == "native"
    with attention_provider(cpattn.AttentionProvider._NATIVE_MATH):
        assert cpattn.current_provider().name == "_native_math"
        with pytest.raises(RuntimeError):
            with attention_provider("_native_flash"):
                assert cpattn.current_provider().name == "_native_flash"
                raise RuntimeError("boom")
        assert cpattn.current_provider().name == "_native_math"
    assert cpattn.current_provider().name == "native"


def test_context_is_per_thread_and_per_task():
    seen = {}
    barrier = threading.Barrier(2)

    def worker(name):
        with attention_provider(name):
            barrier.wait()
            seen[name] = cpattn.current_provider().name

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("_native_math", "_native_flash")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert seen == {"_native_math": "_native_math", "_native_flash": "_native_flash"}

    async def task(name):
        with attention_provider(name):
            await asyncio.sleep(0.01)
            return cpattn.current_provider().name

    async def both():
        return await asyncio.gather(task("_native_math"), task("flex"))

    assert asyncio.run(both()) == ["_native_math", "flex"]


def test_environment_default(monkeypatch):
    monkeypatch.setenv("CPATTN_PROVIDER", "_native_math")
    assert cpattn.current_provider().name == "_native_math"
    monkeypatch.setenv("CPATTN_PROVIDER", "fastest-please")
    with pytest.raises(cpattn.InvalidArgumentError, match="CPATTN_PROVIDER='fastest-please' is invalid"):
        attention_dispatch(*make_qkv(1, 1, 1, 2, 2, 4))


def test_enum_values_are_the_provider_names():
    assert {p.value for p in cpattn.AttentionProvider} == set(cpattn.PROVIDERS)
    assert len(cpattn.AttentionProvider) == 15


def test_patch_round_trip_routes_through_cpattn_without_recursion():
    original = F.scaled_dot_product_attention
    q, k, v = make_qkv(1, 2, 2, 5, 5, 8)
    cpattn.patch_sdpa()
    try:
        assert cpattn.is_sdpa_patched()
        with attention_provider("native"):  # native calls PyTorch's C entry, never the patched F
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with attention_provider("flex"):
            with pytest.raises(cpattn.UnsupportedInputError):  # proves the call went through cpattn
                F.scaled_dot_product_attention(q.requires_grad_(), k, v)
    finally:
        cpattn.unpatch_sdpa()
    assert F.scaled_dot_product_attention is original
    assert_close(out, original(q.detach(), k, v, is_causal=True), 1e-6)
    with cpattn.sdpa_patched():
        assert F.scaled_dot_product_attention is cpattn.attention_dispatch
    assert F.scaled_dot_product_attention is original


def test_info_lists_every_provider_and_reasons(capsys):
    from cpattn.__main__ import main

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    for name in cpattn.PROVIDERS:
        assert name in text
    assert "torch" in text


def test_broken_library_does_not_break_import_or_other_providers(monkeypatch):
    import sys
    import types

    broken = types.ModuleType("xformers")

    def explode(name):
        raise RuntimeError("xformers is broken on purpose")

    broken.__getattr__ = explode
    monkeypatch.setitem(sys.modules, "xformers", broken)
    adapter = cpattn.get_provider("xformers")
    monkeypatch.setattr(adapter, "_availability", None)
    assert not adapter.availability().ok
    from cpattn.info import provider_rows

    rows = {r.name: r for r in provider_rows()}
    assert not rows["xformers"].available
    with attention_provider("native"):
        attention_dispatch(*make_qkv(1, 1, 1, 2, 2, 4))


def test_auto_picks_the_fastest_provider_that_takes_the_call():
    from cpattn.providers import AUTO

    q, k, v = make_qkv(1, 4, 2, 9, 9, 16, requires_grad=True)
    call = make_call(q, k, v, None, 0.0, True, None, True)
    assert AUTO.choose(call).name == "_native_flash"  # CPU order: flash kernel, then math
    q2, k2, v2 = make_qkv(1, 4, 2, 9, 9, 16, dv=8, requires_grad=True)  # CPU flash refuses Dv != D
    assert AUTO.choose(make_call(q2, k2, v2, None, 0.0, True, None, True)).name == "_native_math"
    dout = torch.randn(1, 4, 9, 8)
    with attention_provider("auto"):
        out = attention_dispatch(q2, k2, v2, is_causal=True, enable_gqa=True)
    out.backward(dout)
    ref_out, _, ref_grads = reference_with_grads(q2, k2, v2, dout, None, True)
    assert_close(out, ref_out, OUT_ATOL[torch.float32], "out")
    for t, g in zip((q2, k2, v2), ref_grads):
        assert_close(t.grad, g, GRAD_ATOL[torch.float32], "grad")
    assert "auto picks _native_flash" in __import__("cpattn.info", fromlist=["auto_choice"]).auto_choice()


@pytest.mark.parametrize("provider", CPU_TRAINING + ("flex",))
def test_callable_mask_mod_matches_its_tensor_mask(provider):
    from cpattn.masks import materialize_mask_mod

    def window(b, h, q_idx, kv_idx):  # head-dependent, so a wrong head index changes the result
        return (q_idx - kv_idx).abs() <= 1 + h

    grad = provider != "flex"
    q, k, v = make_qkv(2, 4, 2, 10, 10, 8, requires_grad=grad)
    full = materialize_mask_mod(window, 2, 4, torch.arange(10), torch.arange(10))
    assert full.shape == (1, 4, 10, 10)  # b is unused: not expanded
    dout = torch.randn(2, 4, 10, 8)
    with attention_provider(provider):
        out = attention_dispatch(q, k, v, attn_mask=window, enable_gqa=True)
    ref_out, _, ref_grads = reference_with_grads(q, k, v, dout, full, False)
    assert_close(out, ref_out, OUT_ATOL[torch.float32], "out")
    if grad:
        out.backward(dout)
        for t, g in zip((q, k, v), ref_grads):
            assert_close(t.grad, g, GRAD_ATOL[torch.float32], "grad")


def test_mask_mod_must_return_bool():
    q, k, v = make_qkv(1, 1, 1, 4, 4, 8)
    with pytest.raises(TypeError, match="bool"):
        attention_dispatch(q, k, v, attn_mask=lambda b, h, i, j: (i - j).float())
