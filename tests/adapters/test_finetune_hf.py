"""launch/finetune_hf.py under torchrun with --cp 2 on CPU (gloo): a few steps of a tiny transformers causal LM,
its summary line, and its loss curve against the one-device copy it trains in lockstep (--check)."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("transformers", reason="transformers is not installed (the dev extra pins it)")
pytest.importorskip("tqdm", reason="tqdm is not installed (the dev extra pins it)")

from launch_util import TORCHRUN, run  # noqa: E402

SUMMARY = re.compile(r"^finetune_hf: llama \(tiny\), [\d.]+M params, cp=2 \(gloo on cpu\), provider=auto, 3 steps of "
                     r"2x24 tokens, loss (?P<first>[\d.]+) -> (?P<last>[\d.]+), \d+ ms/step; "
                     r"max \|loss - one device\| (?P<diff>[\d.e+-]+)$", re.M)


@pytest.mark.distributed
def test_finetune_hf_with_cp_2():
    code, log = run(TORCHRUN + ["--standalone", "--nproc-per-node=2", "launch/finetune_hf.py", "--cp", "2",
                                "--steps", "3", "--seq", "24", "--device", "cpu", "--check"], timeout=240)
    assert code == 0, log[-4000:]
    found = SUMMARY.findall(log)
    assert len(found) == 1, log[-4000:]  # one summary line, from rank 0 only
    first, last, diff = map(float, found[0])
    assert first > 0 and last > 0
    assert diff <= 1e-3, log[-2000:]  # AdamW turns float32 rounding into small steps; the first step agrees to 1e-6
    assert "finetune cp=2" in log  # the progress bar


def test_finetune_hf_refuses_a_cp_size_that_is_not_the_world():
    code, log = run(TORCHRUN + ["--standalone", "--nproc-per-node=1", "launch/finetune_hf.py", "--cp", "2",
                                "--device", "cpu"], timeout=120)
    assert code != 0 and "--cp 2 needs 2 ranks, got a world of 1" in log, log[-2000:]
