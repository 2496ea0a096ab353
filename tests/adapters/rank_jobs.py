"""What the transformers torchrun workers share: run named jobs on every rank, gather every rank's verdict, and
write the results from rank 0."""

from __future__ import annotations

import json
import traceback

import torch
import torch.distributed as dist


def run_jobs(jobs) -> dict:
    """`jobs`: (name, function returning a dict). Per name: the function's dict ("error" None unless it says
    otherwise), or the error it raised and its traceback (reported to the test, which decides); then
    "rank_errors", every rank's error, gathered."""
    results = {}
    for name, job in jobs:
        try:
            results[name] = {"error": None, **job()}  # a job may report its own error
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, results[name]["error"])
        results[name]["rank_errors"] = errors
    return results


def finish(results: dict, out_path: str) -> int:
    """Rank 0 writes `results` (with the transformers and torch versions) to `out_path`; every rank then leaves
    the process group."""
    if dist.get_rank() == 0:
        import transformers

        results["_versions"] = {"transformers": transformers.__version__, "torch": torch.__version__}
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0
