"""benchmarks/cp_scaling.py on CPU ranks (gloo, tiny shapes): the suite the multi-GPU results come from keeps working.

The check section compares context-parallel forward and backward with the same provider on one device and with
float64; the speed section must produce an efficiency per schedule, and the profile section a
breakdown from every rank; rank 0 writes the JSON, its markdown summary and a plot. Bounded by the subprocess
timeout.
"""

from __future__ import annotations

import json

import pytest
from launch_util import TORCHRUN, run

pytestmark = pytest.mark.distributed


def test_cp_scaling_smoke(tmp_path):
    code, out = run(TORCHRUN + ["--standalone", "--nproc-per-node=2", "benchmarks/cp_scaling.py", "--smoke",
                                "--out", str(tmp_path), "--sections", "check", "speed", "profile",
                                "--check-providers", "native", "_native_math"], timeout=240)
    assert code == 0, out[-4000:]
    result = json.loads((tmp_path / "cp_scaling_2xcpu.json").read_text())
    assert result["device"] == "2 x cpu" and result["world"] == 2
    checked = [c for c in result["check"] if "schedule" in c]
    assert {(c["provider"], c["schedule"]) for c in checked} == {
        (p, s) for p in ("native", "_native_math") for s in ("ring", "ulysses", "allgather", "ulysses_chunked")}
    assert all(c["ok"] and c["backward"] for c in checked), [c for c in checked if not c["ok"]]
    assert all(c["dq_vs_one_gpu"] < 1e-4 for c in checked)
    chunked = [c for c in checked if c["schedule"] == "ulysses_chunked"]
    assert all(c["stats"]["all_to_all"] == 8 * 4 for c in chunked), chunked  # 4 chunks, q/k/v/out both ways
    speed = [r for r in result["speed"] if "schedule" in r]
    assert {r["schedule"] for r in speed} == {"ring", "ulysses"}
    assert all(r["efficiency"] > 0 for r in speed), speed
    (profiled,) = result["profile"]
    assert "error" not in profiled, profiled
    assert len(profiled["ranks"]) == 2 and all(r["wall_ms"] > 0 for r in profiled["ranks"])
    # the summary renders every section, the profile with a row per rank; the plot shows the speed section
    text = (tmp_path / "cp_scaling_2xcpu.md").read_text()
    assert "ulysses_chunked" in text and "## Scaling" in text
    for rank in (0, 1):
        assert f"| native | ring | 128 | 2 | True | True | {rank} |" in text
    pytest.importorskip("matplotlib")
    assert (tmp_path / "cp_scaling_2xcpu.png").stat().st_size > 0
