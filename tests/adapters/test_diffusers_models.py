"""Tiny random-weight diffusers models and their inputs, for the tests of cpattn.integrations.diffusers.

Every model is built from a config in code (nothing is downloaded), the same weights for a given seed on every
rank. Sequence lengths are chosen so that shards are uneven at 2 and 3 ranks and text lengths never equal a
shard's length (so a cross-attention that cpattn took for self-attention could not pass unnoticed). The tests
here only check that each model runs; the others import `build` and `ATTENTION_CALLS`.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[dev]')")

TEXT = 5  # text tokens (Flux's joint prefix; Wan's and PixArt's cross-attention keys)
MODELS = ("flux", "wan", "pixart", "sd3")
ATTENTION_CALLS = {"flux": 2, "wan": 4, "pixart": 4, "sd3": 2}  # attention calls of one forward
IMAGE_TOKENS = {"flux": 26, "wan": 2 * 3 * 5, "pixart": 4 * 5, "sd3": 4 * 5}


def _flux():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    gen = torch.Generator().manual_seed(1)
    n = IMAGE_TOKENS["flux"]
    inputs = dict(
        hidden_states=torch.randn(1, n, 8, generator=gen),
        encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen),
        pooled_projections=torch.randn(1, 16, generator=gen),
        timestep=torch.tensor([0.5]),
        img_ids=torch.stack([torch.zeros(n), torch.arange(n) // 6, torch.arange(n) % 6], -1).float(),
        txt_ids=torch.zeros(TEXT, 3),
        return_dict=False,
    )
    return model, inputs


def _wan():
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                  rope_max_seq_len=32)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 2, 6, 10, generator=gen),  # 2 x 3 x 5 patches
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, TEXT, 16, generator=gen),
        return_dict=False,
    )
    return model, inputs


def _pixart():
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                     caption_channels=12, norm_num_groups=1)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 8, 10, generator=gen),  # 4 x 5 patches
        encoder_hidden_states=torch.randn(1, TEXT, 12, generator=gen),
        timestep=torch.tensor([500]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )
    return model, inputs


def _sd3():
    # joint attention with the text after the image tokens (JointAttnProcessor2_0); the last block is
    # context_pre_only (its text output is dropped)
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 8, 10, generator=gen),  # 4 x 5 patches
        encoder_hidden_states=torch.randn(1, TEXT, 12, generator=gen),
        pooled_projections=torch.randn(1, 8, generator=gen),
        timestep=torch.tensor([500]),
        return_dict=False,
    )
    return model, inputs


def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                 attention_head_dim=4, norm_num_groups=4)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(sample=torch.randn(1, 4, 8, 8, generator=gen), timestep=torch.tensor([10]),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=gen), return_dict=False)
    return model, inputs


def build(name: str):
    """(model, keyword inputs of one forward), the same on every call and every rank."""
    torch.manual_seed(0)
    return {"flux": _flux, "wan": _wan, "pixart": _pixart, "sd3": _sd3, "unet": unet}[name]()


@pytest.mark.parametrize("name", MODELS + ("unet",))
def test_tiny_model_runs(name):
    model, inputs = build(name)
    out = model(**inputs)[0]
    assert torch.isfinite(out).all()
