"""HF transformers models, unchanged, with cpattn as their SDPA: single device and context-parallel (2 gloo ranks).

A tiny LlamaForCausalLM from a LlamaConfig (random weights, nothing downloaded, attn_implementation="sdpa"),
with multi-head and grouped-query attention. See tests/adapters/hf_cp_worker.py for the CP setups and why the mask
setup matters under context parallelism.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (the dev extra pins it: pip install -e '.[dev]')"
)

import cpattn  # noqa: E402
import cpattn.providers.native as native_module  # noqa: E402
from launch_util import TORCHRUN, run  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _llama(kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float()


def _logits_and_grads(model, ids, targets, **kwargs):
    model.zero_grad()
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padding_mask"])
def test_single_device_sdpa_patched(monkeypatch, kv_heads, padded):
    model = _llama(kv_heads)
    tokens = torch.randint(0, 64, (2, 18), generator=torch.Generator().manual_seed(1))
    ids, targets = tokens[:, :-1], tokens[:, 1:]
    kwargs = {}
    if padded:  # HF then builds a 4-D bool mask and passes it to SDPA
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        kwargs["attention_mask"] = mask
    ref_logits, ref_grads = _logits_and_grads(model, ids, targets, **kwargs)

    # cpattn's `native` provider calls SDPA's C entry through its module global, on its first and its cached
    # path alike; HF's own call would go to F.scaled_dot_product_attention instead.
    masks_seen = []
    real_sdpa = native_module._C_SDPA

    def counting_sdpa(q, k, v, mask=None, *args, **kwargs):
        masks_seen.append(mask is not None)
        return real_sdpa(q, k, v, mask, *args, **kwargs)
    monkeypatch.setattr(native_module, "_C_SDPA", counting_sdpa)
    with cpattn.sdpa_patched(), cpattn.attention_provider("native"):
        logits, grads = _logits_and_grads(model, ids, targets, **kwargs)
    assert not cpattn.is_sdpa_patched()
    assert len(masks_seen) == 2, "every layer's attention must go through cpattn"
    assert masks_seen == [padded, padded]
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max().item() <= 1e-5 * max(1.0, r.abs().max().item())


@pytest.fixture(scope="module")
def cp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "results.json"
    code, log = run(TORCHRUN + ["--standalone", "--nproc-per-node=2", os.path.join(HERE, "hf_cp_worker.py"),
                                str(out)], timeout=240)
    assert code == 0, log[-4000:]
    return json.loads(out.read_text())


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["mha-causal-ring", "gqa-causal-ring", "gqa-causal-ulysses",
                                  "mha-global_mask-ring", "gqa-global_mask-ring"])
def test_llama_context_parallel_matches_single_device(cp_results, case):
    r = cp_results[case]
    assert r["rank_errors"] == [None, None], r.get("traceback") or r["rank_errors"]
    assert r["cp_calls"] == 2, "both layers must run context-parallel attention"
    assert r["logits_err"] <= 1e-5, r
    assert r["grad_err"] <= 1e-5, r


@pytest.mark.distributed
def test_llama_zigzag_positions_without_mask_are_refused(cp_results):
    """Zigzag position ids with no mask look like packed sequences to HF, which then builds a mask from local
    positions only. That mask is wrong under CP; cpattn must refuse it on every rank (not hang, not compute)."""
    r = cp_results["gqa-naive-ring"]
    assert all(e and e.startswith(("RankMismatchError", "InvalidArgumentError")) for e in r["rank_errors"]), r


def test_compiled_llama_fullgraph_with_patched_sdpa():
    """torch.compile(fullgraph=True) of the HF model with cpattn as its SDPA: no graph break, same logits."""
    model = _llama(2)
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(3))
    reference = model(input_ids=ids, use_cache=False).logits.detach()
    torch._dynamo.reset()
    try:
        with cpattn.sdpa_patched(), cpattn.attention_provider("native"):
            forward = lambda x: model(input_ids=x, use_cache=False).logits  # noqa: E731
            explain = torch._dynamo.explain(forward)(ids)
            torch._dynamo.reset()
            logits = torch.compile(forward, fullgraph=True, backend="aot_eager")(ids)
    finally:
        torch._dynamo.reset()
    assert explain.graph_break_count == 0, [r.reason.splitlines()[0] for r in explain.break_reasons]
    assert "cpattn.attention_fwd" in "".join(str(g.graph) for g in explain.graphs)
    assert (logits - reference).abs().max().item() <= 1e-5
