"""CUDA streams that a ring rank's backward steps take in turn.

Why
    A block kernel's last wave leaves part of the GPU idle until its slowest tile ends, and on one stream the
    next step's kernel waits for that. A ring step's backward needs only its KV block and the rank's rows, not
    the previous step's kernel, so step i runs on stream i mod n and the next kernel starts on the SMs the
    current one's tail frees. On an H100 (S=64k, P=4, zigzag causal, H=16, D=128: all ranks' block backwards
    on one GPU, FA4's per-block backward given the global out and LSE) the blocks took 0.961 of one whole
    backward's throughput on one stream and 0.977 on two, 0.974 on three
    (benchmarks/step_streams_probe.py, results/h100/step_streams_probe_h100.json). The forward's block
    kernels gained nothing there (0.980 on one stream, 0.979 on two), so the forward stays on one.
    The ring itself, forward+backward, all ranks' work against one whole call in the same alternating rounds
    (`--ring`, step_streams_ring_h100.json), one stream -> two: FA4 0.982 -> 0.982 at P=2, 0.961 -> 0.965 at
    P=4, 0.909 -> 0.918 at P=8; cuDNN 0.986 -> 0.989, 0.965 -> 0.975, 0.895 -> 0.916; dQ the same; peak memory
    the same at P=2 and 4, 64 MiB more at P=8 (steps in flight on two streams keep their own temporaries).

What keeps it exact
    - A step's stream first waits for everything issued on the home stream (the one current when the
      backward started) up to that point: its KV block's arrival and the rank's rows, and nothing of the other
      step streams' later work.
    - What a step hands on is ordered explicitly: sums of gradient parts wait for each part's event
      (gradsum.RowSum); a step's sends are issued while its stream is current (the transfer waits for it); a
      KV receive buffer is refilled only after the home stream waited for the stream whose kernel read it last
      (`home_waits_for`; with n streams the ring keeps n + 1 buffers so that this is the stream the step is
      about to use, not the one still computing); and the home stream waits for every step stream before the
      gradients are read (`join`).
Off CUDA, or with one stream, everything runs on the current stream and these calls do nothing.

When not
    Where the host, not the kernels, sets the pace, the second stream's events and waits cost more than the
    tails it fills. At S=16k (4096 rows per rank at P=4, H=16, D=128) two streams took the ring split from
    0.494 to 0.442 of one whole call (FA4) and from 0.730 to 0.611 (cuDNN), and lost at P=8 too; at 8192 rows
    per rank they gained at S=64k, P=8 (FA4 0.909 -> 0.918, cuDNN 0.895 -> 0.916) and were mixed at S=16k, P=2
    (FA4 0.927 -> 0.918, cuDNN 0.924 -> 0.945) (step_streams_ring_16k_h100.json, step_streams_ring_h100.json).
    The host took longer to issue the split on two streams there (cuDNN at P=4: 9.6 -> 12.6 ms for all ranks),
    and under the profiler at S=16k, P=2 the allocator's `empty` took 2.9 ms of host time on two streams
    against 0.3-0.5 ms on one. So a rank takes the second stream only from `MIN_STEP_WORK` (its query rows x its
    keys x heads x batch: 8192 x 8192 x 16) on. Afterwards (step_streams_ring_16k_gated_h100.json, both ways
    now one stream at P=4) the same code timed twice in one run differed by up to 0.037 at S=16k, P=4: host-bound
    rings are noisy, and the losses above are larger than that for cuDNN, about as large for FA4. Above the
    threshold the gain held in that run (S=64k, P=8: FA4 0.927 -> 0.948, cuDNN 0.924 -> 0.938,
    step_streams_ring_64k_p8_gated_h100.json).
"""

from __future__ import annotations

import contextlib
import functools

import torch


MIN_STEP_WORK = 8192 * 8192 * 16  # query rows x keys x heads x batch of a rank's shard (see "When not")


def stream_count(device: torch.device, requested: int, work: int) -> int:
    """How many streams a ring backward on `device` takes: `requested` on CUDA from MIN_STEP_WORK of `work`
    (the rank's query rows x keys x heads x batch) on, else 1."""
    return requested if device.type == "cuda" and work >= MIN_STEP_WORK else 1


class StepStreams:
    """`count` CUDA streams taken in turn by the steps of one ring backward on `device` (see the module
    docstring); one stream, the current one, off CUDA or with `count` 1."""

    def __init__(self, device: torch.device, count: int) -> None:
        self.count = count if device.type == "cuda" and count > 1 else 1
        self._home = torch.cuda.current_stream(device) if self.count > 1 else None
        self._streams = _streams_of(self._home.device, self.count) if self.count > 1 else ()

    @contextlib.contextmanager
    def on(self, step: int):
        """Run the body on step `step`'s stream, after what the home stream holds so far."""
        if not self._streams:
            yield
            return
        stream = self._streams[step % self.count]
        stream.wait_stream(self._home)
        with torch.cuda.stream(stream):
            yield

    def home_waits_for(self, step: int) -> None:
        """The home stream waits for what step `step`'s stream holds so far (earlier steps' kernels on it)."""
        if self._streams:
            self._home.wait_stream(self._streams[step % self.count])

    def join(self) -> None:
        """The home stream waits for every step stream."""
        for stream in self._streams:
            self._home.wait_stream(stream)


@functools.lru_cache(maxsize=None)
def _streams_of(device: torch.device, count: int) -> tuple:
    """The same `count` streams for every ring backward on `device`. The caching allocator keeps memory freed on
    a stream for that stream's later allocations, and PyTorch's pool hands out 32 streams in turn: new ones at
    every call would leave each layer's step temporaries cached on streams no later call uses. On an H100, 24
    ring splits in a row (S=16k, P=4, FA4) left 948 MiB reserved with these streams and 1900 MiB with two new
    ones per call (benchmarks/step_streams_probe.py --reserved, results/h100/step_streams_reserved_h100.json)."""
    return tuple(torch.cuda.Stream(device) for _ in range(count))
