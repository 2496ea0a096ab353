"""transformers models on attn_implementation="cpattn" on one device: registration, parity with the model's own
attention (logits and gradients), greedy generation with a KV cache, models without SDPA support, refusals.

Tiny random-weight models from tests/adapters/hf_models.py; the context-parallel side is in
test_hf_integration_cp.py.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (the dev extra pins it: pip install -e '.[dev]')"
)

import cpattn  # noqa: E402
import cpattn.integrations.transformers as hf  # noqa: E402
import hf_models  # noqa: E402

PROVIDER = "math"  # on CPU the one provider with windows, softcap and sinks, forward and backward


@pytest.fixture
def dispatched(monkeypatch):
    """Every attention_dispatch call the integration makes: (q_len, kv_len, attn_mask, is_causal, window)."""
    calls = []
    real = hf.attention_dispatch

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                  **mods):
        calls.append((query.shape[-2], key.shape[-2], attn_mask, is_causal, mods.get("window")))
        return real(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, **mods)
    monkeypatch.setattr(hf, "attention_dispatch", recording)
    return calls


def _attention_modules(model) -> int:
    """Attention modules, each calling transformers' attention interface once per forward (self and cross)."""
    return sum(1 for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "is_causal"))


def _forward_backward(model, batch: dict, causal_lm: bool):
    model.zero_grad()
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    hf_models.reference_loss(logits, batch["labels"], causal_lm).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_registered_on_import_and_register_is_idempotent():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    hf.register()
    hf.register()
    assert AttentionInterface()["cpattn"] is hf.cpattn_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["cpattn"] is hf.cpattn_mask
    assert transformers.__version__ == hf.TESTED_VERSION  # the dev extra pins the tested release


def test_set_attn_implementation_switches_a_built_model(dispatched):
    model = hf_models.build("llama", "sdpa")
    model.set_attn_implementation("cpattn")
    ids = hf_models.batch("llama")["input_ids"]
    with cpattn.attention_provider(PROVIDER):
        model(input_ids=ids, use_cache=False)
    assert model.config._attn_implementation == "cpattn"
    assert len(dispatched) == model.config.num_hidden_layers


CASES = [(name, "plain") for name in hf_models.MODELS] + [
    (name, kind) for name in ("llama", "mistral", "gemma2", "gpt_oss") for kind in ("padded", "packed")]


@pytest.mark.parametrize("name,kind", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_matches_the_models_own_attention(name, kind, dispatched):
    """Logits and every parameter's gradient equal those of the same model on its own sdpa or eager."""
    causal_lm = name not in hf_models.ENCODER_DECODER
    batch = hf_models.batch(name, kind)
    ref_logits, ref_grads = _forward_backward(hf_models.build(name, hf_models.reference_implementation(name)), batch,
                                              causal_lm)
    model = hf_models.build(name, "cpattn")
    with cpattn.attention_provider("native" if name == "t5" else PROVIDER):  # T5's bias needs mask gradients
        logits, grads = _forward_backward(model, batch, causal_lm)
    assert len(dispatched) == _attention_modules(model) >= 2, "every attention layer must run on cpattn"
    real = batch["attention_mask"].bool() if kind == "padded" else torch.ones(logits.shape[:2], dtype=torch.bool)
    assert (logits - ref_logits)[real].abs().max().item() <= 1e-5
    assert set(grads) == set(ref_grads)
    for n, g in grads.items():
        assert (g - ref_grads[n]).abs().max().item() <= 1e-5 * max(1.0, ref_grads[n].abs().max().item()), n


@pytest.mark.parametrize("name", ["gemma2", "gpt_oss"])
def test_models_without_sdpa_run_through_cpattn(name, dispatched):
    """Gemma 2 and gpt-oss declare no SDPA support: transformers refuses "sdpa" for them, and an SDPA patch never
    sees their eager attention. Under "cpattn" their softcap and sinks reach cpattn on every layer."""
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        hf_models.build(name, "sdpa").set_attn_implementation("sdpa")
    model = hf_models.build(name, "cpattn")
    seen = []
    real = hf.cpattn_attention_forward

    def spy(module, *args, **kwargs):
        seen.append((kwargs.get("softcap"), kwargs.get("s_aux") is not None, kwargs.get("sliding_window")))
        return real(module, *args, **kwargs)
    transformers.AttentionInterface.register("cpattn", spy)
    try:
        with cpattn.attention_provider(PROVIDER):
            model(input_ids=hf_models.batch(name)["input_ids"], use_cache=False)
    finally:
        hf.register()
    assert len(dispatched) == len(seen) == model.config.num_hidden_layers
    assert [window for *_, window in seen] == [hf_models.WINDOW, None]  # local, then global
    assert all(softcap == 5.0 for softcap, *_ in seen) if name == "gemma2" else all(sinks for _, sinks, _ in seen)


def test_sliding_window_reaches_the_kernel_as_a_window(dispatched):
    """No padding, one span: the mask is left to is_causal and window=(W-1, 0), which kernels with windows run
    without the work outside them, rather than a dense boolean mask."""
    model = hf_models.build("gemma2", "cpattn")
    with cpattn.attention_provider(PROVIDER):
        model(input_ids=hf_models.batch("gemma2")["input_ids"], use_cache=False)
    assert [(mask, causal, window) for _, _, mask, causal, window in dispatched] == [
        (None, True, (hf_models.WINDOW - 1, 0)), (None, True, None)]


GENERATION = ["llama", "mistral", "gemma2", "gemma3", "gpt_oss", "whisper"]


@pytest.mark.parametrize("name", GENERATION)
def test_greedy_generation_matches_the_models_own(name, dispatched):
    """generate() with a KV cache: prefill, then one query against every cached key (bottom-right causal), past
    the sliding window; the tokens equal those of the model's own attention."""
    inputs = {k: v for k, v in hf_models.batch(name, seq=9).items() if k not in ("labels", "decoder_input_ids")}
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    expected = hf_models.build(name, hf_models.reference_implementation(name)).generate(**inputs, **settings)
    model = hf_models.build(name, "cpattn")
    with cpattn.attention_provider(PROVIDER):
        tokens = model.generate(**inputs, **settings)
    assert torch.equal(tokens, expected)
    assert any(q == 1 and kv > 1 for q, kv, *_ in dispatched), "decoding must run on the cache"


def test_left_padded_generation_matches():
    inputs = {"input_ids": hf_models.batch("mistral", seq=9)["input_ids"]}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, :3] = 0
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    expected = hf_models.build("mistral", "sdpa").generate(**inputs, **settings)
    with cpattn.attention_provider(PROVIDER):
        assert torch.equal(hf_models.build("mistral", "cpattn").generate(**inputs, **settings), expected)


