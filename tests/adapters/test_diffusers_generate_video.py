"""launch/generate_video.py under torchrun with --cp 2 (gloo on CPU): diffusers' pipeline, unchanged, with its
transformer parallelized; the summary line, and the output against the same pipeline on one process (--check)."""

from __future__ import annotations

import re

import pytest

from launch_util import TORCHRUN, run

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[dev]')")

SUMMARY = re.compile(r"^generate_video: (?P<model>\w+) \(tiny\), transformer [\d.]+M params, cp=2 \(gloo on cpu\), "
                     r"provider=auto, 2 steps, output \((?P<shape>[\d, ]+)\), [\d.]+ s \([\d.]+ s/step\); "
                     r"max \|output - one process\| (?P<diff>\S+)$", re.MULTILINE)
SHAPES = {"wan": "1, 9, 3, 64, 64", "flux": "1, 3, 64, 64"}


@pytest.mark.distributed
@pytest.mark.parametrize("model", ["wan", "flux"])
def test_generate_video_cp2(model):
    code, log = run(TORCHRUN + ["--standalone", "--nproc-per-node=2", "launch/generate_video.py", "--cp", "2",
                                "--model", model, "--steps", "2", "--check"], timeout=240)
    assert code == 0, log[-4000:]
    found = SUMMARY.findall(log)
    match = SUMMARY.search(log)
    assert len(found) == 1 and match, f"expected one summary line (rank 0 only):\n{log[-3000:]}"
    assert match["model"] == model and match["shape"] == SHAPES[model]
    assert float(match["diff"]) <= 1e-4, match.group(0)
