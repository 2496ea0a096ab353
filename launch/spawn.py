"""Run a launch script's `main` under torchrun, or spawn N local ranks when started with plain `python`."""

from __future__ import annotations

import os
import socket
import sys
from typing import Callable, NoReturn

import torch
import torch.multiprocessing as mp


def exit_rank(code: int) -> NoReturn:
    """End a rank's process with `code`, skipping interpreter finalization.

    Why: a gloo process group can outlive `destroy_process_group` (it does once torch._dynamo is imported after
    `init_process_group`, which the optimizers do lazily), and its worker threads may still be releasing the
    tensors of the last collective when Python starts finalizing. Releasing a tensor that has a Python object
    needs the GIL, a finalizing interpreter never grants it, and the process aborts ("terminate called without
    an active exception") after all its work succeeded: about one run in 50 of launch/train.py. Flush what was
    printed and leave with os._exit instead; every rank has passed its final barrier by then.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _rank_entry(rank: int, world: int, port: int, main: Callable, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # N ranks share the machine's cores, as torchrun arranges with OMP_NUM_THREADS
    exit_rank(main(argv))


def launch(main: Callable[[list[str] | None], int], nproc: int) -> None:
    """torchrun set RANK: run `main` here. Otherwise spawn `nproc` ranks on a free loopback port."""
    if "RANK" in os.environ:
        exit_rank(main(None))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(_rank_entry, args=(nproc, port, main, sys.argv[1:]), nprocs=nproc)
    except mp.ProcessExitedException:
        sys.exit(1)


def pick_device(choice: str) -> torch.device:
    """`--device auto|cpu|cuda`: this rank's GPU (LOCAL_RANK) where one is asked for or available, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def init_cp_world(cp: int | None, device_choice: str):
    """This rank's (rank, world, device, 1-D "cp" mesh) after starting the process group: NCCL where every rank
    has a GPU, else gloo. `--cp` must match the world (torchrun --nproc-per-node, or the ranks `launch` spawns)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ["WORLD_SIZE"])
    if cp is not None and cp != world:
        raise SystemExit(f"--cp {cp} needs {cp} ranks, got a world of {world}: start "
                         f"torchrun --nproc-per-node {cp}, or plain python to spawn them")
    rank, device = int(os.environ["RANK"]), pick_device(device_choice)
    backend = "nccl" if device.type == "cuda" and torch.cuda.device_count() >= world else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return rank, world, device, init_device_mesh(device.type, (world,), mesh_dim_names=("cp",))
