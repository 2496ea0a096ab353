"""tests/gpu/gpu_check.py's case lists (the checks themselves need a GPU)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gpu"))  # tests/gpu

import gpu_check  # noqa: E402


def test_cp_cases_cover_every_head_dim_asked_for():
    """--cp-head-dims: each schedule at each head dim (80 and 104 reach FA4's padding on sm90), the autocast,
    5-D and chunked-Ulysses extras once, on the first head dim, the ring without GQA (causal, not, and at
    250 tokens per rank) once, and the ring with a replicated prefix once."""
    cases = gpu_check.cp_cases(3, ["_native_efficient", "native"], extras=True, head_dims=(128, 80, 104))
    for name in ("_native_efficient", "native"):
        mine = [c for c in cases if c.provider == name]
        mha_ring = [c for c in mine if c.strategy == "ring" and c.q_heads == c.kv_heads]
        assert sorted((c.causal, c.seq, c.head_dim, c.grad) for c in mha_ring) == [
            (False, 768, 128, True), (True, 750, 128, True), (True, 768, 128, True)]
        mine = [c for c in mine if c not in mha_ring]
        prefixed = [c for c in mine if c.prefix]
        assert [(c.strategy, c.causal, c.prefix, c.seq, c.head_dim, c.grad) for c in prefixed] == [
            ("ring", False, 64, 576, 128, True)]
        mine = [c for c in mine if not c.prefix]
        plain = [c for c in mine if c.autocast is None and c.dims == 4 and not c.head_chunks]
        schedules = {c.strategy for c in plain}
        assert schedules >= {"ulysses", "allgather"}
        assert sorted((c.head_dim, c.strategy) for c in plain) == sorted(
            (d, s) for d in (128, 80, 104) for s in schedules)
        extras = [c for c in mine if c.autocast is not None or c.dims != 4 or c.head_chunks]
        assert len(extras) == 3 and {c.head_dim for c in extras} == {128}
        (chunked,) = [c for c in extras if c.head_chunks]
        assert chunked.strategy == "ulysses" and chunked.q_heads % (3 * chunked.head_chunks) == 0
        assert chunked.kv_heads % (3 * chunked.head_chunks) == 0
        assert all(c.seq == 256 * 3 for c in mine)
    assert [c.head_dim for c in gpu_check.cp_cases(2, ["native"], extras=False)] == [128] * 3
