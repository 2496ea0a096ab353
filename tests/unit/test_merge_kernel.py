"""The fused Triton merge (cpattn/ops/merge_kernel.py, the ring's merge on CUDA) matches `merge_two`, alone and inside
ring forwards over 2-4 loopback ranks against the float64 reference.

No GPU in CI: the kernel runs in Triton's interpreter on CPU tensors, in a subprocess because
TRITON_INTERPRET must be set before Triton compiles anything. tests/support/merge_kernel_check.py has the cases.
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
    assert re.search(r"checked 168 cases \(\d+ kernel merges in rings\), 0 failed", proc.stdout), proc.stdout[-3000:]


def test_cpu_tensors_take_the_torch_ops():
    """Off CUDA the blocks are merged by merge_two, from out 0 / lse -inf, on each block's rows."""
    import torch

    from cpattn.ops.merge import PartialAttention, merge_two

    torch.manual_seed(0)
    acc = PartialAttention(1, 2, 6, 4, "cpu")
    first = (torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6))
    late = (torch.randn(1, 2, 3, 4).bfloat16(), torch.randn(1, 2, 3))
    acc.add_rows(slice(0, 6), *first)
    acc.add_rows(slice(3, 6), *late)
    out, lse = acc.value()
    want_out, want_lse = merge_two(first[0][:, :, 3:], first[1][:, :, 3:], *late)
    assert torch.equal(out[:, :, :3], first[0][:, :, :3]) and torch.equal(lse[:, :, :3], first[1][:, :, :3])
    torch.testing.assert_close(out[:, :, 3:], want_out)
    torch.testing.assert_close(lse[:, :, 3:], want_lse)


def test_accumulator_keeps_blocks_until_the_result_and_folds_every_max_blocks():
    """A lone block over every row comes back as it came (no copy); blocks are never written; the result is
    written once in the dtype asked; MAX_BLOCKS blocks fold into float32 storage, so no more are held; a first
    block over some rows merges with out 0 / lse -inf; an accumulator that saw nothing is out 0 / lse -inf."""
    import torch

    from cpattn.ops.merge import MAX_BLOCKS, PartialAttention
    from merge_reference import merge_many

    torch.manual_seed(0)
    whole = (torch.randn(1, 6, 2, 4).bfloat16().transpose(1, 2), torch.randn(1, 2, 6))  # a kernel's layout
    acc = PartialAttention(1, 2, 6, 4, "cpu")
    acc.add(*whole)
    out, lse = acc.result(torch.bfloat16)
    assert out is whole[0] and lse is whole[1]

    blocks = [(torch.randn(1, 2, 6, 4).bfloat16(), torch.randn(1, 2, 6) * 3) for _ in range(2 * MAX_BLOCKS + 1)]
    kept = [(o.clone(), l.clone()) for o, l in blocks]
    acc = PartialAttention(1, 2, 6, 4, "cpu")
    for i, block in enumerate(blocks):
        acc.add(*block)
        assert len(acc._blocks) <= MAX_BLOCKS  # a full hand folds when one more block comes
        if i >= MAX_BLOCKS:  # folded: the float32 merge of what came before leads, this block follows
            assert acc._blocks[0][1].dtype == torch.float32 and acc._blocks[-1][1] is block[0]
        else:
            assert acc._blocks[-1][1] is block[0] and len(acc._blocks) == i + 1
    out, lse = acc.result(torch.bfloat16)
    want_out, want_lse = merge_many([o for o, _ in kept], [l for _, l in kept])
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), want_out, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse, want_lse)
    assert all(torch.equal(o, ko) and torch.equal(l, kl) for (o, l), (ko, kl) in zip(blocks, kept))

    late = (torch.randn(1, 2, 3, 4).bfloat16(), torch.randn(1, 2, 3))
    partial = PartialAttention(1, 2, 6, 4, "cpu")
    partial.add_rows(slice(3, 6), *late)
    out, lse = partial.value()
    assert torch.equal(out[:, :, :3], torch.zeros(1, 2, 3, 4)) and torch.isneginf(lse[:, :, :3]).all()
    torch.testing.assert_close(out[:, :, 3:], late[0].float())
    torch.testing.assert_close(lse[:, :, 3:], late[1])

    out, lse = PartialAttention(1, 2, 6, 4, "cpu").value()
    assert out.shape == (1, 2, 6, 4) and not out.any() and torch.isneginf(lse).all() and lse.shape == (1, 2, 6)


