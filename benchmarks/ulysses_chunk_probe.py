"""What Ulysses' head chunks cost the kernels, before any overlap: one rank's attention on its heads in one call
against the same heads in 2 and 4 calls, on one GPU with no communication.

    python benchmarks/ulysses_chunk_probe.py [--providers flash _native_cudnn] [--seqs 32768 131072] [--out DIR]

After Ulysses' all-to-all a rank attends over the whole sequence with H/W heads. In head chunks
(cpattn/cp/ulysses.py) it makes one call per chunk instead, so that the other chunks' transfers overlap it. Each
call here gets its own fresh tensors, as each chunk's transfer delivers them. `ratio` = one-call time / chunked
time: what the overlap must win back. bf16, D=128, B=1; triton.testing.do_bench medians. Writes
ulysses_chunk_probe<tag>.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cpattn  # noqa: E402
from benchmarks.run import RESULTS, write_cases  # noqa: E402


def chunked_step(provider: str, heads: int, s: int, chunks: int, causal: bool, backward: bool):
    """One rank's attention over `heads` heads in `chunks` calls (fresh random inputs per chunk)."""
    def tensors():
        return [torch.randn(1, heads // chunks, s, 128, device="cuda", dtype=torch.bfloat16).requires_grad_(backward)
                for _ in range(4)]
    inputs = [tensors() for _ in range(chunks)]

    def step():
        with cpattn.attention_provider(provider):
            for q, k, v, dout in inputs:
                q.grad = k.grad = v.grad = None  # no accumulation adds
                out = cpattn.attention_dispatch(q, k, v, is_causal=causal)
                if backward:
                    out.backward(dout.detach())
    return step


def main(argv=None) -> None:
    from triton.testing import do_bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", nargs="*", default=["flash", "_native_cudnn"])
    parser.add_argument("--seqs", type=int, nargs="*", default=[32768, 131072], help="whole sequence lengths")
    parser.add_argument("--heads", type=int, nargs="*", default=[8, 16], help="heads per rank after the all-to-all")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    rows = []
    for provider in args.providers:
        for s in args.seqs:
            for heads in args.heads:
                for causal in (False, True):
                    for backward in (False, True):
                        row = {"provider": provider, "S": s, "heads": heads, "causal": causal, "backward": backward,
                               "ms": {}}
                        for chunks in (1, 2, 4):
                            row["ms"][chunks] = do_bench(chunked_step(provider, heads, s, chunks, causal, backward),
                                                         warmup=50, rep=200)
                            torch.cuda.empty_cache()
                        row["ratio"] = {n: row["ms"][1] / ms for n, ms in row["ms"].items()}
                        rows.append(row)
                        print(row, flush=True)
    print("wrote", write_cases(args.out, f"ulysses_chunk_probe{args.tag}", rows))


if __name__ == "__main__":
    main()
