"""Determinism: the same inputs and world size give bitwise-identical outputs and gradients, run after run, for
every provider whose capabilities declare `deterministic_backward=True` (single device and context parallel).

Not deterministic in backward (Capabilities.deterministic_backward False; all on CUDA, where dQ/dK/dV are
accumulated with atomics or split-K reductions whose order varies):

    native (CUDA: it runs cuDNN, flash or memory-efficient SDPA kernels), _native_flash (CUDA),
    _native_efficient, _native_cudnn, flash, flash_varlen, xformers

Bitwise identity holds for the same setup: world size, and on CPU the number of intra-op threads (BLAS
splits reductions by it; 1 and 2 threads may differ in the last bit). The flag is about backward; the tests
below check forward too. flash / flash_varlen become deterministic under
torch.use_deterministic_algorithms(True) (they pass deterministic=True to FlashAttention). On CPU every
provider is deterministic, and so are the schedules: ring merges blocks in a fixed order, Ulysses and
all-gather move bytes without arithmetic, and gloo's all-reduce (all-gather backward) has a fixed order for a
given world size.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

import cpattn
from helpers import make_qkv
from reliability_helpers import run_ranks

NOT_DETERMINISTIC_IN_BACKWARD = {
    ("native", "cuda"), ("_native_flash", "cuda"), ("_native_efficient", "cuda"), ("_native_cudnn", "cuda"),
    ("flash", "cuda"), ("flash_varlen", "cuda"), ("xformers", "cuda"),
}


def test_the_documented_list_is_what_providers_declare():
    declared = {(name, device) for name, p in cpattn.PROVIDERS.items() for device, caps in p.supports.items()
                if not caps.deterministic_backward}
    assert declared == NOT_DETERMINISTIC_IN_BACKWARD


def test_native_is_no_more_deterministic_than_the_kernels_it_runs():
    """`native` runs one of its block-kernel candidates: on a device where any of them is non-deterministic in
    backward, so is native."""
    native = cpattn.get_provider("native")
    for device, candidates in native._candidates.items():
        if not all(c.supports[device].deterministic_backward for c in candidates if device in c.supports):
            assert not native.supports[device].deterministic_backward, f"native on {device} claims determinism"


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _single_run(provider, dtype, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v = make_qkv(2, 4, 2, 77, 77, 32, dtype=dtype, requires_grad=provider != "flex", seed=1)
        mask = torch.rand(2, 1, 77, 77, generator=torch.Generator().manual_seed(2)) < 0.8
        with cpattn.attention_provider(provider):
            out = cpattn.attention_dispatch(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True)
        if provider == "flex":
            return _digest(out)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype))
        return _digest(out, q.grad, k.grad, v.grad)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("provider", ["native", "_native_math", "_native_flash", "flex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_device_runs_are_bitwise_identical(provider, dtype):
    assert cpattn.get_provider(provider).capabilities("cpu").deterministic_backward
    for threads in (1, 2):  # the thread count is part of the setup: BLAS splits reductions by it
        runs = {_single_run(provider, dtype, threads) for _ in range(3)}
        assert len(runs) == 1, f"{provider} {dtype}, {threads} threads: {len(runs)} different results in 3 runs"


CP_CASES = [  # (provider, schedule, layout, causal, mask)
    ("native", "ring", "zigzag", True, False),
    ("native", "ring", "contiguous", True, True),
    ("_native_math", "ring", "zigzag", False, True),
    ("native", "ulysses", "zigzag", True, True),
    ("native", "allgather", "zigzag", True, False),
    ("_native_flash", "allgather", "contiguous", False, True),
]


def _cp_digests(rank, world, repeats):
    """Every case `repeats` times in this process: digests of the gathered out and gradients, per case."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    shard = lambda t, layout: cpattn.shard_sequence(t, mesh, 2, layout)  # noqa: E731
    gather = lambda t, layout: cpattn.gather_sequence(t, mesh, 2, layout)  # noqa: E731
    digests = {}
    for provider, schedule, layout, causal, masked in CP_CASES:
        runs = []
        for _ in range(repeats):
            q, k, v = make_qkv(2, 4, 2, 29, 29, 16, seed=4)
            mask = torch.rand(2, 1, 29, 29, generator=torch.Generator().manual_seed(5)) < 0.8 if masked else None
            ql, kl, vl = (shard(t, layout).requires_grad_() for t in (q, k, v))
            dout = shard(torch.randn(2, 4, 29, 16, generator=torch.Generator().manual_seed(6)), layout)
            with cpattn.attention_provider(provider, cp_mesh=mesh, cp_strategy=schedule, cp_layout=layout):
                out = cpattn.attention_dispatch(ql, kl, vl, attn_mask=None if mask is None else shard(mask, layout),
                                                is_causal=causal, enable_gqa=True)
                out.backward(dout)
            runs.append(_digest(*(gather(t, layout) for t in (out, ql.grad, kl.grad, vl.grad))))
        digests[(provider, schedule, layout, causal, masked)] = runs
    return digests


@pytest.mark.distributed
def test_context_parallel_runs_are_bitwise_identical():
    """Two separate 2-rank worlds, each running every case twice: four bitwise-identical results per case, and
    every rank computes the same gathered result."""
    first = run_ranks(2, _cp_digests, 2, timeout=120)
    second = run_ranks(2, _cp_digests, 2, timeout=120)
    for result in (first, second):
        for r in result.ranks:
            assert not r.killed and r.error is None, f"rank {r.rank}: {r.error or 'killed'}"
    for case in first[0].value:
        runs = [d for result in (first, second) for r in result.ranks for d in r.value[case]]
        assert len(set(runs)) == 1, f"{case}: {len(set(runs))} different results over {len(runs)} runs"
