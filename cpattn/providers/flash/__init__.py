"""FlashAttention: `flash` (fixed-length batches) and `flash_varlen` (key padding, packed sequences).

Generations
    Both providers run on whichever FlashAttention generation is installed, found lazily the first time
    availability is asked (never at ``import cpattn``):

    * FlashAttention-2: ``flash_attn`` >= 2.6.3 (``pip install flash-attn``), sm80 and newer (fa2.py).
    * FlashAttention-3: module ``flash_attn_interface`` (built from flash-attention/hopper), sm90 (fa3.py).
    * FlashAttention-4: ``flash_attn.cute`` (``pip install flash-attn-4``), CuTe-DSL kernels, sm90/sm100 (fa4.py).

    generation_choice.py picks the order by GPU; an installed generation whose API does not match is skipped with
    a warning. ``Availability.version`` says which one was found, e.g. ``"flash-attn-2 2.7.4"``.

Private API
    The contract's forward/backward need the log-sum-exp and a backward that takes an external (out, lse); only
    the libraries' private functions give both, and their parameters changed between releases: binding.py binds
    them by parameter name and refuses a generation whose API changed, naming the function and the parameter.
    FA4 on sm90 goes one level lower where it can, for host time only: its forward kernel is compiled per shape
    class and called directly (fa4_sm90_forward.py), and its three backward kernels are launched one by one, for
    one call or around one dQ accumulator per ring rank (fa4_sm90_backward.py); both only on the releases they
    were checked against, with an environment override (fa4_release_window.py, CPATTN_FA4_FAST_PATHS).
    `fast_path_status(PROVIDERS["flash"])` says which path runs and why (``python -m cpattn info`` prints it).

Score modifications
    Windows and softcaps run natively on every generation, sinks natively on FA4 (`learnable_sink`, where its
    backward returns their gradient) and through the log-sum-exp on FA2/FA3 (score_mods.py). A call's top-left
    band reaches the kernels shifted to their bottom-right corner; one whose side would turn negative there is
    refused, as is a generation whose functions lack a parameter (binding.FEATURES, named in the reason). The
    sm90 fast paths take only calls without them.

Layout
    (B, H, S, D) inputs reach the kernels as (B, S, H, D) transpose views, head dims zero-padded where the
    kernels need it; flash_varlen unpads keys into cu_seqlens (layout.py). The providers themselves are in
    adapters.py, FA4's one-node training path in autograd_node.py.

Packed sequences
    The public packed API `flash_varlen_attention` lives in `cpattn.packed` (it reads the dispatcher's
    context-parallel state); it runs `FlashVarlen.packed_attention` with a `Packing`.

Testing without a GPU
    A module that sets ``__cpattn_standin_devices__`` declares itself a stand-in (see
    tests/support/standins/flash_attn_standin.py); only then do these adapters also accept the devices it lists, so
    the glue can be tested on CPU. Real FlashAttention modules never set it.
"""

from __future__ import annotations

from .._libs import STANDIN_DEVICES_ATTR
from .adapters import Flash, FlashFamily, FlashVarlen, make_providers
from .binding import FlashApiError
from .fa2 import FlashAttention2
from .fa3 import FlashAttention3
from .fa4 import FastPathStatus, FlashAttention4, fast_path_status
from .generation import Generation
from .layout import HEAD_DIM_ALIGN, Packing, PaddedBatch, align_head_dim

__all__ = [
    "HEAD_DIM_ALIGN", "STANDIN_DEVICES_ATTR", "FastPathStatus", "Flash", "FlashApiError", "FlashAttention2",
    "FlashAttention3", "FlashAttention4", "FlashFamily", "FlashVarlen", "Generation", "Packing", "PaddedBatch",
    "align_head_dim", "fast_path_status", "make_providers",
]
