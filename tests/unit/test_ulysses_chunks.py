"""How many head chunks Ulysses pipelines: only where each chunk's transfer stays large, and only without
gradients, whose backward transfers would not overlap (cpattn/cp/ulysses.py)."""

from __future__ import annotations

import pytest
import torch

from cpattn.cp.ulysses import MIN_CHUNK_BYTES, head_chunks_for
from cpattn.call import make_call


@pytest.mark.parametrize("total,heads,world,dtype,want", [
    (131072, 16, 2, torch.bfloat16, 4),  # 256 MiB of q per rank: four 64 MiB chunks
    (32768, 32, 2, torch.bfloat16, 2),  # 128 MiB
    (32768, 16, 2, torch.bfloat16, 1),  # 64 MiB: halves would fall under the floor
    (131072, 16, 2, torch.float32, 4),  # 512 MiB: no more than four
    (4096, 8, 4, torch.bfloat16, 1),
])
def test_chunks_only_where_each_stays_large(total, heads, world, dtype, want):
    q = torch.empty(1, heads, total // world, 128, dtype=dtype, device="meta")
    call = make_call(q, q, q, None, 0.0, False, None, False)
    chunks = head_chunks_for(call, total, world)
    assert chunks == want
    assert chunks == 1 or q.numel() * q.element_size() // chunks >= MIN_CHUNK_BYTES


def test_no_chunks_when_gradients_are_needed():
    q = torch.empty(1, 16, 65536, 128, dtype=torch.bfloat16, device="meta")
    with_grad = q.clone().requires_grad_()
    assert head_chunks_for(make_call(q, q, q, None, 0.0, False, None, False), 131072, 2) == 4
    assert head_chunks_for(make_call(with_grad, q, q, None, 0.0, False, None, False), 131072, 2) == 1
