"""cpattn.sharded_kv_attention: new tokens against a KV cache split over gloo ranks, exact against float64 over
the whole cache, at W = 1..4 with uneven and empty slices, GQA, positions (causal), windows and sinks."""

from __future__ import annotations

import zlib

import pytest
import torch

from reliability_helpers import run_ranks

pytestmark = pytest.mark.distributed

B, HQ, HKV, D, DV = 2, 4, 2, 8, 6


def _cache(total, new, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, new, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, HKV, total, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, HKV, total, DV, generator=gen, dtype=torch.float64)
    sinks = torch.randn(HQ, generator=gen, dtype=torch.float64)
    return q, k, v, sinks


def _slices(total, lengths, striped):
    """Each rank's global key positions: consecutive runs of the given lengths, or striped (rank r holds
    positions r, r + W, ...: not consecutive)."""
    if striped:
        return [torch.arange(r, total, len(lengths)) for r in range(len(lengths))]
    bounds = torch.tensor([0] + lengths).cumsum(0).tolist()
    return [torch.arange(bounds[r], bounds[r + 1]) for r in range(len(lengths))]


CASES = [
    # (name, total keys, new tokens, per-rank lengths (None: striped), window, sinks, positions, provider)
    ("full", 11, 1, "uneven", None, False, False, "native"),
    ("causal_new8", 19, 8, "uneven", None, False, True, "native"),
    ("window", 19, 4, "uneven", (5, 0), False, True, "_native_math"),
    ("sinks_window", 19, 3, "uneven", (6, 0), True, True, "native"),
    ("striped_causal_sinks", 17, 4, "striped", (None, 0), True, True, "native"),
    ("sinks_only", 9, 2, "uneven", None, True, False, "_native_math"),
]


def _lengths(total, world, kind):
    if kind == "striped":
        return None
    if world == 1:
        return [total]
    cut = [0] * world  # one empty slice, the rest uneven
    rest = total
    for r in range(1, world):
        cut[r] = rest // 2 if r < world - 1 else rest
        rest -= cut[r]
    cut[0] += rest
    return cut


def _worker(rank, world, _):
    import cpattn
    import torch.distributed as dist

    from cpattn import decode

    checks = []  # the agreement check's all-gathers, counted
    gather = decode.gather_signatures
    decode.gather_signatures = lambda *args: checks.append(1) or gather(*args)
    out = {}
    for agree in (True, False):
        for name, total, new, kind, window, with_sinks, positions, provider in CASES:
            q, k, v, sinks = _cache(total, new, seed=zlib.crc32(name.encode()))
            lengths = _lengths(total, world, kind)
            mine = _slices(total, lengths or [0] * world, kind == "striped")[rank]
            kwargs = dict(enable_gqa=True, window=window, sinks=sinks if with_sinks else None, agree=agree)
            if positions:
                kwargs.update(query_positions=torch.arange(total - new, total), key_positions=mine)
            with cpattn.attention_provider(provider):
                got = cpattn.sharded_kv_attention(q, k[:, :, mine], v[:, :, mine], dist.group.WORLD, **kwargs)
            # plain arrays: tensors would travel through shared memory the rank frees
            out[name if agree else f"{name} agree=False"] = got.numpy()
        out[f"checks agree={agree}"] = len(checks)
        checks.clear()
    return out


def _reference(name, total, new, window, with_sinks, positions):
    from cpattn.ops.window import band_mask
    from cpattn.reference import reference_attention

    q, k, v, sinks = _cache(total, new, seed=zlib.crc32(name.encode()))
    mask = None
    if positions:
        left = None if window is None else window[0]
        mask = band_mask(torch.arange(total - new, total), torch.arange(total), (left, 0))
    return reference_attention(q, k, v, mask, sinks=sinks if with_sinks else None)[0]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_kv_attention_matches_the_whole_cache(world):
    result = run_ranks(world, _worker, timeout=120)
    for r in result.ranks:
        assert r.error is None and not r.killed, (r.rank, r.error)
    for name, total, new, kind, window, with_sinks, positions, _ in CASES:
        want = _reference(name, total, new, window, with_sinks, positions)
        for r in result.ranks:
            for key in (name, f"{name} agree=False"):
                got = torch.from_numpy(r.value[key])
                assert got.shape == want.shape and not torch.isnan(got).any()
                torch.testing.assert_close(got, want, atol=2e-6, rtol=0, msg=f"{key} rank {r.rank} of {world}")
    for r in result.ranks:  # one agreement all-gather per call where there are ranks to agree; none asked off
        assert r.value["checks agree=True"] == (len(CASES) if world > 1 else 0)
        assert r.value["checks agree=False"] == 0


def _misuse(rank, world, _):
    import cpattn
    import torch.distributed as dist

    q, k, v, _ = _cache(6, 2 + rank, seed=1)  # rank 1 passes one more new token
    errors = {}
    for name, kwargs in (("mismatch", {}), ("window_without_positions", {"window": (3, 0)}),
                         ("window_right", {"window": (3, 2), "query_positions": torch.arange(4, 6 + rank),
                                           "key_positions": torch.arange(6)})):
        try:
            cpattn.sharded_kv_attention(q, k, v, dist.group.WORLD, enable_gqa=True, **kwargs)
            errors[name] = None
        except cpattn.CpattnError as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    return errors


def test_sharded_kv_attention_refusals_name_the_cause_on_every_rank():
    result = run_ranks(2, _misuse, timeout=60)
    for r in result.ranks:
        assert r.error is None and not r.killed, (r.rank, r.error)
        errors = r.value
        assert "RankMismatchError" in errors["mismatch"] and "new tokens: rank 0: 2, rank 1: 3" in errors["mismatch"]
        assert "a window needs query_positions" in errors["window_without_positions"]
        assert "right side must be 0 or None" in errors["window_right"]
