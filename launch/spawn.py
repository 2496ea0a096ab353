"""Run a launch script's `main` under torchrun, or spawn N local ranks when started with plain `python`."""

from __future__ import annotations

import os
import socket
import sys
from typing import Callable

import torch
import torch.multiprocessing as mp


def _rank_entry(rank: int, world: int, port: int, main: Callable, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # N ranks share the machine's cores, as torchrun arranges with OMP_NUM_THREADS
    code = main(argv)
    if code:
        sys.exit(code)


def launch(main: Callable[[list[str] | None], int], nproc: int) -> None:
    """torchrun set RANK: run `main` here. Otherwise spawn `nproc` ranks on a free loopback port."""
    if "RANK" in os.environ:
        sys.exit(main(None))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(_rank_entry, args=(nproc, port, main, sys.argv[1:]), nprocs=nproc)
    except mp.ProcessExitedException:
        sys.exit(1)
