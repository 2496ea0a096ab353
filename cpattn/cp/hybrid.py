"""The hybrid schedule on a 2-D ('ring', 'ulysses') mesh: Ulysses inside, ring across.

The Ulysses all-to-all over the mesh's Ulysses dimension trades a ring shard's parts for a head shard of the
whole ring shard (layout.py makes the parts concatenate to it), and a ring over the ring dimension then attends
those heads over the whole sequence. So the ring's needs hold (a provider that returns a log-sum-exp and has a
backward that takes it, no dropout) and Ulysses' (a query head per Ulysses rank).
Windows, softcaps and sinks: Ulysses hands the ring its heads' sinks; the ring applies the window (the windowed
exchange over the ring dimension, cp/halo.py), the softcap in every block and the sinks once, after its merge.
This module never names a provider.
"""

from __future__ import annotations

import functools

import torch

from ..contract import AttentionCall, Provider
from .layout import local_len
from .ring import NEEDS_LSE_AND_BACKWARD, ring_attention, ring_example, ring_reasons, ring_spec
from .schedule import Agreed, KernelShape, Setup, Suggest, with_example
from .ulysses import UlyssesSpec, heads_reasons, ulysses_attention


def hybrid_ulysses_spec(cp: Setup, agreed: Agreed) -> UlyssesSpec:
    """Ulysses over the Ulysses dimension: its ranks hold the parts of one ring shard."""
    topo = cp.topology
    lengths = [local_len(agreed.total, topo.ring_size, topo.ulysses_size, topo.ring_rank, u, cp.layout)
               for u in range(topo.ulysses_size)]
    # one head chunk: each chunk would run the whole inner ring again
    return UlyssesSpec(topo.ulysses, lengths, cp.data_timeout, cp.stats, mask_per_query=agreed.mask_per_query)


class HybridSchedule:
    name = "hybrid"
    mesh_dims = 2
    takes_prefix = False
    auto_order = 0  # the one schedule of a 2-D mesh
    mask_mod_per_block = False  # Ulysses gathers the mask's rows: the ring inside gets a tensor

    def auto(self, cp: Setup, provider: Provider, call: AttentionCall) -> str | None:
        return "2-D mesh"

    def reasons(self, cp: Setup, provider: Provider, call: AttentionCall) -> list[str]:
        return ring_reasons(provider, call) + heads_reasons(call, cp.topology.ulysses_size)

    def kernel_shapes(self, cp: Setup, call: AttentionCall, total: int, lengths: list[int]) -> set[KernelShape]:
        return set()  # 2-D meshes are checked on the shard only

    def suggestion(self, provider: Provider, call: AttentionCall, suggest: Suggest | None) -> str:
        return with_example(NEEDS_LSE_AND_BACKWARD, ring_example(provider, call, suggest))

    def run(self, cp: Setup, provider: Provider, call: AttentionCall, agreed: Agreed) -> torch.Tensor:
        inner = functools.partial(ring_attention, provider, spec=ring_spec(cp, agreed.total))
        return ulysses_attention(call, hybrid_ulysses_spec(cp, agreed), inner)


HYBRID = HybridSchedule()
