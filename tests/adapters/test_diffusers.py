"""A diffusers Flux transformer (tiny config, random weights, nothing downloaded) under context parallelism.

Flux's joint attention concatenates the text tokens (the same on every rank) in front of the image tokens (each
rank's shard) and calls F.scaled_dot_product_attention, patched to cpattn. With cp_replicated_prefix = number of
text tokens, cpattn counts the text keys once, not W times; the gathered image output and the summed parameter
gradients must match the single-device model. (cpattn.integrations.diffusers.parallelize does the same for the
unchanged model; see test_diffusers_cp.py, whose jobs run these cases too.)
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[dev]')")

TEXT, IMAGE = 5, 24  # image tokens are not divisible by 2W at W=3: uneven shards


def _model_and_inputs():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
    )
    gen = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, IMAGE, 8, generator=gen),
        encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen),
        pooled_projections=torch.randn(1, 16, generator=gen),
        timestep=torch.tensor([0.5]),
        img_ids=torch.stack([torch.zeros(IMAGE), torch.arange(IMAGE) // 6, torch.arange(IMAGE) % 6], -1).float(),
        txt_ids=torch.zeros(TEXT, 3),
    )
    dout = torch.randn(1, IMAGE, 8, generator=gen)
    return model, inputs, dout


def _single_device():
    model, inputs, dout = _model_and_inputs()
    out = model(**inputs, return_dict=False)[0]
    out.backward(dout)
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


RECIPE_CASES = {2: ("ring",), 3: ("ring", "allgather")}  # world size: strategies; run in test_diffusers_cp's jobs


def recipe_case(mesh, strategy: str) -> dict:
    """One rank's part: today's recipe (cpattn.sdpa_patched, shards made by hand) against one device."""
    import torch.distributed as dist

    import cpattn

    model, inputs, dout = _model_and_inputs()
    shard = lambda t, dim: cpattn.shard_sequence(t, mesh, dim)  # noqa: E731
    local = dict(inputs, hidden_states=shard(inputs["hidden_states"], 1), img_ids=shard(inputs["img_ids"], 0))
    with cpattn.sdpa_patched(), cpattn.attention_provider(
        "native", cp_mesh=mesh, cp_strategy=strategy, cp_replicated_prefix=TEXT
    ) as state:
        out = model(**local, return_dict=False)[0]
        out.backward(shard(dout, 1))
    full = cpattn.gather_sequence(out.detach(), mesh, 1)
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.clone()
            dist.all_reduce(g)  # replicated parameters: every rank holds a part of the gradient
            grads[name] = g
    ref_out, ref_grads = _single_device()  # plain numbers go back (tensors through a queue need the sender alive)
    return {
        "out_err": (full - ref_out).abs().max().item(),
        "same_params": set(grads) == set(ref_grads),
        "grad_rel_err": max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-6)).item()
                            for n, g in ref_grads.items()),
        "cp_calls": state.cp.stats["calls"],
    }


@pytest.mark.distributed
@pytest.mark.parametrize("world,strategy", [(w, s) for w, strategies in RECIPE_CASES.items() for s in strategies])
def test_flux_joint_attention_under_cp_matches_one_device(world, strategy):
    from test_diffusers_cp import _job  # one spawned job per world size runs every diffusers case

    value = _job(world)[f"recipe-{strategy}"]
    assert "error" not in value, value["error"]
    assert value["cp_calls"] == 2, "both attention blocks (double- and single-stream) must run context-parallel"
    assert value["out_err"] <= 1e-5, f"image output differs from one device by {value['out_err']:.3g}"
    assert value["same_params"]
    assert value["grad_rel_err"] <= 1e-4, f"parameter gradients differ (relative) by {value['grad_rel_err']:.3g}"


def test_text_counted_w_times_is_caught():
    """The mistake this guards against: treating the replicated text as if it were sharded (its keys W times)."""
    import cpattn

    q = torch.randn(1, 2, TEXT + 6, 16, dtype=torch.float64)
    once, _ = cpattn.reference_attention(q, q, q)
    twice_k = torch.cat([q[:, :, :TEXT], q], dim=2)  # text keys present twice
    twice, _ = cpattn.reference_attention(q, twice_k, twice_k)
    assert (once - twice).abs().max() > 1e-2  # so an implementation that double counted would fail the CP test
