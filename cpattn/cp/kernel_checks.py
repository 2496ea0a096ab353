"""The provider's verdict on the lengths a schedule's kernel calls get, where they are not the shard's.

A provider's reasons can depend on lengths (a kernel that needs whole key blocks without causal, say). The
shard each rank holds is not what every schedule's kernel gets: Ulysses attends over all tokens, all-gather over
all keys (and the prefix), ring over each rank's block (and the prefix block). So a rule on lengths could pass on
the shard and fail in the kernel: a 28-token prefix and 100 tokens per rank make 128 keys on the shard and 228 in
the kernel. The schedule names those kernel shapes (`Schedule.kernel_shapes`); this module asks the provider
about them twice:

* before the ranks agree (`reasons_for_any_total`), the total is not known yet: only the reasons the provider
  gives both for W times this shard and for one token more stand. A reason about lengths names them and so
  differs between the two, and waits for the second check; the rest (dtype, head dim, gradients, ...) stands,
  so a rank that refuses for them refuses before any collective.
* after (`kernel_reasons`), with the agreed total: the exact lengths, the same on every rank, so every rank
  reaches the same verdict with no further collective.

Calls with a mask, and 2-D meshes, are checked on the shard only.
"""

from __future__ import annotations

import torch

from ..contract import AttentionCall, Provider
from .layout import local_len
from .schedule import Schedule, Setup


def reasons_for_any_total(cp: Setup, schedule: Schedule, provider: Provider, call: AttentionCall) -> list[str]:
    """The provider's reasons for `schedule`'s kernel calls that hold whatever the total length turns out to be
    (see the module docstring); the provider's reasons for the shard where the schedule's kernels get its
    lengths."""
    if call.attn_mask is not None or cp.topology.mesh_dims != 1:
        return provider.reasons(call)
    w, sharded = cp.world_size, call.q_len - cp.replicated
    shapes = [schedule.kernel_shapes(cp, call, total, [sharded]) for total in (w * sharded, w * sharded + 1)]
    if not shapes[0]:
        return provider.reasons(call)
    verdicts = [[reason for shape in sorted(of_total) for reason in provider.reasons(with_lengths(call, *shape))]
                for of_total in shapes]
    return [reason for reason in verdicts[0] if reason in verdicts[1]]


def kernel_reasons(cp: Setup, schedule: Schedule, provider: Provider, call: AttentionCall, total: int) -> list[str]:
    """What the provider says of `schedule`'s kernel calls at the agreed `total`, each reason naming the lengths
    it was given."""
    if call.attn_mask is not None or cp.topology.mesh_dims != 1:
        return []
    w = cp.world_size
    lengths = [n for n in (local_len(total, w, 1, r, 0, cp.layout) for r in range(w)) if n]
    out = []
    for q_len, kv_len, causal in sorted(schedule.kernel_shapes(cp, call, total, lengths)):
        for reason in provider.reasons(with_lengths(call, q_len, kv_len, causal)):
            text = f"its kernel gets {q_len} queries x {kv_len} keys here: {reason}"
            if text not in out:
                out.append(text)
    return out


def with_lengths(call: AttentionCall, q_len: int, kv_len: int, causal: bool) -> AttentionCall:
    """`call` with q_len queries and kv_len keys, for the providers' checks only: views of every row repeated
    (zero strides; the checks read shapes, dtypes and flags, never these values)."""
    def view(x: torch.Tensor, length: int) -> torch.Tensor:
        base = x if x.numel() else x.new_empty(x.shape[-1]).requires_grad_(x.requires_grad)
        return base.as_strided(x.shape[:2] + (length, x.shape[3]), (0, 0, 0, 1))
    return call.replace(query=view(call.query, q_len), key=view(call.key, kv_len), value=view(call.value, kv_len),
                        is_causal=causal)
