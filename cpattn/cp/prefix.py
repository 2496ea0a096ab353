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

A replicated suffix (`cp_replicated_suffix`: SD3 puts its text after the image tokens) is the same block at the
other end: the replicated tokens are the prefix and the suffix together, one local block whatever their place,
since non-causal attention without a mask does not depend on the order of the keys, and each query row's output
is its own. Both may be given.
"""

from __future__ import annotations

import torch

from ..contract import AttentionCall


def _option_names(prefix: int, suffix: int) -> str:
    return " and ".join(name for name, n in (("cp_replicated_prefix", prefix), ("cp_replicated_suffix", suffix)) if n)


def replicated_reasons(call: AttentionCall, prefix: int, suffix: int, schedule: str,
                       takers: tuple[str, ...]) -> list[str]:
    """Why `call` cannot run with `prefix` leading and `suffix` trailing replicated tokens under `schedule`;
    `takers`: the schedules that take them."""
    options, out = _option_names(prefix, suffix), []
    if schedule not in takers:
        names = " or ".join(f"'{name}'" for name in takers)
        out.append(f"{options} runs with cp_strategy {names}, not '{schedule}'")
    if call.is_causal or call.attn_mask is not None:
        out.append(f"{options} (joint attention) takes no is_causal and no attn_mask")
    if call.window is not None:
        out.append(f"window={call.window} with {options} (joint attention) is not supported: the "
                   "replicated tokens have no place among the sharded positions a window counts in; run "
                   f"the windowed attention in an attention_provider block without {options}")
    if call.q_len < prefix + suffix:
        out.append(f"this rank holds {call.q_len} tokens, fewer than the {prefix + suffix} replicated ones "
                   f"({options})")
    return out


def split_replicated(call: AttentionCall, prefix: int, suffix: int):
    """(replicated keys, replicated values, sharded keys, sharded values), each contiguous: the replicated
    block is the prefix's tokens followed by the suffix's."""
    end = call.kv_len - suffix
    return (*(_outside(x, prefix, end) for x in (call.key, call.value)),
            call.key[:, :, prefix:end].contiguous(), call.value[:, :, prefix:end].contiguous())


def _outside(x: torch.Tensor, prefix: int, end: int) -> torch.Tensor:
    if end == x.shape[2]:
        return x[:, :, :prefix].contiguous()
    return torch.cat([x[:, :, :prefix], x[:, :, end:]], dim=2)


def join_replicated(replicated: torch.Tensor, sharded: torch.Tensor, prefix: int) -> torch.Tensor:
    """The inverse of `split_replicated` for one tensor (a gradient): the prefix, the sharded part, the suffix."""
    return torch.cat([replicated[:, :, :prefix], sharded, replicated[:, :, prefix:]], dim=2)
