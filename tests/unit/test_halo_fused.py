"""cp/halo.py's fused chunks: where a chunk runs as one call, its keys laid end to end are exactly consecutive
positions that hold every key the chunk's window reaches, and no more than FUSED_KEYS chunks' worth."""

from __future__ import annotations

import itertools

import pytest

from cpattn.cp.halo import FUSED_KEYS, fused_plan, halo_plan

BANDS = [(0, 0), (1, 0), (3, 0), (2, 1), (1, 2), (5, 3), (None, 2), (9, 0), (20, 0)]


def _reach(chunk, band, total):
    left, right = band
    lo = 0 if left is None else max(0, chunk.position - left)
    hi = total if right is None else min(total, chunk.position + chunk.size + right)
    return lo, hi


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_fused_chunks_hold_exactly_consecutive_keys_covering_the_reach(layout):
    fused_seen = separate_seen = 0
    for total, world, band in itertools.product((7, 12, 16, 25, 40), (2, 3, 4), BANDS):
        plan = halo_plan(total, world, layout, band)
        for rank in range(world):
            fused = fused_plan(plan, rank, band)
            if fused is None:
                separate_seen += 1
                continue
            fused_seen += 1
            for chunk, sources in fused:
                if not sources:
                    continue
                first, last = sources[0].run, sources[-1].run
                assert all(a.run.position + a.run.size == b.run.position for a, b in zip(sources, sources[1:]))
                lo, hi = _reach(chunk, band, total)
                assert first.position <= lo and hi <= last.position + last.size, (total, world, band, rank)
                assert sum(s.run.size for s in sources) <= FUSED_KEYS * chunk.size
    assert fused_seen and separate_seen  # both routes are exercised by these shapes
