"""Fine-tune a transformers causal LM with context parallelism, through attn_implementation="cpattn".

    torchrun --standalone --nproc-per-node 2 launch/finetune_hf.py --cp 2    # gloo on CPU, NCCL on GPUs
    python launch/finetune_hf.py --cp 2                                      # same, spawning the ranks itself
    python launch/finetune_hf.py --cp 2 --model mistral --steps 50          # another tiny architecture
    python launch/finetune_hf.py --cp 4 --packed --model gpt_oss            # one packed row, by documents
    torchrun --nproc-per-node 8 launch/finetune_hf.py --cp 8 --pretrained /path/to/checkpoint --seq 32768

The model is a tiny random-weight one built from a config (nothing is downloaded) unless --pretrained names a
local checkpoint. Every rank draws the same full batch and trains on its shard of each sequence, the step
written as on one device (see cpattn.integrations.transformers):

    with cpattn.attention_provider(provider, cp_mesh=mesh):
        batch = shard_batch(full_batch, mesh)
        model(**batch).loss.backward()            # this rank's share of the mean loss
    all_reduce_grads(model, mesh)                 # SUM over the mesh: the gradients of one process

With --packed, each step's batch is one row of documents of random lengths (as transformers'
DataCollatorWithFlattening packs them: position ids restarting at 0, cu_seq_lens_q, each document's first label
ignored), sharded with shard_batch(full_batch, mesh, layout="documents"): every layer runs the packed ring.

With --check, every rank also trains a copy of the model on the whole batch with its own attention (one
device) in lockstep, and the summary gives the largest difference of the two loss curves (with --packed the
copy runs each document on its own: what packing means, which some models' own packed masks are not).
Rank 0 shows a progress bar and prints one summary line at the end.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from spawn import init_cp_world  # noqa: E402

import cpattn  # noqa: E402
from cpattn.integrations.transformers import all_reduce_grads, shard_batch  # noqa: E402

IGNORE = -100
TINY = {  # name: (config class, model class, config arguments beyond the common ones)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": 16, "head_dim": 16}),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {"sliding_window": 16, "head_dim": 16, "num_local_experts": 4,
                                                      "num_experts_per_tok": 2,
                                                      "rope_parameters": {"rope_type": "default",
                                                                          "rope_theta": 10000.0}}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", type=int, default=None, help="context-parallel ranks (default: the world size); "
                   "with plain python, the ranks to spawn")
    p.add_argument("--model", choices=sorted(TINY), default="llama", help="tiny architecture built from a config")
    p.add_argument("--pretrained", default=None, help="a local checkpoint directory instead of a tiny model")
    p.add_argument("--provider", default="auto")
    p.add_argument("--schedule", default="auto", choices=("auto", "ring", "ulysses", "allgather"))
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence (any length)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--packed", action="store_true", help="one row of --batch x --seq tokens in documents of random "
                   "lengths, sharded by documents")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="train a one-device copy in lockstep and compare losses")
    return p.parse_args(argv)


def build_model(args, device):
    import transformers

    torch.manual_seed(args.seed)  # the same weights on every rank
    if args.pretrained:
        return transformers.AutoModelForCausalLM.from_pretrained(args.pretrained, attn_implementation="cpattn",
                                                                 torch_dtype=torch.float32).to(device)
    config_name, model_name, extra = TINY[args.model]
    config = getattr(transformers, config_name)(**{
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": max(2 * args.seq, 128),
        **extra})
    config._attn_implementation = "cpattn"  # what from_pretrained(attn_implementation="cpattn") sets
    return getattr(transformers, model_name)(config).to(device)


def one_device_copy(model):
    """The same weights on the model's own attention (SDPA where it has it), for --check."""
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa" if type(model)._supports_sdpa else "eager")
    return reference


