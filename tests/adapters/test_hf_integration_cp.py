"""transformers models on attn_implementation="cpattn", context-parallel over W = 1, 2 and 3 gloo ranks: the
training step a user writes (shard_batch, model, cp_loss, backward, all_reduce_grads) against the same model on
one device with its own attention: gathered logits, the loss and every parameter's summed gradient. Sliding
windows (Mistral, Gemma 2 and 3, gpt-oss), Gemma 2's softcap, gpt-oss's sinks and Whisper's cross-attention (keys
whole on every rank) included.

One packed row sharded by documents (shard_batch(..., layout="documents"), the packed ring in every layer) at
W = 1 to 4 (W = 4 runs only those cases), against every document run on its own on one device: Llama (GQA),
Gemma 2 (windows on alternate layers, softcap) and gpt-oss (windows, sinks; its own packed masks attend across
documents, so its packed row on one device is no reference); Llama also on a 2 x 2 mesh (the hybrid schedule).

One torchrun job per world size runs every case (tests/adapters/hf_integration_worker.py); refusals (T5's
relative position bias, forgotten position ids, a mask transformers would read from one shard's positions, a
4-D mask of local keys) must be raised on every rank with what to pass instead.
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("transformers", reason="transformers is not installed (the dev extra pins it)")

from hf_integration_worker import CASES, MESH_SHAPES, REFUSALS  # noqa: E402
from launch_util import TORCHRUN, run  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORLDS = (1, 2, 3)
DOCUMENT_WORLDS = (4,)  # worlds that run only the cases sharded by documents
TOL = 1e-5  # float32 against the model's own float32 attention

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """World size -> that job's results, each job started once, when a test first needs it."""
    done = {}

    def of(world: int) -> dict:
        if world not in done:
            out = tmp_path_factory.mktemp(f"hf_w{world}") / "results.json"
            only = ["documents"] if world in DOCUMENT_WORLDS else []
            code, log = run(TORCHRUN + ["--standalone", f"--nproc-per-node={world}",
                                        os.path.join(HERE, "hf_integration_worker.py"), str(out), *only],
                            timeout=300)
            assert code == 0, log[-4000:]
            done[world] = json.loads(out.read_text())
        return done[world]
    return of


RUNS = [(w, c) for w in WORLDS for c in CASES] + [(w, c) for w in DOCUMENT_WORLDS for c in CASES if "documents" in c]


@pytest.mark.distributed
@pytest.mark.parametrize("world,case", RUNS, ids=[f"W{w}-{c}" for w, c in RUNS])
def test_training_step_matches_one_device(results, world, case):
    if world == 1 and "checkpointing" in case:
        pytest.skip("on one rank a recomputation runs on the provider active at backward time (documented)")
    if case in MESH_SHAPES and MESH_SHAPES[case][0] * MESH_SHAPES[case][1] != world:
        pytest.skip(f"the {MESH_SHAPES[case]} mesh runs in the world of its size")
    r = results(world)[case]
    assert r["rank_errors"] == [None] * world, r.get("traceback") or r["rank_errors"]
    if world > 1:
        assert r["cp_calls"] > 0, "the model's attention must run context-parallel"
    assert r["logits_err"] <= TOL, r
    assert r["loss_err"] <= TOL, r
    assert r["grad_err"] <= TOL * 10, r  # relative to each gradient's largest entry
    if "model_loss_err" in r:  # transformers' own loss on a shard_batch batch: this rank's share of the loss
        assert r["model_loss_err"] <= TOL, r


EXPECTED_REFUSALS = {  # case: (error type, words every rank's message must hold)
    "refuse-t5-position_bias": ("UnsupportedInputError", "position_bias"),
    "refuse-bart-positions_from_length": ("UnsupportedInputError", "would restart at position 0"),
    "refuse-llama-forgotten_positions": ("InvalidArgumentError", "shard_batch"),
    "refuse-llama-no_attention_mask": ("InvalidArgumentError", "pass attention_mask"),
    "refuse-llama-local_4d_mask": ("InvalidArgumentError", "all keys in global order"),
    # the position check, or where the shard's length is not the layout's the length check: both say what to use
    "refuse-llama-documents_by_position": (("InvalidArgumentError", "RankMismatchError"), "shard_packed"),
}


REFUSAL_RUNS = [(w, c) for w in WORLDS if w > 1 for c in REFUSALS] + [
    (w, c) for w in DOCUMENT_WORLDS for c in REFUSALS if "documents" in c]


@pytest.mark.distributed
@pytest.mark.parametrize("world,case", REFUSAL_RUNS, ids=[f"W{w}-{c}" for w, c in REFUSAL_RUNS])
def test_refused_on_every_rank_naming_the_layer(results, world, case):
    errors = results(world)[case]["rank_errors"]
    kind, words = EXPECTED_REFUSALS[case]
    assert len(errors) == world and all(errors), errors
    kinds = kind if isinstance(kind, tuple) else (kind,)
    for error in errors:
        assert error.startswith(tuple(f"{k}: " for k in kinds)) and "(layer 0)" in error and words in error, error
