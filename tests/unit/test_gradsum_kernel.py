"""Gradient sums of the ring backward (cpattn/ops/gradsum.py): the torch path's semantics on CPU, and the Triton
kernel (the CUDA path) bit for bit against it, alone and inside ring backwards at 2-4 ranks.

No GPU in CI: the kernel runs in Triton's interpreter on CPU tensors, in a subprocess because TRITON_INTERPRET
must be set before Triton compiles anything. tests/support/gradsum_kernel_check.py has the cases.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from cpattn.ops import gradsum
from helpers import run_in_triton_interpreter


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (dev extra pins it)")
def test_fused_gradient_add_matches_torch_in_the_triton_interpreter():
    proc = run_in_triton_interpreter("gradsum_kernel_check.py", timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.search(r"checked 156 cases \((\d+) fused gradient adds on one rank\), 0 failed", proc.stdout)
    assert found and int(found.group(1)) > 0, proc.stdout[-3000:]


def test_row_sum_adds_its_parts_once_in_float32_on_the_torch_path():
    """CPU tensors take torch ops: a lone part over every row comes back as it is; parts on some rows add there,
    rows no part covers are 0; more than MAX_PARTS fold in float32 (later folds in place, on the rows their
    parts cover); the parts are never written; no part is zeros."""
    torch.manual_seed(0)
    whole = torch.randn(1, 2, 6, 4).bfloat16()
    alone = gradsum.DeferredRowSum(whole.shape, "cpu")
    alone.add(slice(0, 6), whole)
    assert alone.result(torch.bfloat16) is whole

    parts = [(slice(0, 6), torch.randn(1, 2, 6, 4).bfloat16()), (slice(3, 6), torch.randn(1, 2, 3, 4).bfloat16())]
    parts += [(slice(1, 3), torch.randn(1, 2, 2, 4)) for _ in range(2 * gradsum.MAX_PARTS + 1)]  # folds in place
    kept = [p.clone() for _, p in parts]
    total = gradsum.DeferredRowSum((1, 2, 6, 4), "cpu")
    want = torch.zeros(1, 2, 6, 4, dtype=torch.float64)
    for rows, part in parts:
        total.add(rows, part)
        want[:, :, rows] += part.double()
        assert len(total._parts) <= gradsum.MAX_PARTS
    got = total.result(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.is_contiguous()
    torch.testing.assert_close(got.double(), want.bfloat16().double(), atol=2e-2, rtol=1e-2)
    assert all(torch.equal(p, k) for (_, p), k in zip(parts, kept))

    partial = gradsum.DeferredRowSum((1, 2, 6, 4), "cpu")
    partial.add(slice(4, 6), whole[:, :, :2])
    got = partial.result(torch.float32)
    assert torch.equal(got[:, :, 4:], whole[:, :, :2].float()) and not got[:, :, :4].any()
    empty = gradsum.DeferredRowSum((1, 2, 6, 4), "cpu").result(torch.bfloat16)
    assert empty.dtype == torch.bfloat16 and not empty.any()


def test_finish_gives_a_contiguous_tensor_in_the_dtype_asked():
    x = torch.randn(1, 5, 2, 4).transpose(1, 2)  # (B, H, S, D) view of (B, S, H, D) storage
    for dtype in (torch.float32, torch.bfloat16):
        y = gradsum.finish(x, dtype)
        assert y.dtype == dtype and y.is_contiguous() and torch.equal(y, x.to(dtype))
    contiguous = torch.randn(2, 3)
    assert gradsum.finish(contiguous, torch.float32) is contiguous
