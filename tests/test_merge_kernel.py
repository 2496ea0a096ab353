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
    assert re.search(r"checked 124 cases \(\d+ kernel merges in rings\), 0 failed", proc.stdout), proc.stdout[-3000:]


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
    """`for_rows` allocates nothing up front: a first block over every row is kept as it came (no copy); the
    next merge writes new float32 storage and leaves that block as it was; a merge told the result dtype writes
    it; a first block over some rows merges into out 0 / lse -inf; an accumulator that saw nothing is out 0 /
    lse -inf."""
    import torch

    from cpattn.merge import PartialAttention, merge_two

    torch.manual_seed(0)
    whole = (torch.randn(1, 6, 2, 4).bfloat16().transpose(1, 2), torch.randn(1, 2, 6))  # a kernel's layout
    kept = [t.clone() for t in whole]
    lazy, eager = PartialAttention.for_rows(1, 2, 6, 4, "cpu"), PartialAttention.empty(1, 2, 6, 4, "cpu")
    for acc in (lazy, eager):
        acc.add_rows(slice(0, 6), *whole)
    assert lazy.out is whole[0] and lazy.lse is whole[1]
    assert torch.equal(lazy.value()[0], eager.out) and torch.equal(lazy.value()[1], eager.lse)

    late = (torch.randn(1, 2, 3, 4).bfloat16(), torch.randn(1, 2, 3))
    lazy.add_rows(slice(3, 6), *late)
    assert lazy.out.dtype == torch.float32 and lazy.out.data_ptr() != whole[0].data_ptr()
    assert torch.equal(whole[0], kept[0]) and torch.equal(whole[1], kept[1])  # the kept block is never written
    want_out, want_lse = merge_two(kept[0][:, :, 3:], kept[1][:, :, 3:], *late)
    assert torch.equal(lazy.out[:, :, :3], kept[0][:, :, :3].float())
    torch.testing.assert_close(lazy.out[:, :, 3:], want_out)
    torch.testing.assert_close(lazy.lse[:, :, 3:], want_lse)

    storage = lazy.out.data_ptr()
    third = (torch.randn(1, 2, 6, 4).bfloat16(), torch.randn(1, 2, 6))
    before = lazy.value()[0].clone(), lazy.lse.clone()
    lazy.add(*third, out_dtype=torch.bfloat16)  # the last merge writes the result dtype
    out, lse = lazy.result(torch.bfloat16)
    want_out, want_lse = merge_two(*before, *third)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want_out.to(torch.bfloat16))
    assert torch.equal(lse, want_lse) and storage != out.data_ptr()

    partial = PartialAttention.for_rows(1, 2, 6, 4, "cpu")
    partial.add_rows(slice(3, 6), *late)
    out, lse = partial.value()
    assert torch.equal(out[:, :, :3], torch.zeros(1, 2, 3, 4)) and torch.isneginf(lse[:, :, :3]).all()
    torch.testing.assert_close(out[:, :, 3:], late[0].float())
    torch.testing.assert_close(lse[:, :, 3:], late[1])

    out, lse = PartialAttention.for_rows(1, 2, 6, 4, "cpu").value()
    assert out.shape == (1, 2, 6, 4) and not out.any() and torch.isneginf(lse).all() and lse.shape == (1, 2, 6)
