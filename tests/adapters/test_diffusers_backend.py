"""diffusers' attention on cpattn, one device: `use_cpattn()` through the backend registry and the SDPA shim, what
diffusers passes mapped onto attention_dispatch, and what `parallelize` refuses or plans before any rank talks.

Models: a tiny Flux (its processors call diffusers' dispatch_attention_fn, so the registry route) and a tiny
UNet2DConditionModel (AttnProcessor2_0 calls F.scaled_dot_product_attention itself, so the shim), each against the
same model with diffusers' own attention: output and parameter gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from test_diffusers_models import ATTENTION_CALLS, build, unet

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[dev]')")

import cpattn  # noqa: E402
import cpattn.integrations.diffusers as integration  # noqa: E402
from cpattn.integrations.diffusers import (  # noqa: E402
    CPPlan, UnservableModelError, parallelize, plan_for, use_cpattn,
)


@pytest.fixture
def seen(monkeypatch):
    """Every call that reaches cpattn from the integration: (q, k, v shapes, the keyword arguments)."""
    calls = []
    real = integration.attention_dispatch

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **mods):
        calls.append(dict(shapes=(q.shape, k.shape, v.shape), mask=attn_mask, dropout_p=dropout_p,
                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, **mods))
        return real(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, **mods)
    monkeypatch.setattr(integration, "attention_dispatch", spy)
    return calls


def _out_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)[0]
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, want):
    out, grads = got
    ref_out, ref_grads = want
    assert (out - ref_out).abs().max().item() <= 1e-5
    assert set(grads) == set(ref_grads)
    floor = 1e-2 * max(g.abs().max().item() for g in ref_grads.values())  # zero-in-exact-arithmetic gradients
    for name, g in ref_grads.items():
        assert (grads[name] - g).abs().max().item() <= 1e-5 * max(g.abs().max().item(), floor), name


@pytest.mark.parametrize("backend", [None, "_native_math"], ids=["default", "set_attention_backend"])
def test_flux_through_the_registry(seen, backend):
    model, inputs = build("flux")
    if backend:  # a member chosen with diffusers' own API is routed too
        model.set_attention_backend(backend)
    want = _out_and_grads(copy.deepcopy(model), inputs)
    with use_cpattn(), cpattn.attention_provider("_native_math"):
        got = _out_and_grads(model, inputs)
    assert len(seen) == ATTENTION_CALLS["flux"]
    assert all(c["shapes"][0][1] == 2 for c in seen), "cpattn gets (B, H, S, D): 2 heads at dim 1"
    _assert_same(got, want)


def test_unet_through_the_sdpa_shim(seen):
    model, inputs = unet()
    want = _out_and_grads(copy.deepcopy(model), inputs)
    with use_cpattn(), cpattn.attention_provider("native"):
        got = _out_and_grads(model, inputs)
    crossing = [c for c in seen if c["shapes"][1][2] == 5]  # cross-attention to the 5 text tokens
    assert len(seen) == 8 and len(crossing) == 4, [c["shapes"] for c in seen]  # down 1, mid 1, up 2 blocks
    _assert_same(got, want)


def _bshd(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _case(name):
    q, k, v = _bshd(2, 7, 4, 8, seed=0), _bshd(2, 7, 4, 8, seed=1), _bshd(2, 7, 4, 8, seed=2)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, 5:] = False
    bias = _bshd(2, 1, 7, 7, seed=3)
    cases = {
        "plain": (q, k, v, {}, {}),
        "causal": (q, k, v, dict(is_causal=True), dict(is_causal=True)),
        "scale": (q, k, v, dict(scale=0.3), dict(scale=0.3)),
        "key_mask_2d": (q, k, v, dict(attn_mask=keep), dict(attn_mask=keep[:, None, None, :])),
        "additive_4d": (q, k, v, dict(attn_mask=bias), dict(attn_mask=bias)),
        "gqa": (q, k[:, :, :2], v[:, :, :2], dict(enable_gqa=True), dict(enable_gqa=True)),
        "cross": (q, _bshd(2, 5, 4, 8, seed=4), _bshd(2, 5, 4, 8, seed=5), {}, {}),
    }
    return cases[name]


@pytest.mark.parametrize("name", ["plain", "causal", "scale", "key_mask_2d", "additive_4d", "gqa", "cross"])
def test_dispatch_arguments_and_layout(seen, name):
    """diffusers' dispatch_attention_fn on (B, S, H, D) inside use_cpattn() equals SDPA on (B, H, S, D)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    q, k, v, given, sdpa_kwargs = _case(name)
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), **sdpa_kwargs).transpose(1, 2)
    with use_cpattn(), cpattn.attention_provider("_native_math"):
        got = dispatch_attention_fn(q, k, v, **given)
    assert got.shape == q.shape
    assert (got - want).abs().max().item() <= 1e-12
    (call,) = seen
    assert call["shapes"][0] == (2, 4, 7, 8)
    assert call["is_causal"] == given.get("is_causal", False) and call["scale"] == given.get("scale")
    assert call["enable_gqa"] == given.get("enable_gqa", False)


