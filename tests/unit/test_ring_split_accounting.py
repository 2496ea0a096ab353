"""benchmarks/ring_split_accounting.py's pure parts: which blocks a zigzag ring computes, and which category a
kernel's name puts it in (the GPU timing itself runs only on a GPU)."""

from __future__ import annotations

import pytest

from benchmarks.ring_split_accounting import block_shapes, category


def test_zigzag_blocks_at_four_ranks():
    # each rank: its diagonal block causal, and a half block per other rank (all queries x the source's early
    # chunk when the source is earlier, my late chunk x all its keys when it is later)
    assert block_shapes(64, 4) == {(16, 16, True): 4, (16, 8, False): 6, (8, 16, False): 6}


@pytest.mark.parametrize("s, p", [(64, 2), (64, 4), (96, 3), (128, 8)])
def test_zigzag_blocks_cover_the_causal_work_once(s, p):
    work = sum(rows * keys * (0.5 if causal else 1.0) * n for (rows, keys, causal), n in block_shapes(s, p).items())
    assert work == s * s / 2


def test_contiguous_blocks_and_noncausal_blocks():
    assert block_shapes(64, 4, "contiguous") == {(16, 16, True): 4, (16, 16, False): 6}
    assert block_shapes(64, 4, causal=False) == {(16, 16, False): 16}


@pytest.mark.parametrize("name, expected", [
    ("kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object_at__ten", "attention forward"),
    ("kernel_cutlass_kernel_flash_attncuteflash_bwd_sm90FlashAttentionBackwardSm90_object_at__te", "attention backward"),
    ("kernel_cutlass_kernel_flash_attncuteflash_bwd_preprocessFlashAttentionBackwardPreprocess_o", "provider other"),
    ("kernel_cutlass_kernel_flash_attncuteflash_bwd_postprocessFlashAttentionBackwardPostprocess", "provider other"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128", "attention forward"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_1_64x128x128", "attention backward"),
    ("void cudnn::fusion::compute_dot_do_o_kernel", "provider other"),
    ("void cudnn::fusion::convert_dq_to_16bits", "provider other"),
    ("_merge_blocks", "merge"),
    ("_add_parts", "gradient sums"),
    ("Memcpy DtoD (Device -> Device)", "copies and elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, ...>", "copies and elementwise"),
    ("ncclDevKernel_SendRecv", "other"),
])
def test_kernel_categories(name, expected):
    assert category(name) == expected
