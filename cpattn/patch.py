"""Replace torch.nn.functional.scaled_dot_product_attention with `attention_dispatch`, and put it back."""

from __future__ import annotations

import contextlib

import torch.nn.functional as F

from .dispatch import attention_dispatch

_ORIGINAL_SDPA = F.scaled_dot_product_attention


def patch_sdpa() -> None:
    """Route every F.scaled_dot_product_attention call (e.g. inside transformers or diffusers) to cpattn.

    The `native` provider calls PyTorch's C entry point directly, so patching never recurses.
    """
    F.scaled_dot_product_attention = attention_dispatch


def unpatch_sdpa() -> None:
    F.scaled_dot_product_attention = _ORIGINAL_SDPA


def is_sdpa_patched() -> bool:
    return F.scaled_dot_product_attention is attention_dispatch


@contextlib.contextmanager
def sdpa_patched():
    """`with sdpa_patched(): model(...)` patches for the block and restores what was there before."""
    previous = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = attention_dispatch
    try:
        yield
    finally:
        F.scaled_dot_product_attention = previous
