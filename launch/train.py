"""A short training run with context parallelism whose loss curve matches the single-device run.

    torchrun --standalone --nproc-per-node 4 launch/train.py     # any N; gloo on CPU, NCCL on GPUs
    python launch/train.py --nproc 2                             # same, spawning the ranks itself

Every rank trains the TinyLM of model.py on its shard of each sequence (context parallelism over all ranks);
rank 0 also trains an identical copy on the whole sequence on one device, in lockstep, as the reference.
Prints both losses as it goes and exits non-zero if the curves differ by more than --tol at any step
(or if the model did not learn at all on a run of 100+ steps).

The four things a context-parallel training loop must get right, each marked "CP:" below:

1. Shard inputs, targets and position ids the same way: `cpattn.shard_sequence` for tokens and targets and
   `cpattn.local_position_ids` for RoPE, all with the layout the attention uses (cp_layout, zigzag here).
   Shift targets *before* sharding: a token's target is the next token of the whole sequence, which may live
   on another rank.
2. RNG in step across the CP group: every rank seeds the same generator, so all ranks build the same weights
   and draw the same full batch, then keep only their shard. (The model has no dropout. With dropout, keep
   the *data* generator shared but seed the dropout generator with seed + cp_rank, so that shards do not get
   the same mask pattern; the CP curve then matches the single-device one statistically, not step for step.)
3. Loss: sum of the local token losses divided by the *global* number of target tokens (all-reduced), never
   the local mean. See `cp_loss`.
4. Gradients: all-reduce SUM (not AVG) over the CP group. See `cp_loss`.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cpattn  # noqa: E402
from model import ModelConfig, TinyLM  # noqa: E402

IGNORE = -100  # target value of tokens that carry no loss (F.cross_entropy's ignore_index)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not started by torchrun")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--provider", default="native")
    p.add_argument("--schedule", default="ring", choices=("auto", "ring", "ulysses", "allgather"))
    p.add_argument("--layout", default="zigzag", choices=("zigzag", "contiguous"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq", type=int, default=61, help="tokens per sequence (any length; uneven shards are fine)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-3, help="largest |loss_cp - loss_single| allowed at any step")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--loss-reduction", choices=("global", "rank-mean"), default="global",
                   help="'rank-mean' is the classic mistake (mean per rank, then averaged); kept to show it fails")
    return p.parse_args(argv)


# -- synthetic data ---------------------------------------------------------------------------------------


class CopyMarkovData:
    """Each row: a segment drawn from a fixed sparse Markov chain (learnable bigrams), then the segment again
    (learnable only by attending back across the sequence, i.e. across shards). The first half of the first
    segment carries no loss (ignore_index) and the segment length varies per row, so the number of target
    tokens differs from rank to rank: exactly the case where per-rank mean losses go wrong.
    """

    def __init__(self, vocab: int, seq: int, batch: int, seed: int, device):
        self.vocab, self.seq, self.batch, self.device = vocab, seq, batch, device
        # CP: one generator, seeded identically on every rank -> every rank draws the same full batch.
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.successors = torch.randint(0, vocab, (vocab, 3), generator=self.gen)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.seq
        tokens = torch.empty(self.batch, s + 1, dtype=torch.long)
        targets = torch.full((self.batch, s), IGNORE, dtype=torch.long)
        for b in range(self.batch):
            seg_len = int(torch.randint(s // 4, s // 2 + 1, (1,), generator=self.gen))
            seg = torch.empty(seg_len, dtype=torch.long)
            seg[0] = torch.randint(0, self.vocab, (1,), generator=self.gen)
            picks = torch.randint(0, 3, (seg_len,), generator=self.gen)
            for i in range(1, seg_len):
                seg[i] = self.successors[seg[i - 1], picks[i]]
            tokens[b] = seg.repeat(s // seg_len + 2)[: s + 1]
            # Targets: the next token of the *whole* sequence (shift before sharding). The first half of the
            # first segment carries no loss, so the count of loss tokens varies per row and per rank.
            row = tokens[b, 1:].clone()
            row[: seg_len // 2] = IGNORE
            targets[b] = row
        return tokens[:, :-1].to(self.device), targets.to(self.device)


# -- loss and gradient reduction --------------------------------------------------------------------------


def cp_loss(logits: torch.Tensor, local_targets: torch.Tensor, global_count: int, reduction: str) -> torch.Tensor:
    """This rank's share of the global mean loss.

    CP: with `global`, every rank returns sum(local token losses) / (target tokens over the whole CP group).
    The global mean loss is the SUM over ranks of these shares, so its gradient is the SUM over ranks of the
    local gradients: all-reduce the gradients with SUM, not AVG. AVG (what DDP does over its group) shrinks them
    by the CP size, the scaling bug: with SGD the run behaves as if the learning rate were lr / cp_size; Adam
    hides most of it, but gradient-clipping thresholds, Adam's eps and logged gradient norms silently change
    meaning. If a wrapper averages over a group that includes the CP ranks, multiply the loss by the CP size.

    Why not "mean per rank, then average over ranks" (`rank-mean`)? Rank r holds n_r target tokens with loss
    sum S_r. The true mean is sum_r S_r / sum_r n_r. The average of per-rank means is (1/W) sum_r S_r / n_r,
    which weights each token by 1 / (W n_r): tokens on a rank with few targets (a short shard, padding,
    ignored prompt tokens) count more than tokens on a full rank. It equals the true mean only when every
    rank has exactly the same number of target tokens, which uneven lengths, ignore_index or packing break.
    """
    flat_logits, flat_targets = logits.flatten(0, 1).float(), local_targets.flatten()
    if reduction == "rank-mean":  # the mistake, for demonstration: mean here, then averaged across ranks
        count = (flat_targets != IGNORE).sum().clamp_min(1)
        world = dist.get_world_size()
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE, reduction="sum") / count / world
    return F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE, reduction="sum") / global_count


def all_reduce_grads(model: torch.nn.Module, group) -> None:
    """CP: SUM the gradients over the CP group (one flat buffer, one collective)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def assert_in_step(what: str, tensors, group) -> None:
    """CP: every rank must hold the same full batch and the same weights; compare checksums across the group."""
    local = torch.stack([t.detach().double().sum() for t in tensors] + [torch.tensor(float(len(tensors)))])
    everyone = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, local, group=group)
    if any(not torch.equal(x, everyone[0]) for x in everyone):
        raise RuntimeError(f"ranks of the CP group are out of step: their {what} differ (seed every rank alike)")