def test_dropout_reaches_the_provider(seen):
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    q = _bshd(1, 6, 2, 8, seed=0).float()
    with use_cpattn(), cpattn.attention_provider("native"):
        dispatch_attention_fn(q, q, q, dropout_p=0.25)
    assert seen[0]["dropout_p"] == 0.25


def test_refusals_inside_the_route():
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    q = _bshd(1, 6, 2, 8, seed=0)
    with use_cpattn():
        with pytest.raises(cpattn.InvalidArgumentError, match="return_lse"):
            dispatch_attention_fn(q, q, q, attention_kwargs={"return_lse": True}, backend=AttentionBackendName.NATIVE)
        with pytest.raises(cpattn.InvalidArgumentError, match="enable_parallelism"):
            dispatch_attention_fn(q, q, q, parallel_config=object())


def test_route_nests_and_restores_after_an_error():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry

    before = (F.scaled_dot_product_attention, dict(registry._backends), dict(registry._supported_arg_names))
    with pytest.raises(RuntimeError, match="inside"):
        with use_cpattn():
            with use_cpattn():
                assert F.scaled_dot_product_attention is integration.cpattn_sdpa
            assert integration.is_routed() and F.scaled_dot_product_attention is integration.cpattn_sdpa
            assert set(registry._backends.values()) == {integration.cpattn_backend}
            raise RuntimeError("inside")
    assert not integration.is_routed()
    assert (F.scaled_dot_product_attention, registry._backends, registry._supported_arg_names) == before


def test_unet_parallelize_is_refused_by_name():
    model, _ = unet()
    with pytest.raises(UnservableModelError, match="UNet2DConditionModel") as info:
        parallelize(model, mesh=object())  # refused before the mesh is looked at
    assert "GroupNorm" in str(info.value) and "use_cpattn()" in str(info.value)
    assert not integration.is_parallelized(model)


def test_plans():
    flux, _ = build("flux")
    plan = plan_for(flux)
    assert set(plan.modules[""]) == {"hidden_states", "img_ids"}, "Flux's text stays whole: the replicated prefix"
    assert plan.prefix == "encoder_hidden_states" and "proj_out" in plan.modules
    wan, _ = build("wan")
    assert plan_for(wan).modules == wan._cp_plan, "Wan's own plan: after patchify and RoPE, at blocks.0 and rope"
    pixart, _ = build("pixart")
    assert set(plan_for(pixart).modules) == {"transformer_blocks.0", "proj_out"}
    custom = CPPlan({"proj_out": wan._cp_plan["proj_out"]})
    assert plan_for(wan, custom) is custom

    sd3, _ = build("sd3")
    plan = plan_for(sd3)  # SD3 has no _cp_plan: the integration's, its text after the image
    assert set(plan.modules) == {"transformer_blocks.0", "proj_out"}
    assert plan.suffix == "encoder_hidden_states" and plan.prefix is None

    from diffusers import DiTTransformer2DModel

    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                sample_size=8, patch_size=2, norm_num_groups=1)
    with pytest.raises(cpattn.InvalidArgumentError, match="DiTTransformer2DModel has no _cp_plan: pass plan="):
        plan_for(dit)


def test_sd35_dual_attention_is_refused():
    from diffusers import SD3Transformer2DModel

    sd35 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8,
                                 dual_attention_layers=(0,))
    with pytest.raises(cpattn.UnsupportedInputError, match="dual_attention_layers"):
        parallelize(sd35, mesh=object())


def test_parallelize_refuses_options_and_diffusers_own_cp():
    flux, _ = build("flux")
    with pytest.raises(cpattn.InvalidArgumentError, match="comes from the plan"):
        parallelize(flux, mesh=object(), cp_replicated_prefix=5)
    with pytest.raises(cpattn.InvalidArgumentError, match="cp_strategy"):
        parallelize(flux, mesh=object(), strategy="ring")
    flux._parallel_config = object()
    with pytest.raises(cpattn.InvalidArgumentError, match="enable_parallelism"):
        parallelize(flux, mesh=object())


def test_compiled_model_keeps_attention_in_its_graph():
    """torch.compile of a model inside use_cpattn(): dynamo traces it whole (no graph break), cpattn's op in the
    graph (the route reads no ContextVar on one device)."""
    model, inputs = build("wan")
    torch._dynamo.reset()
    try:
        with use_cpattn(), cpattn.attention_provider("native"):
            explain = torch._dynamo.explain(lambda **kw: model(**kw)[0])(**inputs)
    finally:
        torch._dynamo.reset()
    assert explain.graph_break_count == 0, [r.reason.splitlines()[0] for r in explain.break_reasons]
    assert "".join(str(g.graph) for g in explain.graphs).count("cpattn.attention_fwd") == ATTENTION_CALLS["wan"]
