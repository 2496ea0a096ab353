"""Gradient sums of the ring backward (cpattn/gradsum.py): the torch path's semantics on CPU, and the Triton
kernel (the CUDA path) bit for bit against it, alone and inside ring backwards at 2-4 ranks.

No GPU in CI: the kernel runs in Triton's interpreter on CPU tensors, in a subprocess because TRITON_INTERPRET
must be set before Triton compiles anything. tests/gradsum_kernel_check.py has the cases.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from cpattn import gradsum
from helpers import run_in_triton_interpreter


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (dev extra pins it)")
def test_fused_gradient_add_matches_torch_in_the_triton_interpreter():
    proc = run_in_triton_interpreter("gradsum_kernel_check.py", timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.search(r"checked 145 cases \((\d+) fused gradient adds on one rank\), 0 failed", proc.stdout)
    assert found and int(found.group(1)) > 0, proc.stdout[-3000:]


def test_a_first_part_is_kept_as_it_is_and_later_sums_are_float32():
    torch.manual_seed(0)
    first = torch.randn(1, 2, 6, 4).bfloat16()
    assert gradsum.start(first, slice(0, 6), 6) is first  # exact as it is: no copy
    partial = gradsum.start(first[:, :, :2], slice(4, 6), 6)  # covers some rows: float32 zeros elsewhere
    assert partial.dtype == torch.float32 and torch.equal(partial[:, :, 4:], first[:, :, :2].float())
    assert not partial[:, :, :4].any()
    second = torch.randn(1, 2, 3, 4).bfloat16()
    total = gradsum.add(first, slice(3, 6), second)
    want = first.float()
    want[:, :, 3:] += second.float()
    assert total.dtype == torch.float32 and torch.equal(total, want)
    assert torch.equal(first, first.clone())  # a kept first part is never written to
    again = gradsum.add(total, slice(0, 3), second)
    assert again is total  # a float32 sum is added to in place
    want[:, :, :3] += second.float()
    final = gradsum.add(total, slice(0, 6), first, torch.bfloat16)
    assert final.dtype == torch.bfloat16 and torch.equal(final, (want + first.float()).bfloat16())


def test_finish_gives_a_contiguous_tensor_in_the_dtype_asked():
    x = torch.randn(1, 5, 2, 4).transpose(1, 2)  # (B, H, S, D) view of (B, S, H, D) storage
    for dtype in (torch.float32, torch.bfloat16):
        y = gradsum.finish(x, dtype)
        assert y.dtype == dtype and y.is_contiguous() and torch.equal(y, x.to(dtype))
    contiguous = torch.randn(2, 3)
    assert gradsum.finish(contiguous, torch.float32) is contiguous
