"""tests/gpu/gpu_fuzz.py's own logic, on CPU: its draws, its verdicts, and a short run end to end.

The GPU runs are recorded in the README; here the script is kept working and its checks able to fail."""

from __future__ import annotations

import json
import os
import random
import sys

import pytest
import torch

import cpattn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gpu"))  # tests/gpu

import gpu_fuzz  # noqa: E402


def test_draws_follow_the_declared_capabilities_when_asked():
    caps = cpattn.PROVIDERS["flash"].supports["cuda"]  # half dtypes, no masks
    rng = random.Random(0)
    for _ in range(200):
        options = gpu_fuzz.draw_options(rng, caps)
        assert gpu_fuzz.DTYPES[options["dtype"]] in caps.dtypes and options["mask"] is None
    assert {gpu_fuzz.draw_options(rng)["mask"] for _ in range(200)} == set(gpu_fuzz.MASKS)


def test_a_varied_draw_changes_exactly_one_option():
    rng = random.Random(1)
    case = gpu_fuzz.draw_case(rng, "native")
    for _ in range(50):
        varied = gpu_fuzz.vary(rng, case)
        changed = [k for k in gpu_fuzz.OPTIONS if varied[k] != case[k]]
        assert changed == [varied["varied"]]
        assert all(varied[k] == case[k] for k in ("batch", "q_heads", "kv_heads", "sq", "sk", "d", "dv"))


def _case(**changes):
    base = dict(provider="_native_math", batch=1, q_heads=2, kv_heads=1, sq=9, sk=9, d=8, dv=8, seed=3,
                dtype="float32", mask="bool_empty_rows", causal=True, scale=None, grad=True, layout="bshd_view")
    return {**base, **changes}


def test_verdicts_ok_refused_and_failed(monkeypatch):
    cpu = torch.device("cpu")
    assert gpu_fuzz.run_case(_case(), cpu)["outcome"] == "ok"
    refused = gpu_fuzz.run_case(_case(provider="_native_cudnn"), cpu)  # a CUDA-only provider on CPU
    assert refused["outcome"] == "refused" and "_native_cudnn" in refused["message"]
    real = cpattn.dispatch.attention_dispatch

    def off_by_a_little(*args, **kwargs):  # a kernel 0.5 off: must be caught, forward and gradients
        return real(*args, **kwargs) + 0.5
    monkeypatch.setattr(gpu_fuzz.cpattn, "attention_dispatch", off_by_a_little)
    failed = gpu_fuzz.run_case(_case(), cpu)
    assert failed["outcome"] == "failed" and "out error" in failed["why"]


def test_a_short_cpu_run_writes_its_report(tmp_path):
    gpu_fuzz.main(["--device", "cpu", "--seconds-per-provider", "0.5", "--providers", "_native_math",
                   "--out", str(tmp_path), "--tag", "_t", "--head-dims", "20", "104"])
    report = json.loads((tmp_path / "gpu_fuzz_t.json").read_text())
    counts = report["providers"]["_native_math"]
    assert sum(counts.values()) == len(report["cases"]) >= 1
    assert counts["failed"] == 0, report["failures"]
    assert {case["d"] for case in report["cases"]} <= {20, 104} == set(report["head_dims"])


@pytest.mark.parametrize("layout", ["bhsd", "bshd_view"])
def test_inputs_have_the_layout_drawn(layout):
    q, k, v, dout, mask = gpu_fuzz.make_inputs(_case(layout=layout), torch.device("cpu"))
    assert q.shape == (1, 2, 9, 8) and q.is_contiguous() == (layout == "bhsd")
    assert mask.shape == (1, 1, 9, 9) and not mask[:, :, ::3].any()
