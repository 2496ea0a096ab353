"""The main job: a small transformer, forward and backward, context-parallel over every provider and schedule.

    torchrun --standalone --nproc-per-node 4 launch/demo.py      # any N; gloo on CPU, NCCL on GPUs
    python launch/demo.py                                        # same, spawning 4 CPU ranks itself

For each provider that can train here and each schedule (ring, ulysses, allgather, and hybrid on a 2-D mesh
when the world size is even and >= 4), it runs the model with the sequence sharded over all ranks and
compares logits and parameter gradients with the same provider on the whole sequence on one device.
Prints one table row per combination as it goes; exits non-zero if any combination misses the tolerance.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cpattn  # noqa: E402
from model import ModelConfig, TinyLM, token_loss_sum  # noqa: E402

TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=4, help="ranks to spawn when not started by torchrun")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--providers", nargs="*", help="default: every provider that can train on this device")
    p.add_argument("--schedules", nargs="*", default=None, help="default: ring ulysses allgather (+ hybrid)")
    p.add_argument("--seq", type=int, default=256, help="total sequence length (any length)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--steps", type=int, default=3, help="timed steps per combination (after one warm-up)")
    return p.parse_args(argv)


def pick_device(choice: str, world: int) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    return torch.device("cuda", local % torch.cuda.device_count())


def training_providers(device: torch.device, dtype: torch.dtype) -> list[str]:
    names = []
    for name, provider in cpattn.PROVIDERS.items():
        caps = provider.capabilities(device.type)
        if provider.availability().ok and caps is not None and caps.training and dtype in caps.dtypes:
            if device.type == "cuda" and caps.min_compute_capability:
                if torch.cuda.get_device_capability(device) < caps.min_compute_capability:
                    continue
            names.append(name)
    return names


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (kB on Linux)


def reference_run(model, tokens, targets, provider, total):
    """The same provider on the whole sequence, one device: logits and mean-loss gradients."""
    model.zero_grad()
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    with cpattn.attention_provider(provider):
        logits = model(tokens, positions)
        (token_loss_sum(logits, targets) / total).backward()
    return logits.detach(), [p.grad.detach().clone() for p in model.parameters()]


def cp_step(model, tokens, targets, provider, mesh, schedule, layout, total):
    """One context-parallel step: shard tokens and positions, sum local losses over the global count."""
    local_tokens = cpattn.shard_sequence(tokens, mesh, 1, layout)
    local_targets = cpattn.shard_sequence(targets, mesh, 1, layout)
    positions = cpattn.local_position_ids(tokens.shape[1], mesh, layout, tokens.device)
    model.zero_grad()
    with cpattn.attention_provider(provider, cp_mesh=mesh, cp_strategy=schedule, cp_layout=layout):
        logits = model(local_tokens, positions)
        (token_loss_sum(logits, local_targets) / total).backward()
    return logits


def all_reduce_grads(model, group) -> list[torch.Tensor]:
    grads = []
    for p in model.parameters():
        g = p.grad.detach().clone()
        dist.all_reduce(g, group=group)
        grads.append(g)
    return grads


def run_combination(args, model, tokens, targets, provider, schedule, mesh, group, device, dtype):
    total = tokens.numel()
    layout = "zigzag"
    ref_logits, ref_grads = reference_run(model, tokens, targets, provider, total)
    cp_step(model, tokens, targets, provider, mesh, schedule, layout, total)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier(group)
    start = time.perf_counter()
    for _ in range(args.steps):
        logits = cp_step(model, tokens, targets, provider, mesh, schedule, layout, total)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    step_ms = (time.perf_counter() - start) / args.steps * 1e3
    full_logits = cpattn.gather_sequence(logits.detach(), mesh, 1, layout)
    grads = all_reduce_grads(model, group)
    out_err = (full_logits.float() - ref_logits.float()).abs().max().item()
    grad_err = max(((g.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-6)).item()
                   for g, r in zip(grads, ref_grads))
    stats = torch.tensor([step_ms, peak_memory_mb(device)], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)  # slowest rank, largest peak
    return out_err, grad_err, stats[0].item(), stats[1].item()


def main(argv=None) -> int:
    args = parse_args(argv)
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    device = pick_device(args.device, world)
    backend = "nccl" if device.type == "cuda" and torch.cuda.device_count() >= world else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)  # same weights and data on every rank
    cfg = ModelConfig(dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads)
    model = TinyLM(cfg).to(device=device, dtype=dtype)
    tokens = torch.randint(0, cfg.vocab, (args.batch, args.seq + 1), device=device)
    tokens, targets = tokens[:, :-1], tokens[:, 1:]
    mesh_1d = init_device_mesh(device.type, (world,))
    meshes = {s: mesh_1d for s in ("ring", "ulysses", "allgather")}
    if world >= 4 and world % 2 == 0:
        meshes["hybrid"] = init_device_mesh(device.type, (world // 2, 2), mesh_dim_names=("ring", "ulysses"))
    schedules = args.schedules or list(meshes)
    providers = args.providers or training_providers(device, dtype)
    group = mesh_1d.get_group()
    if rank == 0:
        print(f"cpattn demo: {world} ranks, {backend} on {device.type}, {dtype}, B={args.batch} S={args.seq} "
              f"H={args.heads} Hkv={args.kv_heads} D={args.dim // args.heads} layers={args.layers}", flush=True)
        print(f"{'provider':<18}{'schedule':<11}{'logits err':>12}{'grad rel err':>14}{'ms/step':>10}"
              f"{'peak MB/rank':>14}  parity", flush=True)
    failures = 0
    for provider in providers:
        for schedule in schedules:
            try:
                out_err, grad_err, ms, mb = run_combination(
                    args, model, tokens, targets, provider, schedule, meshes[schedule], group, device, dtype)
            except cpattn.CpattnError as exc:
                if rank == 0:
                    first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
                    print(f"{provider:<18}{schedule:<11}{'refused: ' + first}", flush=True)
                continue
            ok = out_err <= TOLERANCE[dtype] * 10 and grad_err <= TOLERANCE[dtype] * 10
            failures += not ok
            if rank == 0:
                print(f"{provider:<18}{schedule:<11}{out_err:>12.2e}{grad_err:>14.2e}{ms:>10.1f}{mb:>14.1f}  "
                      f"{'ok' if ok else 'FAIL'}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print("parity: all ok" if not failures else f"parity: {failures} combination(s) FAILED", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    from spawn import launch

    launch(main, parse_args().nproc)