@pytest.mark.parametrize("keyword,value,match", [
    ("head_mask", torch.ones(4), "head_mask is not supported"),
    ("output_attentions", True, "output_attentions=True is not supported"),
    ("cache", object(), "paged KV cache"),
])
def test_what_cannot_be_honoured_is_refused_naming_the_layer(keyword, value, match):
    layer = hf_models.build("llama", "cpattn").model.layers[1].self_attn
    q = k = v = torch.randn(1, 4, 5, 8)
    with pytest.raises(cpattn.UnsupportedInputError, match=match) as info:
        hf.cpattn_attention_forward(layer, q, k[:, :2], v[:, :2], None, **{keyword: value})
    assert str(info.value).startswith("LlamaAttention (layer 1)")


def test_provider_refusals_name_the_layer():
    """A provider that cannot take a layer's call (SDPA has no softcap) is refused with the layer's name."""
    model = hf_models.build("gemma2", "cpattn")
    with cpattn.attention_provider("native"), pytest.raises(cpattn.UnsupportedInputError) as info:
        model(input_ids=hf_models.batch("gemma2")["input_ids"], use_cache=False)
    assert str(info.value).startswith("Gemma2Attention (layer 0): ") and "softcap" in str(info.value)


def test_dropout_only_while_training():
    layer = hf_models.build("llama", "cpattn").model.layers[0].self_attn
    q, kv = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    with cpattn.attention_provider(PROVIDER):
        a = hf.cpattn_attention_forward(layer, q, kv, kv, None, dropout=0.5)[0]
        b = hf.cpattn_attention_forward(layer, q, kv, kv, None, dropout=0.0)[0]
        layer.train()
        c = hf.cpattn_attention_forward(layer, q, kv, kv, None, dropout=0.5)[0]
    assert a.shape == (1, 6, 4, 8)  # transformers' (batch, tokens, heads, head dim)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cp_loss_without_a_mesh_is_the_mean_token_loss():
    logits = torch.randn(2, 7, hf_models.VOCAB)
    labels = torch.randint(0, hf_models.VOCAB, (2, 7))
    labels[0, :3] = -100
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert torch.allclose(hf.cp_loss(logits, labels), expected)


def _per_document_logits(model, batch: dict) -> torch.Tensor:
    """Every document of a packed row run on its own: what packing means."""
    out, start = [], 0
    for n in hf_models.DOCUMENTS:
        out.append(model(input_ids=batch["input_ids"][:, start:start + n], position_ids=torch.arange(n)[None],
                         use_cache=False).logits)
        start += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", ["llama", "gpt_oss", "gemma2"])
