"""Run under torchrun by tests/distributed/test_compile.py: launch/model.py's TinyLM compiled with torch.compile, context-parallel.

    torchrun --standalone --nproc-per-node 2 tests/support/compile_cp_worker.py OUT.json [BACKEND]

Compares, on the sharded sequence under `attention_provider("native", cp_mesh=mesh)`, the compiled model's gathered
logits and all-reduced gradients with the eager model on the whole sequence; records the graph breaks that
torch._dynamo.explain finds under CP; and checks that one compiled model serves single-device and CP calls in
either order (the CP-context guard recompiles). Rank 0 writes the results to OUT.json.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "launch"))

import cpattn  # noqa: E402
from model import ModelConfig, TinyLM, token_loss_sum  # noqa: E402
from spawn import exit_rank  # noqa: E402

SEQ = 17  # uneven shards


def single_device(model, tokens):
    model.zero_grad()
    with cpattn.attention_provider("native"):
        logits = model(tokens, torch.arange(SEQ))
    (token_loss_sum(logits, tokens) / tokens.numel()).backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def context_parallel(model, tokens, mesh, group):
    local = cpattn.shard_sequence(tokens, mesh, 1)
    model.zero_grad()
    with cpattn.attention_provider("native", cp_mesh=mesh, cp_strategy="ring"):
        logits = model(local, cpattn.local_position_ids(SEQ, mesh))
    (token_loss_sum(logits, local) / tokens.numel()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for g in grads:
        dist.all_reduce(g, group=group)
    return cpattn.gather_sequence(logits.detach(), mesh, 1), grads


def errors(got, ref) -> dict:
    (logits, grads), (ref_logits, ref_grads) = got, ref
    return {"logits_err": (logits - ref_logits).abs().max().item(),
            "grad_err": max((g - r).abs().max().item() for g, r in zip(grads, ref_grads))}


def main() -> int:
    out_path = sys.argv[1]
    backend = sys.argv[2] if len(sys.argv) > 2 else "aot_eager"
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    group = mesh.get_group()
    torch.manual_seed(0)
    model = TinyLM(ModelConfig(dim=32, heads=4, kv_heads=2, layers=2))
    tokens = torch.randint(0, 256, (2, SEQ))
    reference = single_device(model, tokens)
    results = {"backend": backend}

    # Graph breaks under CP, as dynamo reports them.
    local = cpattn.shard_sequence(tokens, mesh, 1)
    with cpattn.attention_provider("native", cp_mesh=mesh, cp_strategy="ring"):
        explain = torch._dynamo.explain(model)(local, cpattn.local_position_ids(SEQ, mesh))
    results["graph_count"] = explain.graph_count
    results["graph_break_count"] = explain.graph_break_count
    results["break_reasons"] = sorted({r.reason.splitlines()[0] for r in explain.break_reasons})
    torch._dynamo.reset()

    compiled = torch.compile(model, backend=backend)
    results["cp"] = errors(context_parallel(compiled, tokens, mesh, group), reference)
    results["cp_again"] = errors(context_parallel(compiled, tokens, mesh, group), reference)
    results["single_after_cp"] = errors(single_device(compiled, tokens), reference)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    results["single_first"] = errors(single_device(compiled, tokens), reference)
    results["cp_after_single"] = errors(context_parallel(compiled, tokens, mesh, group), reference)

    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_rank(main())  # why not sys.exit: see its docstring