# -- the loop ---------------------------------------------------------------------------------------------


def pick_device(choice: str) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def main(argv=None) -> int:
    args = parse_args(argv)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    device = pick_device(args.device)
    backend = "nccl" if device.type == "cuda" and torch.cuda.device_count() >= world else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("cp",))
    group = mesh.get_group()

    # CP: the same seed everywhere -> identical initial weights on every rank (and for the reference copy).
    torch.manual_seed(args.seed)
    cfg = ModelConfig(vocab=args.vocab, dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads)
    model = TinyLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    reference = copy.deepcopy(model) if rank == 0 else None  # the non-CP run, on rank 0 only
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=args.lr, weight_decay=0.01) if reference else None
    data = CopyMarkovData(args.vocab, args.seq, args.batch, args.seed, device)

    # CP: this rank's global positions, for RoPE (the same every step: the length does not change).
    positions = cpattn.local_position_ids(args.seq, mesh, args.layout, device)
    if rank == 0:
        print(f"cpattn train: {world} ranks, {backend} on {device.type}, provider={args.provider} "
              f"schedule={args.schedule} layout={args.layout} B={args.batch} S={args.seq} dim={args.dim} "
              f"layers={args.layers} steps={args.steps} loss-reduction={args.loss_reduction}", flush=True)
        print(f"{'step':>6}{'loss (CP)':>12}{'loss (1 dev)':>14}{'|diff|':>10}{'ms/step':>9}", flush=True)

    cp_losses, ref_losses = [], []
    start = last = time.perf_counter()
    for step in range(args.steps):
        tokens, targets = data.next_batch()  # the same full batch on every rank
        if step == 0:
            assert_in_step("initial weights and first batch", [*model.parameters(), tokens, targets], group)
        # CP: shard tokens and targets along the sequence with the layout the attention schedule uses.
        local_tokens = cpattn.shard_sequence(tokens, mesh, 1, args.layout)
        local_targets = cpattn.shard_sequence(targets, mesh, 1, args.layout)
        # CP: the global count of target tokens (here every rank could compute it from the full batch; with
        # real data loaders a rank only sees its shard, so all-reduce the local counts).
        count = (local_targets != IGNORE).sum().to(torch.float64)
        dist.all_reduce(count, group=group)
        global_count = count.clamp_min(1).item()

        opt.zero_grad(set_to_none=True)
        with cpattn.attention_provider(args.provider, cp_mesh=mesh, cp_strategy=args.schedule,
                                       cp_layout=args.layout):
            logits = model(local_tokens, positions)
        loss = cp_loss(logits, local_targets, global_count, args.loss_reduction)
        loss.backward()
        all_reduce_grads(model, group)
        opt.step()
        reported = loss.detach().to(torch.float64)
        dist.all_reduce(reported, group=group)  # the global mean loss (sum of the shares)
        cp_losses.append(reported.item())

        if reference is not None:  # the same step on the whole sequence, one device
            ref_opt.zero_grad(set_to_none=True)
            with cpattn.attention_provider(args.provider):
                ref_logits = reference(tokens, torch.arange(args.seq, device=device))
            ref_loss = F.cross_entropy(ref_logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
            ref_loss.backward()
            ref_opt.step()
            ref_losses.append(ref_loss.item())
            if step % args.log_every == 0 or step == args.steps - 1:
                now = time.perf_counter()
                ms = (now - last) / (args.log_every if step else 1) * 1e3
                last = now
                diff = abs(cp_losses[-1] - ref_losses[-1])
                print(f"{step:>6}{cp_losses[-1]:>12.5f}{ref_losses[-1]:>14.5f}{diff:>10.1e}{ms:>9.1f}", flush=True)

    assert_in_step("final weights", list(model.parameters()), group)  # same gradients -> same updates
    verdict = torch.zeros(1)
    if rank == 0:
        diffs = [abs(a - b) for a, b in zip(cp_losses, ref_losses)]
        worst = max(range(len(diffs)), key=diffs.__getitem__)
        param_err = max((p.detach() - r.detach()).abs().max().item()
                        for p, r in zip(model.parameters(), reference.parameters()))
        learned = args.steps < 100 or ref_losses[-1] < 0.8 * ref_losses[0]
        ok = diffs[worst] <= args.tol and learned
        print(f"max |loss diff| {diffs[worst]:.2e} at step {worst} (tol {args.tol:.0e}); final weights max diff "
              f"{param_err:.2e}; loss {ref_losses[0]:.3f} -> {ref_losses[-1]:.3f}; "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        if ok:
            print("parity: loss curves match", flush=True)
        elif not learned:
            print("parity: FAILED, the single-device run did not learn (loss fell by < 20%)", flush=True)
        else:
            print(f"parity: DIVERGED, the CP loss differs by {diffs[worst]:.2e} > {args.tol:.0e} "
                  f"at step {worst}", flush=True)
        verdict[0] = float(not ok)
    dist.broadcast(verdict, src=0, group=group)  # every rank exits with the same code
    dist.barrier()  # every rank is done with every collective before any leaves (see spawn.exit_rank)
    dist.destroy_process_group()
    return int(verdict.item())


if __name__ == "__main__":
    from spawn import launch

    launch(main, parse_args().nproc)