def test_collated_packed_row_attends_within_documents(name):
    """DataCollatorWithFlattening's cu_seq_lens_q reach attention; where no mask tensor holds the documents
    (gpt-oss builds its masks without the position ids, so transformers' own packed row attends across them)
    cpattn runs the packed schedules over those documents: the logits of each document run alone."""
    batch = hf_models.batch(name, "collated")
    with torch.no_grad(), cpattn.attention_provider(PROVIDER):
        want = _per_document_logits(hf_models.build(name, "cpattn"), batch)
        got = hf_models.build(name, "cpattn")(**{k: v for k, v in batch.items() if k != "labels"},
                                               use_cache=False).logits
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("change,words", [
    (lambda b: {**b, "input_ids": b["input_ids"].expand(2, -1)}, "one packed stream: a batch of one row"),
    (lambda b: {**b, "attention_mask": torch.ones_like(b["input_ids"]).index_fill(1, torch.tensor([3]), 0)},
     "takes no padding"),
    (lambda b: {**b, "position_ids": b["position_ids"] + 1}, "position_ids are not each token's position"),
    (lambda b: {**b, "cu_seq_lens_k": torch.tensor([0, 32], dtype=torch.int32)}, "must equal cu_seq_lens_q"),
    (lambda b: {**b, "cu_seq_lens_q": torch.tensor([0, 5, 31]), "cu_seq_lens_k": None}, "end at the row's 32"),
    (lambda b: {"decoder_input_ids": b["input_ids"], "input_ids": b["input_ids"]}, "decoder-only"),
])
def test_shard_batch_by_documents_refuses_what_it_cannot_shard(change, words):
    with pytest.raises(cpattn.InvalidArgumentError, match=words):
        hf.shard_batch(change(hf_models.batch("llama", "collated")), None, layout="documents")


@pytest.mark.parametrize("kind", ["documents", "collated"])
def test_shard_batch_by_documents_reads_the_documents(kind):
    """From cu_seq_lens_q, else from where the position ids restart; one rank's shard of them is the whole row
    (the layout's helpers take no mesh as one rank), labels shifted, the marks attention reads."""
    full = hf_models.batch("llama", kind)
    batch = hf.shard_batch(full, None, layout="documents")
    cu = torch.tensor([0, *hf_models.DOCUMENTS]).cumsum(0)
    assert torch.equal(batch["cu_seq_lens_q"], cu.int()) and torch.equal(batch["cu_seq_lens_k"], cu.int())
    assert batch["max_length_q"] == batch["max_length_k"] == max(hf_models.DOCUMENTS)
    assert torch.equal(batch["position_ids"], full["position_ids"]) and batch["attention_mask"].all()
    assert torch.equal(batch["labels"][0, :-1], full["labels"][0, 1:]) and batch["labels"][0, -1] == -100
    assert batch["num_items_in_batch"] == (full["labels"][0, 1:] != -100).sum()


def test_the_stream_is_read_and_its_positions_checked_once_per_forward(monkeypatch):
    """Every layer gets the same cu_seq_lens_q and position ids: the first layer reads them (device syncs on a
    GPU) and checks the positions; the others take the host copy. New or changed tensors are read and checked
    again, so positions changed in place to wrong ones are still refused."""
    given = []
    real = hf.packed_attention

    def recording(q, k, v, cu_seqlens, **kwargs):
        given.append((cu_seqlens.device.type, kwargs["position_ids"] is not None))
        return real(q, k, v, cu_seqlens, **kwargs)
    monkeypatch.setattr(hf, "packed_attention", recording)
    batch = hf.shard_batch(hf_models.batch("llama", "collated"), None, layout="documents")  # all-ones mask
    batch = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels", "num_items_in_batch")}
    model = hf_models.build("llama", "cpattn")
    with torch.no_grad(), cpattn.attention_provider(PROVIDER):
        model(**batch, use_cache=False)
        model(**batch, use_cache=False)
        assert given == [("cpu", True), ("cpu", False), ("cpu", False), ("cpu", False)], given
        batch["position_ids"] = batch["position_ids"].clone()
        model(**batch, use_cache=False)
        assert given[4:] == [("cpu", True), ("cpu", False)], given
        batch["position_ids"][0, 3] += 1  # the same tensor, changed in place: its version tells
        with pytest.raises(cpattn.InvalidArgumentError, match="position_ids are not each token's position"):
            model(**batch, use_cache=False)
