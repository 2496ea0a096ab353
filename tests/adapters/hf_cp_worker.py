"""Run under torchrun by tests/adapters/test_transformers.py: a tiny HF Llama, context-parallel through cpattn's SDPA patch.

    torchrun --standalone --nproc-per-node 2 tests/adapters/hf_cp_worker.py OUT.json

For each case, every rank builds the same random-weight LlamaForCausalLM (nothing downloaded), runs the whole
sequence on one device with HF's own SDPA (the reference: logits and mean-loss gradients), then the sharded
sequence with `cpattn.sdpa_patched()` under `attention_provider("native", cp_mesh=mesh)`: tokens, targets and
position ids sharded by cpattn, loss = sum of local token losses / global token count, gradients all-reduced with
SUM. Rank 0 writes {case: {logits_err, grad_err, cp_calls, error}} to OUT.json.

How the attention mask reaches SDPA matters (transformers 5.x, `masking_utils.create_causal_mask`):
* position ids that jump (the zigzag layout: rank 0 holds [0..k) and [S-k..S)) with no attention_mask and no
  cache are read as *packed sequences*: HF builds a (B, 1, S_local, S_local) mask from local positions, wrong under
  CP. cpattn refuses it loudly on every rank (the `naive` case) instead of computing something else.
* `attention_mask=ones(B, S_local)` (the `causal` setups): no padding, no packing, so HF drops the mask and calls
  SDPA with is_causal=True, which cpattn applies to global positions. The fast path (ring skips masked blocks).
* `attention_mask` = a 4-D bool (B, 1, S_local, S) mask in global key order (the `global_mask` setup): HF passes a
  4-D mask through untouched; cpattn's CP contract is exactly "local query rows x all keys". Works for any mask
  (padding, documents), at the cost of materialising it.
"""

from __future__ import annotations

import functools
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import cpattn  # noqa: E402
from rank_jobs import finish, run_jobs  # noqa: E402  (this script's folder)

SEQ, BATCH, VOCAB = 29, 2, 64  # 29 tokens: the shards are uneven (15 and 14 on 2 ranks)

CASES = {  # name: (num_key_value_heads, setup, cp_strategy)
    "mha-causal-ring": (4, "causal", "ring"),
    "gqa-causal-ring": (2, "causal", "ring"),
    "gqa-causal-ulysses": (2, "causal", "ulysses"),
    "mha-global_mask-ring": (4, "global_mask", "ring"),
    "gqa-global_mask-ring": (2, "global_mask", "ring"),
    "gqa-naive-ring": (2, "naive", "ring"),  # expected to be refused (HF's local packed-sequence mask)
}


def build_model(kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      attn_implementation="sdpa")
    torch.manual_seed(0)  # the same weights on every rank
    return LlamaForCausalLM(cfg).float()


def run_case(name, kv_heads, setup, strategy, mesh, group) -> dict:
    model = build_model(kv_heads)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    ids, targets = tokens[:, :-1], tokens[:, 1:]

    # The single-device model: HF's own SDPA on the whole sequence.
    model.zero_grad()
    ref_logits = model(input_ids=ids, use_cache=False).logits
    F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten()).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_logits = ref_logits.detach()

    # Context parallel: shard ids, targets and position ids; pick the mask setup.
    local_ids = cpattn.shard_sequence(ids, mesh, 1)
    local_targets = cpattn.shard_sequence(targets, mesh, 1)
    positions = cpattn.local_position_ids(SEQ, mesh)  # global positions of the local tokens (for RoPE)
    kwargs = dict(input_ids=local_ids, position_ids=positions.unsqueeze(0).expand(BATCH, -1), use_cache=False)
    if setup == "causal":
        kwargs["attention_mask"] = torch.ones_like(local_ids)  # "no padding": HF drops it, SDPA gets is_causal
    elif setup == "global_mask":
        allowed = positions[:, None] >= torch.arange(SEQ)[None, :]  # local rows x all keys, global order
        kwargs["attention_mask"] = allowed[None, None].expand(BATCH, 1, -1, -1)
    model.zero_grad()
    try:
        with cpattn.sdpa_patched(), cpattn.attention_provider("native", cp_mesh=mesh, cp_strategy=strategy,
                                                              cp_timeout=30) as state:
            logits = model(**kwargs).logits
            loss = F.cross_entropy(logits.flatten(0, 1), local_targets.flatten(), reduction="sum") / targets.numel()
            loss.backward()
    except cpattn.CpattnError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    for p in model.parameters():
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
    full_logits = cpattn.gather_sequence(logits.detach(), mesh, 1)
    grad_err = max(((p.grad - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-12)).item()
                   for n, p in model.named_parameters())
    return {
        "logits_err": (full_logits - ref_logits).abs().max().item(),
        "grad_err": grad_err,
        "cp_calls": state.cp.stats["calls"],
        "error": None,
    }


def main() -> int:
    out_path = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    group = mesh.get_group()
    jobs = [(name, functools.partial(run_case, name, kv_heads, setup, strategy, mesh, group))
            for name, (kv_heads, setup, strategy) in CASES.items()]
    return finish(run_jobs(jobs), out_path)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "launch"))
    from spawn import exit_rank  # why not sys.exit: see its docstring

    exit_rank(main())
