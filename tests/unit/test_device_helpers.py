"""contract.device_capability and contract.on_device, the per-call device helpers of the providers, on CPU (the
CUDA queries they make are replaced by counting stand-ins)."""

from __future__ import annotations

import contextlib

import torch

from cpattn import contract


def test_capability_is_read_once_per_device(monkeypatch):
    reads = []

    def read(index):
        reads.append(index)
        return (9, 0) if index == 0 else (8, 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", read)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    contract._capability_of.cache_clear()
    try:
        for _ in range(3):
            assert contract.device_capability(torch.device("cuda", 0)) == (9, 0)
            assert contract.device_capability(torch.device("cuda", 1)) == (8, 0)
            assert contract.device_capability(torch.device("cuda")) == (9, 0)  # no index: the current device
        assert reads == [0, 1]
    finally:
        contract._capability_of.cache_clear()


def test_on_device_switches_only_to_another_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert isinstance(contract.on_device(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(contract.on_device(torch.device("cuda", 1)), contextlib.nullcontext)
    guard = contract.on_device(torch.device("cuda", 0))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 0
