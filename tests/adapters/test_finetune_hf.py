"""launch/finetune_hf.py under torchrun with --cp 2 on CPU (gloo): a few steps of a tiny transformers causal LM,
its summary line, and its loss curve against the one-device copy it trains in lockstep (--check); with --packed
at --cp 3, gpt-oss on one packed row sharded by documents against every document run on its own."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("transformers", reason="transformers is not installed (the dev extra pins it)")
pytest.importorskip("tqdm", reason="tqdm is not installed (the dev extra pins it)")

from launch_util import TORCHRUN, run  # noqa: E402

SUMMARY = r"^finetune_hf: {model} \(tiny\), [\d.]+M params, cp={cp} \(gloo on cpu\), provider=auto, 3 steps of " \
    r"{shape} tokens, loss (?P<first>[\d.]+) -> (?P<last>[\d.]+), \d+ ms/step; " \
    r"max \|loss - one device\| (?P<diff>[\d.e+-]+)$"


@pytest.mark.distributed
@pytest.mark.parametrize("cp,extra,model,shape", [(2, [], "llama", "2x24"),
                                                  (3, ["--packed", "--model", "gpt_oss"], "gpt_oss", "1x48 packed")],
                         ids=["cp2", "cp3-packed-gpt_oss"])
def test_finetune_hf_under_cp(cp, extra, model, shape):
    code, log = run(TORCHRUN + ["--standalone", f"--nproc-per-node={cp}", "launch/finetune_hf.py", "--cp", str(cp),
                                "--steps", "3", "--seq", "24", "--device", "cpu", "--check", *extra], timeout=240)
    assert code == 0, log[-4000:]
    found = re.compile(SUMMARY.format(model=model, cp=cp, shape=re.escape(shape)), re.M).findall(log)
    assert len(found) == 1, log[-4000:]  # one summary line, from rank 0 only
    first, last, diff = map(float, found[0])
    assert first > 0 and last > 0
    assert diff <= 1e-3, log[-2000:]  # AdamW turns float32 rounding into small steps; the first step agrees to 1e-6
    assert f"finetune cp={cp}" in log  # the progress bar


def test_finetune_hf_refuses_a_cp_size_that_is_not_the_world():
    code, log = run(TORCHRUN + ["--standalone", "--nproc-per-node=1", "launch/finetune_hf.py", "--cp", "2",
                                "--device", "cpu"], timeout=120)
    assert code != 0 and "--cp 2 needs 2 ranks, got a world of 1" in log, log[-2000:]
