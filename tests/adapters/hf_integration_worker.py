"""Run under torchrun by tests/adapters/test_hf_integration_cp.py: transformers models on attn_implementation="cpattn",
context-parallel over every rank, against the same model on one device with its own attention.

    torchrun --standalone --nproc-per-node W tests/adapters/hf_integration_worker.py OUT.json [WORD]

(WORD: only the cases whose names hold it.)

Each case builds, on every rank, the same random-weight model twice (cpattn, and the model's own "sdpa" or
"eager"), runs the whole batch through the reference on one device (logits, mean loss, gradients), then the
training step as a user writes it under a mesh: shard_batch, the model, cp_loss, backward, all_reduce_grads.
Rank 0 writes {case: {logits_err, loss_err, grad_err, cp_calls, rank_errors}} to OUT.json. Cases named
"refuse-*" expect every rank to raise; their rank_errors hold each rank's error.
"""

from __future__ import annotations

import functools
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import cpattn  # noqa: E402
from rank_jobs import finish, run_jobs  # noqa: E402
from cpattn.integrations.transformers import all_reduce_grads, cp_loss, shard_batch  # noqa: E402
import hf_models  # noqa: E402

PROVIDER = "math"  # on CPU the one provider with windows, softcap and sinks, forward and backward

CASES = {  # name: (model, batch kind, cp_strategy[, cp_layout])
    "llama-plain-ring": ("llama", "plain", "ring"),
    "llama-plain-ulysses": ("llama", "plain", "ulysses"),
    "llama-padded-ring": ("llama", "padded", "ring"),
    "llama-packed-ring": ("llama", "packed", "ring"),
    "qwen3-plain-ring": ("qwen3", "plain", "ring"),
    "mistral-plain-ring": ("mistral", "plain", "ring"),
    "gemma2-plain-ring": ("gemma2", "plain", "ring"),
    "gemma3-plain-ring": ("gemma3", "plain", "ring"),
    "gpt_oss-plain-ring": ("gpt_oss", "plain", "ring"),
    "whisper-plain-ring": ("whisper", "plain", "ring"),
    "gemma2-plain-ulysses": ("gemma2", "plain", "ulysses"),
    "gpt_oss-padded-allgather": ("gpt_oss", "padded", "allgather"),
    "llama-packed-ring-contiguous": ("llama", "packed", "ring", "contiguous"),
    # gradient checkpointing, the backward (and so the recomputation) outside the attention_provider block
    "llama-checkpointing-ring": ("llama", "plain", "ring", "zigzag", True),
    # one packed row sharded by documents (shard_batch(..., layout="documents")): the packed ring in every layer
    "llama-collated-documents": ("llama", "collated", "auto", "documents"),
    "gemma2-documents-documents": ("gemma2", "documents", "auto", "documents"),
    "gpt_oss-collated-documents": ("gpt_oss", "collated", "ring", "documents"),
    "llama-collated-documents-checkpointing": ("llama", "collated", "auto", "documents", True),
    # on a 2 x 2 (ring, ulysses) mesh: the hybrid schedule around the packed ring; run where W = 4 only
    "llama-collated-documents-2x2": ("llama", "collated", "auto", "documents", False, (2, 2)),
}
MESH_SHAPES = {name: spec[5] for name, spec in CASES.items() if len(spec) > 5}
REFUSALS = {  # name: (model, what is wrong); run on more than one rank only
    "refuse-t5-position_bias": ("t5", None),
    "refuse-bart-positions_from_length": ("bart", None),
    "refuse-llama-forgotten_positions": ("llama", "positions"),
    "refuse-llama-no_attention_mask": ("llama", "mask"),
    "refuse-llama-local_4d_mask": ("llama", "local_mask"),
    # a collated row sharded by position, its cu_seq_lens_q put back: the attention would take it as documents
    "refuse-llama-documents_by_position": ("llama", "documents_by_position"),
}


def reference(model, batch: dict, causal_lm: bool):
    model.zero_grad()
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    loss = hf_models.reference_loss(logits, batch["labels"], causal_lm)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads


def reference_per_document(model, batch: dict):
    """One packed row's logits, mean loss and gradients with every document run on its own: what packing means
    (transformers' own packed masks are not always it: gpt-oss builds its masks without the position ids, so its
    packed row attends across documents on one device)."""
    model.zero_grad()
    logits, total, count, start = [], 0.0, 0, 0
    for n in hf_models.DOCUMENTS:
        ids, labels = (batch[k][:, start:start + n] for k in ("input_ids", "labels"))
        start += n
        out = model(input_ids=ids, position_ids=torch.arange(n)[None], use_cache=False).logits
        targets = labels[:, 1:]
        total = total + torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), targets.flatten(),
                                                          ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
        logits.append(out.detach())
    # the whole row's last-token shift also drops each document's last target (the next document's first
    # token, its label ignored), so the per-document count is the row's
    loss = total / count
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(logits, dim=1), loss.detach(), grads


