"""Which FlashAttention generation the providers run on: found lazily, the first time availability is asked.

With several installed, the GPU of the current device picks the order (sm100+: 4, 2, 3; sm90: 3, 4, 2; older:
2, 3, 4; no GPU: 3, 4, 2): the newest kernels the GPU runs first. An installed generation whose API does not
match is skipped (the provider warns, naming it) and the next one runs.
"""

from __future__ import annotations

import torch

from .binding import FlashApiError
from .fa2 import FlashAttention2
from .fa3 import FlashAttention3
from .fa4 import FlashAttention4
from .generation import Generation

INSTALL_HINT = (
    "pip install 'flash-attn>=2.6.3' --no-build-isolation (FlashAttention-2, sm80+), "
    "pip install flash-attn-4 (FlashAttention-4, sm90/sm100), or build FlashAttention-3 from "
    "flash-attention/hopper (sm90)"
)


def preferred_generations() -> tuple[type[Generation], ...]:
    """The newest kernels the current GPU runs first: FA4 on Blackwell, FA3 on Hopper, FA2 before that."""
    if not torch.cuda.is_available():
        return (FlashAttention3, FlashAttention4, FlashAttention2)
    major = torch.cuda.get_device_capability()[0]
    if major >= 10:
        return (FlashAttention4, FlashAttention2, FlashAttention3)
    if major == 9:
        return (FlashAttention3, FlashAttention4, FlashAttention2)
    return (FlashAttention2, FlashAttention3, FlashAttention4)


def find_generation(varlen: bool) -> tuple[Generation | None, list[str], list[str]]:
    """The first usable generation, the generations not installed, and those installed but unusable."""
    missing, unusable = [], []
    for kind in preferred_generations():
        try:
            return kind.load(varlen), missing, unusable
        except ModuleNotFoundError as exc:
            missing.append(str(exc))
        except FlashApiError as exc:
            unusable.append(str(exc))
    return None, missing, unusable
