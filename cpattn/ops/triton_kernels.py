"""Where cpattn's optional Triton kernels are loaded: once, and not at all where Triton cannot be imported."""

from __future__ import annotations

import functools
import importlib


@functools.cache
def optional_kernel(module: str, name: str):
    """`name` from cpattn.ops.<module> (a Triton kernel's wrapper), or None where Triton cannot be imported (CPU-only
    installs): the caller then does the same arithmetic in torch ops."""
    try:
        return getattr(importlib.import_module(f"cpattn.ops.{module}"), name)
    except Exception:
        return None
