"""Joint attention with a replicated prefix: text tokens on every rank, image/video tokens sharded.

DiT-style joint attention concatenates a short text sequence (the same on every rank) with a long sharded
sequence. Treating the text as if it were sharded would count its keys W times in every softmax (a known
source of visibly wrong video). Here the prefix KV is one extra block that every rank holds locally and
never sends: each rank's queries (prefix rows and its shard's rows) attend to the prefix block once and to
the sharded KV through the ring or all-gather, and the partial results merge through their log-sum-exp.
The schedules that take a prefix (`Schedule.takes_prefix`) run it: ring.py and allgather.py.

Gradients: the prefix's output is the same on every rank; each rank's gradients for prefix inputs are its
own contribution (from the dout it was handed), so summing them over the group, as the usual gradient
all-reduce of replicated parameters does, gives the full gradient. Split a prefix dout across ranks
(e.g. dout / W on each) when the loss itself is computed redundantly on every rank.

A softcap applies to the prefix block as to every other block. Sinks join once, after the prefix block and the
sharded KV merged; each rank's share of their gradient comes from its own rows (the prefix rows' share with the
dout it was handed, as above), and the gradient all-reduce adds the shares. A window is refused: the prefix
tokens have no positions among the sharded ones.
"""

from __future__ import annotations

from ..contract import AttentionCall


def prefix_reasons(call: AttentionCall, prefix: int, schedule: str, takers: tuple[str, ...]) -> list[str]:
    """Why `call` cannot run with a `prefix`-token replicated prefix under `schedule`; `takers`: the schedules
    that take a prefix."""
    out = []
    if schedule not in takers:
        names = " or ".join(f"'{name}'" for name in takers)
        out.append(f"cp_replicated_prefix runs with cp_strategy {names}, not '{schedule}'")
    if call.is_causal or call.attn_mask is not None:
        out.append("cp_replicated_prefix (joint attention) takes no is_causal and no attn_mask")
    if call.window is not None:
        out.append(f"window={call.window} with cp_replicated_prefix (joint attention) is not supported: the "
                   "replicated prefix tokens have no place among the sharded positions a window counts in; run "
                   "the windowed attention in an attention_provider block without cp_replicated_prefix")
    if call.q_len < prefix:
        out.append(f"this rank holds {call.q_len} tokens, fewer than cp_replicated_prefix={prefix}")
    return out


def split_prefix(call: AttentionCall, prefix: int):
    """(prefix keys, prefix values, sharded keys, sharded values), each contiguous."""
    key, value = call.key, call.value
    return (key[:, :, :prefix].contiguous(), value[:, :, :prefix].contiguous(),
            key[:, :, prefix:].contiguous(), value[:, :, prefix:].contiguous())
