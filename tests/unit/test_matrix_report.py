"""tests/gpu/matrix_report.py: later runs replace earlier rows per (world, provider); verdicts and reasons."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gpu"))  # tests/gpu

import matrix_report  # noqa: E402

REFUSAL = ("UnsupportedInputError: provider 'sage' cannot take these inputs:\n"
           "  - key lengths must be a multiple of 64 (here 12); use another provider")


def _row(world, provider, ok, refused=False, exception=None, schedule="ring"):
    return {"world": world, "provider": provider, "schedule": schedule, "ok": ok, "refused": refused,
            "exception": exception, "shape": [1, 2, 2, 8, 16], "causal": True, "mask": None, "errors": {}}


def _write(path, rows):
    path.write_text(json.dumps({"context_parallel_gloo_one_gpu": rows}))
    return str(path)


def test_a_rerun_replaces_the_same_cases_and_adds_new_ones(tmp_path):
    first = _write(tmp_path / "a.json", [_row(1, "native", False), _row(1, "flash", True), _row(2, "native", True)])
    rerun = _write(tmp_path / "b.json", [_row(1, "native", True), _row(1, "native", True, schedule="ulysses")])
    rows = matrix_report.latest_rows([first, rerun])
    assert sorted((r["world"], r["provider"], r["schedule"], r["ok"]) for r in rows) == [
        (1, "flash", "ring", True), (1, "native", "ring", True), (1, "native", "ulysses", True),
        (2, "native", "ring", True)]


def test_report_counts_passed_refused_failed_and_names_reasons_and_failures(tmp_path):
    rows = [_row(2, "sage", True, schedule="ulysses"), _row(2, "sage", False, True, REFUSAL, "allgather"),
            _row(3, "sage", False, False, "RuntimeError: boom", "allgather")]
    text = matrix_report.report(rows, ["x.json"])
    assert "| sage | allgather | 0 / 1 / 0 | 0 / 0 / 1 |" in text
    assert "| sage | ulysses | 1 / 0 / 0 | - |" in text
    assert "All: 1 passed, 1 refused, 1 failed." in text
    assert "key lengths must be a multiple of 64; use another provider" in text  # numbers of the case dropped
    assert "W=3 sage / allgather" in text and "RuntimeError: boom" in text
