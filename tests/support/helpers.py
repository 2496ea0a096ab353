"""Shared test utilities: random problems, the float64 reference, and dtype-aware tolerances."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from cpattn import reference_attention
from cpattn.cp.comm import CommStats
from cpattn.cp.layout import ring_positions
from cpattn.cp.mesh import Group
from cpattn.cp.ring import RingSpec

# Absolute tolerances against the float64 reference, per input dtype (outputs are O(1)).
OUT_ATOL = {torch.float64: 1e-6, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
GRAD_ATOL = {torch.float64: 1e-5, torch.float32: 2e-4, torch.bfloat16: 8e-2, torch.float16: 1e-2}


def make_qkv(b, hq, hkv, sq, sk, d, dtype=torch.float32, device="cpu", dv=None, seed=0, requires_grad=False):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(b, hq, sq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, sk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, sk, dv, generator=gen, dtype=torch.float64)
    out = [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (q, k, v)]
    return tuple(out)


def random_bool_mask(shape, seed=0, p_keep=0.7, empty_row=None):
    gen = torch.Generator().manual_seed(seed + 1000)
    mask = torch.rand(shape, generator=gen) < p_keep
    if empty_row is not None:
        mask[..., empty_row, :] = False
    return mask


def reference_with_grads(q, k, v, dout, mask=None, causal=False, scale=None):
    """float64 (out, lse, (dq, dk, dv)) of the whole problem."""
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    out, lse = reference_attention(q64, k64, v64, mask, causal, scale)
    grads = torch.autograd.grad(out, (q64, k64, v64), dout.double())
    return out.detach(), lse.detach(), grads


def ring_shards(k, v, world: int, layout: str):
    """Every rank's global positions and its (key, value) shard, as a ring is given them."""
    pos = [ring_positions(k.shape[2], world, r, layout) for r in range(world)]
    return pos, [(k[:, :, p].contiguous(), v[:, :, p].contiguous()) for p in pos]


def loopback_spec(rank: int, world: int, layout: str, total: int, channel) -> RingSpec:
    """A RingSpec for one rank's steps run alone, with `channel` (a loopback stand-in) for its transfers."""
    return RingSpec(Group(None, rank, world, "loopback"), layout, total, 60.0, CommStats(), channel_factory=channel)


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close(actual, expected, atol, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = max_err(actual, expected)
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:.3g}"


def assert_lse_close(actual, expected, atol, what="lse"):
    """LSE: same -inf pattern exactly, finite entries within atol."""
    assert actual.dtype == torch.float32, f"{what}: dtype {actual.dtype}, the contract says float32"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), f"{what}: -inf pattern differs"
    assert not torch.isposinf(actual).any(), f"{what}: +inf"
    finite = torch.isfinite(expected)
    if finite.any():
        err = (actual.double()[finite] - expected[finite]).abs().max().item()
        assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:.3g}"


def run_in_triton_interpreter(script: str, timeout: float) -> subprocess.CompletedProcess:
    """Run tests/<script> with TRITON_INTERPRET=1 in its own process (the variable must be set before Triton
    compiles anything): the Triton kernels then run on CPU tensors."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    return subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=timeout)