def run_case(model_name: str, kind: str, strategy: str, layout: str = "zigzag", checkpointing: bool = False,
             shape: tuple | None = None, *, mesh) -> dict:
    if shape is not None:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("ring", "ulysses"))
    causal_lm = model_name not in hf_models.ENCODER_DECODER
    full = hf_models.batch(model_name, kind)
    ref_model = hf_models.build(model_name, hf_models.reference_implementation(model_name))
    if kind in ("documents", "collated"):
        ref_logits, ref_loss, ref_grads = reference_per_document(ref_model, full)
    else:
        ref_logits, ref_loss, ref_grads = reference(ref_model, full, causal_lm)

    model = hf_models.build(model_name, "cpattn")
    if checkpointing:  # recomputes each layer in the backward; the tiny models have no dropout to train
        model.train()
        model.gradient_checkpointing_enable()
    documents = layout == "documents"  # a layout of shard_batch's only: the block's stays the default
    with cpattn.attention_provider(PROVIDER, cp_mesh=mesh, cp_strategy=strategy,
                                   cp_layout="zigzag" if documents else layout, cp_timeout=30) as state:
        batch = shard_batch(full, mesh, layout="documents") if documents else shard_batch(full, mesh)
        out = model(**batch, use_cache=False)
        loss = cp_loss(out.logits, batch["labels"], mesh)
        if not checkpointing:
            loss.backward()
    if checkpointing:  # as on CUDA, where autograd's device threads never see the block
        loss.backward()
        assert state.cp.world_size == 1 or state.cp.stats["calls"] == 4, "2 layers, forward and recomputed"
    all_reduce_grads(model, mesh)
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)  # over the world: every rank's share
    if documents:
        logits = cpattn.packed.gather_packed(out.logits.detach(), batch["cu_seq_lens_q"], mesh, 1)
    else:
        logits = cpattn.gather_sequence(out.logits.detach(), mesh, 1, layout)
    if kind == "padded":  # padding rows carry no loss and feed no other token: compare the real tokens
        real = full["attention_mask"].bool()
        logits_err = (logits - ref_logits)[real].abs().max().item()
    else:
        logits_err = (logits - ref_logits).abs().max().item()
    result = {
        "logits_err": logits_err,
        "loss_err": abs(global_loss.item() - ref_loss.item()),
        "grad_err": max(((p.grad - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-12)).item()
                        for n, p in model.named_parameters() if n in ref_grads),
        "cp_calls": state.cp.stats["calls"],
    }
    if causal_lm:  # transformers' own causal-LM loss on a shard_batch batch is this rank's share
        own = out.loss.detach().clone()
        dist.all_reduce(own)
        result["model_loss_err"] = abs(own.item() - ref_loss.item())
    return result


def run_refusal(model_name: str, fault: str | None, *, mesh) -> dict:
    model = hf_models.build(model_name, "cpattn")
    if fault == "documents_by_position":
        full = hf_models.batch(model_name, "collated")
        batch = {**shard_batch(full, mesh), **{k: full[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k")}}
    else:
        batch = shard_batch(hf_models.batch(model_name), mesh)
    batch.pop("labels", None)
    provider = "native" if model_name == "t5" else PROVIDER  # T5's learned bias needs gradients through the mask
    if fault == "positions":
        batch.pop("position_ids")
    elif fault == "mask":  # without a cache transformers reads the zigzag positions as packed sequences
        batch.pop("attention_mask")
        batch["use_cache"] = False
    elif fault == "local_mask":  # the causal mask of this rank's tokens alone
        n = batch["input_ids"].shape[1]
        batch["attention_mask"] = torch.ones(n, n, dtype=torch.bool).tril()[None, None].expand(2, 1, n, n)
    with cpattn.attention_provider(provider, cp_mesh=mesh, cp_strategy="ring", cp_timeout=30,
                                   cp_require_attention=False):
        model(**batch)
    return {}


def main() -> int:
    out_path = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    word = sys.argv[2] if len(sys.argv) > 2 else ""
    jobs = [(name, functools.partial(run_case, *spec, mesh=mesh)) for name, spec in CASES.items()
            if name not in MESH_SHAPES or MESH_SHAPES[name][0] * MESH_SHAPES[name][1] == world]
    if world > 1:
        jobs += [(name, functools.partial(run_refusal, *spec, mesh=mesh)) for name, spec in REFUSALS.items()]
    return finish(run_jobs([(name, job) for name, job in jobs if word in name]), out_path)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    from spawn import exit_rank  # why not sys.exit: see its docstring

    exit_rank(main())
