"""The fused Triton merge (cpattn/merge_kernel.py, the ring's merge on CUDA) matches `merge_two`, alone and inside
ring forwards over 2-4 loopback ranks against the float64 reference.

No GPU in CI: the kernel runs in Triton's interpreter on CPU tensors, in a subprocess because
TRITON_INTERPRET must be set before Triton compiles anything. tests/merge_kernel_check.py has the cases.
"""

from __future__ import annotations

import importlib.util
import re

import pytest

from helpers import run_in_triton_interpreter


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (dev extra pins it)")
def test_fused_merge_matches_merge_two_in_the_triton_interpreter():
    proc = run_in_triton_interpreter("merge_kernel_check.py", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"checked 52 cases \(\d+ kernel merges in rings\), 0 failed", proc.stdout), proc.stdout[-3000:]


def test_cpu_tensors_take_the_torch_ops():
    """Off CUDA the accumulator is merged by merge_two and written into the row-slice views in place."""
    import torch

    from cpattn.merge import PartialAttention, merge_two

    torch.manual_seed(0)
    acc = PartialAttention.empty(1, 2, 6, 4, "cpu")
    first = (torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6))
    acc.add_rows(slice(0, 6), *first)
    late = (torch.randn(1, 2, 3, 4).bfloat16(), torch.randn(1, 2, 3))
    storage = acc.out.data_ptr()
    acc.add_rows(slice(3, 6), *late)
    want_out, want_lse = merge_two(first[0][:, :, 3:], first[1][:, :, 3:], *late)
    assert acc.out.data_ptr() == storage
    torch.testing.assert_close(acc.out[:, :, :3], first[0][:, :, :3])
    torch.testing.assert_close(acc.out[:, :, 3:], want_out)
    torch.testing.assert_close(acc.lse[:, :, 3:], want_lse)


def test_accumulator_for_rows_starts_from_its_first_block():
    """`for_rows` allocates nothing up front: a first block over every row is copied (bitwise what merging into
    out 0 / lse -inf gives, and never aliased), a first block over some rows merges into out 0 / lse -inf, and
    an accumulator that saw nothing is out 0 / lse -inf."""
    import torch

    from cpattn.merge import PartialAttention

    torch.manual_seed(0)
    whole = (torch.randn(1, 2, 6, 4).bfloat16(), torch.randn(1, 2, 6))
    lazy, eager = PartialAttention.for_rows(1, 2, 6, 4, "cpu"), PartialAttention.empty(1, 2, 6, 4, "cpu")
    for acc in (lazy, eager):
        acc.add_rows(slice(0, 6), *whole)
    assert lazy.out.dtype == torch.float32 and lazy.out.is_contiguous()
    assert lazy.lse.data_ptr() != whole[1].data_ptr()  # a copy: the block's storage may be reused
    assert torch.equal(lazy.out, eager.out) and torch.equal(lazy.lse, eager.lse)

    late = (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3))
    partial = PartialAttention.for_rows(1, 2, 6, 4, "cpu")
    partial.add_rows(slice(3, 6), *late)
    out, lse = partial.value()
    assert torch.equal(out[:, :, :3], torch.zeros(1, 2, 3, 4)) and torch.isneginf(lse[:, :, :3]).all()
    torch.testing.assert_close(out[:, :, 3:], late[0])
    torch.testing.assert_close(lse[:, :, 3:], late[1])

    out, lse = PartialAttention.for_rows(1, 2, 6, 4, "cpu").value()
    assert out.shape == (1, 2, 6, 4) and not out.any() and torch.isneginf(lse).all() and lse.shape == (1, 2, 6)
