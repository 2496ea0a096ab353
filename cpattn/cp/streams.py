"""CUDA streams that a ring rank's backward steps take in turn.

Why
    A block kernel's last wave leaves part of the GPU idle until its slowest tile ends, and on one stream the
    next step's kernel waits for that. A ring step's backward needs only its KV block and the rank's rows, not
    the previous step's kernel, so step i runs on stream i mod n and the next kernel starts on the SMs the
    current one's tail frees. The forward stays on one stream: its block kernels gain nothing from a second.
    Steps in flight on several streams keep their own temporaries, so peak memory can grow a little on long
    rings.

What keeps it exact
    - A step's stream first waits for everything issued on the main stream (the one current when the
      backward started, which issues the transfers and reads the sums) up to that point: its KV block's
      arrival and the rank's rows, and nothing of the other step streams' later work.
    - What a step hands on is ordered explicitly: sums of gradient parts wait for each part's event
      (gradsum.DeferredRowSum); a step's sends are issued while its stream is current (the transfer waits for it); a
      KV receive buffer is refilled only after the main stream waited for the stream whose kernel read it last
      (`main_waits_for`; with n streams the ring keeps n + 1 buffers so that this is the stream the step is
      about to use, not the one still computing); and the main stream waits for every step stream before the
      gradients are read (`join`).
Off CUDA, or with one stream, everything runs on the current stream and these calls do nothing.

When not
    Where the host, not the kernels, sets the pace (small shards, short kernels), the second stream's events,
    waits and per-stream allocations add host time that the kernels' tails do not hide. So a rank takes the
    second stream only from `MIN_STEP_WORK` (its query rows x its keys x heads x batch: 8192 x 8192 x 16) on,
    where the kernels are long enough to set the pace.
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
        self._main = torch.cuda.current_stream(device) if self.count > 1 else None
        self._streams = _streams_of(self._main.device, self.count) if self.count > 1 else ()

    @contextlib.contextmanager
    def on(self, step: int):
        """Run the body on step `step`'s stream, after what the main stream holds so far."""
        if not self._streams:
            yield
            return
        stream = self._streams[step % self.count]
        stream.wait_stream(self._main)
        with torch.cuda.stream(stream):
            yield

    def main_waits_for(self, step: int) -> None:
        """The main stream waits for what step `step`'s stream holds so far (earlier steps' kernels on it)."""
        if self._streams:
            self._main.wait_stream(self._streams[step % self.count])

    def join(self) -> None:
        """The main stream waits for every step stream."""
        for stream in self._streams:
            self._main.wait_stream(stream)


@functools.lru_cache(maxsize=None)
def _streams_of(device: torch.device, count: int) -> tuple:
    """The same `count` streams for every ring backward on `device`. The caching allocator keeps memory freed on
    a stream for that stream's later allocations, and PyTorch's pool hands out 32 streams in turn: new ones at
    every call would leave each layer's step temporaries cached on streams no later call uses, so reserved
    memory would grow with the number of layers instead of staying that of one backward."""
    return tuple(torch.cuda.Stream(device) for _ in range(count))