class RepeatData:
    """Rows of a random segment repeated to the row's length: the repeats are predictable only by attending
    back across the sequence, so across shards. One generator seeded alike on every rank: the same batches."""

    def __init__(self, vocab: int, seq: int, batch: int, seed: int, device):
        self.vocab, self.seq, self.batch, self.device = vocab, seq, batch, device
        self.gen = torch.Generator().manual_seed(seed + 1)

    def next_batch(self) -> dict:
        rows = []
        for _ in range(self.batch):
            period = int(torch.randint(self.seq // 8 + 1, self.seq // 3 + 2, (1,), generator=self.gen))
            segment = torch.randint(0, self.vocab, (period,), generator=self.gen)
            rows.append(segment.repeat(self.seq // period + 1)[: self.seq])
        ids = torch.stack(rows).to(self.device)
        return {"input_ids": ids, "labels": ids.clone()}


class PackedData(RepeatData):
    """One row of documents of random lengths (2 to 2 --seq tokens), --batch x --seq tokens in all, each a
    repeated segment, packed as DataCollatorWithFlattening(return_flash_attn_kwargs=True) packs them."""

    def next_batch(self) -> dict:
        total, lengths = self.seq * self.batch, []
        while sum(lengths) < total:
            lengths.append(min(total - sum(lengths), int(torch.randint(2, 2 * self.seq + 1, (1,), generator=self.gen))))
        ids, labels = [], []
        for n in lengths:
            period = int(torch.randint(max(1, n // 8), max(2, n // 3 + 1), (1,), generator=self.gen))
            doc = torch.randint(0, self.vocab, (period,), generator=self.gen).repeat(n // period + 1)[:n]
            ids.append(doc)
            labels.append(torch.cat([torch.tensor([IGNORE]), doc[1:]]))  # a document's first token: no target
        cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        return {"input_ids": torch.cat(ids)[None].to(self.device), "labels": torch.cat(labels)[None].to(self.device),
                "position_ids": torch.cat([torch.arange(n) for n in lengths])[None].to(self.device),
                "cu_seq_lens_q": cu.to(self.device), "cu_seq_lens_k": cu.to(self.device),
                "max_length_q": max(lengths), "max_length_k": max(lengths)}


def train_step(model, opt, full: dict, mesh, args) -> float:
    """One step under the mesh; returns the global mean loss."""
    opt.zero_grad(set_to_none=True)
    with cpattn.attention_provider(args.provider, cp_mesh=mesh, cp_strategy=args.schedule):
        batch = shard_batch(full, mesh, layout="documents" if args.packed else None)
        loss = model(**batch, use_cache=False).loss  # this rank's share: local sum over the global count
        loss.backward()
    all_reduce_grads(model, mesh)
    opt.step()
    total = loss.detach().double()
    dist.all_reduce(total, group=mesh.get_group())  # the shares add up to the mean loss
    return total.item()


def reference_step(model, opt, full: dict) -> float:
    opt.zero_grad(set_to_none=True)
    loss = model(**full, use_cache=False).loss if "cu_seq_lens_q" not in full else per_document_loss(model, full)
    loss.backward()
    opt.step()
    return loss.item()


def per_document_loss(model, full: dict) -> torch.Tensor:
    """The packed row's mean token loss with every document run on its own."""
    bounds = full["cu_seq_lens_q"].tolist()
    total, count = 0.0, 0
    for a, b in zip(bounds, bounds[1:]):
        logits = model(input_ids=full["input_ids"][:, a:b], use_cache=False).logits[:, :-1]
        targets = full["labels"][:, a + 1:b]
        total = total + torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                                          ignore_index=IGNORE, reduction="sum")
        count += int((targets != IGNORE).sum())
    return total / count


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device, mesh = init_cp_world(args.cp, args.device)

    model = build_model(args, device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    reference = one_device_copy(model) if args.check else None
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=args.lr) if reference is not None else None
    data = (PackedData if args.packed else RepeatData)(model.config.vocab_size, args.seq, args.batch, args.seed,
                                                        device)

    from tqdm import tqdm

    losses, diffs = [], []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"finetune cp={world}", disable=rank != 0, file=sys.stderr)
    for _ in bar:
        full = data.next_batch()  # the same full batch on every rank
        losses.append(train_step(model, opt, full, mesh, args))
        if reference is not None:
            diffs.append(abs(losses[-1] - reference_step(reference, ref_opt, full)))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    elapsed = time.perf_counter() - start
    if rank == 0:
        name = args.pretrained or f"{args.model} (tiny)"
        params = sum(p.numel() for p in model.parameters())
        parity = f"; max |loss - one device| {max(diffs):.1e}" if diffs else ""
        shape = f"1x{args.batch * args.seq} packed" if args.packed else f"{args.batch}x{args.seq}"
        print(f"finetune_hf: {name}, {params / 1e6:.2f}M params, cp={world} ({dist.get_backend()} on {device.type}), "
              f"provider={args.provider}, {args.steps} steps of {shape} tokens, "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, {elapsed / args.steps * 1e3:.0f} ms/step{parity}",
              flush=True)
    dist.barrier()  # every rank is done with every collective before any leaves (see spawn.exit_rank)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from spawn import launch

    launch(main, parse_args().cp or 1)  # under torchrun: this rank; else spawn --cp ranks
