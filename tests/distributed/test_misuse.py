"""Misuse that would otherwise be silent under context parallelism: a block whose model never reached cpattn."""

from __future__ import annotations

import pytest
import torch

from reliability_helpers import run_ranks

pytestmark = pytest.mark.distributed


def _blocks(rank, world, _payload):
    import cpattn
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    q = cpattn.shard_sequence(torch.randn(1, 2, 8, 8), mesh, 2)
    report = {}
    try:  # the model's own attention ran on the shard: every rank must hear about it
        with cpattn.attention_provider("native", cp_mesh=mesh):
            torch.nn.functional.softmax(q @ q.transpose(-1, -2), dim=-1) @ q
        report["silent"] = None
    except cpattn.NoAttentionCallError as exc:
        report["silent"] = str(exc)
    with cpattn.attention_provider("native", cp_mesh=mesh, cp_require_attention=False):
        pass  # on purpose: no error
    with cpattn.attention_provider("native", cp_mesh=mesh):
        cpattn.attention_dispatch(q, q, q, is_causal=True)  # reached cpattn: no error
    report["fine"] = True
    return report


def test_a_cp_block_without_attention_calls_raises_on_every_rank():
    result = run_ranks(2, _blocks, timeout=90)
    for r in result.ranks:
        assert r.error is None and not r.killed, (r.rank, r.error)
        message = r.value["silent"]
        assert message is not None, f"rank {r.rank} raised nothing"
        assert "without any attention call reaching cpattn" in message and "attn_implementation='cpattn'" in message
        assert "cp_require_attention=False" in message
        assert r.value["fine"]
