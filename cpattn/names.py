"""Provider names: the one list every other spelling derives from.

`PROVIDER_TABLE` holds one row per provider: the name users pass (the public `AttentionProvider` enum's value),
an alias without the leading underscore, and the device types on which `auto` may pick it. The row order is the
order of preference: error messages suggest alternatives in it, and `auto` tries a device's providers in it.
The registry (cpattn.providers) builds one adapter per row; agreement codes and torch.compile ids are positions
in this table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class ProviderName:
    name: str
    alias: str | None = None
    auto_on: tuple[str, ...] = ()  # device types where `auto` may pick it (never a quantised kernel)


PROVIDER_TABLE: tuple[ProviderName, ...] = (
    # Fast and general first. On CUDA, FlashAttention ahead of cuDNN, cuDNN ahead of PyTorch's own flash kernel,
    # then the memory-efficient kernel and flex, math last (the kernels' throughput in benchmarks/results/).
    ProviderName("flash", auto_on=("cuda",)),
    ProviderName("_native_cudnn", "cudnn", auto_on=("cuda",)),
    ProviderName("flash_varlen", auto_on=("cuda",)),
    ProviderName("xformers"),
    ProviderName("_native_flash", "sdpa_flash", auto_on=("cuda", "cpu")),
    ProviderName("_native_efficient", "efficient", auto_on=("cuda",)),
    ProviderName("flex", auto_on=("cuda",)),
    ProviderName("native"),  # SDPA's own choice among its backends: auto chooses among them itself
    ProviderName("_native_math", "math", auto_on=("cuda", "cpu")),
    # Quantised kernels change numerics: opt-in only, never picked by auto.
    ProviderName("sage"),
    ProviderName("sage_varlen"),
    ProviderName("_sage_qk_int8_pv_fp8_cuda"),
    ProviderName("_sage_qk_int8_pv_fp8_cuda_sm90"),
    ProviderName("_sage_qk_int8_pv_fp16_cuda"),
    ProviderName("_sage_qk_int8_pv_fp16_triton"),
)

AUTO_NAME = "auto"  # a choice among the providers per call, not a kernel: no row, no enum member

ALIASES: dict[str, str] = {row.alias: row.name for row in PROVIDER_TABLE if row.alias}
CODES: dict[str, int] = {row.name: i for i, row in enumerate(PROVIDER_TABLE)}


def canonical_name(name: str) -> str:
    """The seed name for an alias (`cudnn` -> `_native_cudnn`); any other string unchanged."""
    return ALIASES.get(name, name)


def auto_order(device_type: str) -> tuple[str, ...]:
    """The providers `auto` tries on a device type, in order."""
    return tuple(row.name for row in PROVIDER_TABLE if device_type in row.auto_on)


class _ProviderNameEnum(str, enum.Enum):
    def __str__(self) -> str:  # so f-strings print the name users type
        return self.value


AttentionProvider = _ProviderNameEnum(
    "AttentionProvider", [(row.name.upper(), row.name) for row in PROVIDER_TABLE], module=__name__)
AttentionProvider.__doc__ = "The public provider names; values are the exact strings users pass."