def test_result_written_into_the_callers_layout():
    """`result(dtype, out=view)` merges straight into `view` (a transposed view of the caller's (S, H, D)
    storage) the values `result(dtype)` gives; a lone block over every row is copied there. The packed ring's
    merge returns its one chain's kernel output itself, and with more chains the storage the merge wrote."""
    import torch

    from cpattn.cp.packed_ring import _FusedRowMerge
    from cpattn.ops.merge import PartialAttention

    torch.manual_seed(0)
    blocks = [(slice(0, 6), torch.randn(1, 2, 6, 4).bfloat16(), torch.randn(1, 2, 6)),
              (slice(2, 5), torch.randn(1, 2, 3, 4).bfloat16(), torch.randn(1, 2, 3))]
    results = []
    for into in (False, True):
        acc = PartialAttention(1, 2, 6, 4, "cpu")
        for rows, o, l in blocks:
            acc.add_rows(rows, o, l)
        storage = torch.empty(6, 2, 4, dtype=torch.bfloat16)
        out, lse = acc.result(torch.bfloat16, out=storage.transpose(0, 1).unsqueeze(0) if into else None)
        if into:
            assert out.data_ptr() == storage.data_ptr()
        results.append((out.contiguous(), lse))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])

    lone = PartialAttention(1, 2, 6, 4, "cpu")
    lone.add(blocks[0][1], blocks[0][2])
    storage = torch.empty(6, 2, 4, dtype=torch.bfloat16)
    out, _ = lone.result(torch.bfloat16, out=storage.transpose(0, 1).unsqueeze(0))
    assert torch.equal(storage.transpose(0, 1), blocks[0][1][0])

    chain_out, chain_lse = torch.randn(6, 2, 4).bfloat16(), torch.randn(2, 6)  # a kernel's (rows, heads, dim)
    merge = _FusedRowMerge(6, 2, 4, "cpu")
    merge.add(0, chain_out, chain_lse)
    out, lse = merge.result(torch.bfloat16)
    assert out.data_ptr() == chain_out.data_ptr() and out.shape == (6, 2, 4) and torch.equal(lse, chain_lse)
    merge = _FusedRowMerge(6, 2, 4, "cpu")
    before = chain_out.clone()
    merge.add(0, chain_out, chain_lse)
    merge.add(2, before[2:5] * 0.5, chain_lse[:, 2:5])
    out, lse = merge.result(torch.bfloat16)  # merged in the chain's own storage (test_merge_in_the_first_...)
    assert out.shape == (6, 2, 4) and out.is_contiguous() and out.data_ptr() == chain_out.data_ptr()
    assert torch.equal(out[:2], before[:2]) and torch.equal(out[5:], before[5:])
    assert not torch.equal(out[2:5], before[2:5])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (dev extra pins it)")
def test_decode_combine_kernels_match_merge_stacked_in_the_triton_interpreter():
    proc = run_in_triton_interpreter("packed_merge_check.py", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checked 76 cases, 0 failed" in proc.stdout, proc.stdout[-3000:]


def test_merge_in_the_first_blocks_storage():
    """`result_in_first` merges into the first block's own storage where it covers every row: the values
    `result` gives, only the rows from the other blocks' first to their last row written (a row between them
    that no other block covers keeps its values), and nothing changed where it does not apply. The packed ring
    returns that storage in its (rows, heads, dim) layout."""
    import torch

    from cpattn.cp.packed_ring import _FusedRowMerge
    from cpattn.ops.merge import PartialAttention

    torch.manual_seed(1)
    full = torch.randn(9, 2, 4).bfloat16()  # a kernel's (rows, heads, dim) output over every row
    full_lse = torch.randn(2, 9)
    others = [(2, torch.randn(2, 2, 4).bfloat16(), torch.randn(2, 2)), (6, torch.randn(2, 2, 4).bfloat16(),
                                                                          torch.randn(2, 2))]

    def filled(first_out, first_lse):
        acc = PartialAttention(1, 2, 9, 4, "cpu")
        acc.add_rows(slice(0, 9), first_out.transpose(0, 1).unsqueeze(0), first_lse.unsqueeze(0))
        for start, o, l in others:
            acc.add_rows(slice(start, start + 2), o.transpose(0, 1).unsqueeze(0), l.unsqueeze(0))
        return acc

    want_out, want_lse = filled(full.clone(), full_lse.clone()).result(torch.bfloat16)
    mine, mine_lse = full.clone(), full_lse.clone()
    got_out, got_lse = filled(mine, mine_lse).result_in_first(torch.bfloat16)
    assert got_out.data_ptr() == mine.data_ptr() and got_lse.data_ptr() == mine_lse.data_ptr()
    assert torch.equal(got_out, want_out) and torch.equal(got_lse, want_lse)
    for untouched in (slice(0, 2), slice(4, 6), slice(8, 9)):  # outside the others, or between them
        assert torch.equal(mine[untouched], full[untouched]) and torch.equal(mine_lse[:, untouched],
                                                                             full_lse[:, untouched])
    assert not torch.equal(mine[2:4], full[2:4])

    # where it does not apply: nothing held but the first block, another dtype, a first block not over every row
    lone = PartialAttention(1, 2, 9, 4, "cpu")
    lone.add(full.transpose(0, 1).unsqueeze(0), full_lse.unsqueeze(0))
    assert lone.result_in_first(torch.bfloat16) is None
    assert filled(full.clone(), full_lse.clone()).result_in_first(torch.float32) is None
    partial = PartialAttention(1, 2, 9, 4, "cpu")
    kept = full[:8].clone()
    partial.add_rows(slice(0, 8), kept.transpose(0, 1).unsqueeze(0), full_lse[:, :8].unsqueeze(0))
    partial.add_rows(slice(2, 4), others[0][1].transpose(0, 1).unsqueeze(0), others[0][2].unsqueeze(0))
    assert partial.result_in_first(torch.bfloat16) is None and torch.equal(kept, full[:8])

    merge = _FusedRowMerge(9, 2, 4, "cpu")
    chain = full.clone()
    merge.add(0, chain, full_lse.clone())
    for start, o, l in others:
        merge.add(start, o, l)
    out, lse = merge.result(torch.bfloat16)
    assert out.data_ptr() == chain.data_ptr() and out.shape == (9, 2, 4) and out.is_contiguous()
    assert torch.equal(out, want_out[0].transpose(0, 1)) and torch.equal(lse, want_lse[0])
