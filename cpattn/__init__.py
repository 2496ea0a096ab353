"""cpattn: one attention call over every fast kernel, on one device or context-parallel over many.

    import cpattn
    with cpattn.attention_provider("flash"):
        out = cpattn.attention_dispatch(q, k, v, is_causal=True)
"""

from .contract import AttentionCall, Capabilities, Provider
from .cp import document_mask, gather_sequence, local_position_ids, shard_sequence
from .decode import sharded_kv_attention
from .dispatch import attention_dispatch
from .state import attention_provider, current_provider
from .errors import (
    CommTimeoutError,
    CpattnError,
    InvalidArgumentError,
    NoAttentionCallError,
    ProviderUnavailableError,
    RankMismatchError,
    UnsupportedInputError,
)
from .names import AttentionProvider
from .patch import is_sdpa_patched, patch_sdpa, sdpa_patched, unpatch_sdpa
from .providers import PROVIDERS, get_provider
from .packed import (flash_varlen_attention, gather_packed, packed_attention, packed_cu_seqlens, packed_layout,
                     packed_position_ids, shard_packed)
from .reference import reference_attention

__version__ = "0.1.0"

__all__ = [
    "AttentionCall", "AttentionProvider", "Capabilities", "CommTimeoutError", "CpattnError",
    "InvalidArgumentError", "NoAttentionCallError", "PROVIDERS", "Provider", "ProviderUnavailableError", "RankMismatchError",
    "UnsupportedInputError", "attention_dispatch", "attention_provider", "current_provider", "get_provider",
    "document_mask", "flash_varlen_attention", "gather_packed", "gather_sequence", "is_sdpa_patched",
    "local_position_ids", "packed_attention", "packed_cu_seqlens", "packed_layout", "packed_position_ids",
    "patch_sdpa", "reference_attention", "sdpa_patched", "shard_packed", "shard_sequence", "sharded_kv_attention",
    "unpatch_sdpa",
]
