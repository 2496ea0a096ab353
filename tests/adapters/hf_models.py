"""Tiny random-weight transformers models and batches for the tests of cpattn.integrations.transformers.

Every model is built from a config in code (nothing is downloaded), with the same weights for a given seed
whatever its attention implementation, so a model on attn_implementation="cpattn" can be compared with the
same model on its own "sdpa" (or "eager", for models that declare no SDPA support).
"""

from __future__ import annotations

import torch

VOCAB = 64
SEQ = 19  # tokens per row: odd, so shards are uneven on 2 and 3 ranks
WINDOW = 5  # sliding windows shorter than the sequence and than a shard's reach


def _decoder_kwargs(**extra) -> dict:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    return {**base, **extra}


def _configs() -> dict:
    import transformers as tf

    layer_types = ["sliding_attention", "full_attention"]  # alternating local and global layers
    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, _decoder_kwargs(), "sdpa"),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, _decoder_kwargs(head_dim=8), "sdpa"),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, _decoder_kwargs(head_dim=8, sliding_window=WINDOW),
                    "sdpa"),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,
                   _decoder_kwargs(head_dim=8, sliding_window=WINDOW, layer_types=layer_types,
                                   attn_logit_softcapping=5.0), "eager"),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
                   _decoder_kwargs(head_dim=8, sliding_window=WINDOW, layer_types=layer_types), "sdpa"),
        "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM,
                    _decoder_kwargs(head_dim=8, sliding_window=WINDOW, layer_types=layer_types, intermediate_size=32,
                                    num_local_experts=4, num_experts_per_tok=2,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), "eager"),
        "whisper": (tf.WhisperConfig, tf.WhisperForConditionalGeneration,
                    dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                         max_source_positions=8, max_target_positions=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None,
                         suppress_tokens=None), "sdpa"),
        # its decoder embeds positions from the input length and takes no position ids: refused under a mesh
        "bart": (tf.BartConfig, tf.BartForConditionalGeneration,
                 dict(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1), "sdpa"),
        "t5": (tf.T5Config, tf.T5ForConditionalGeneration,
               dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1), "sdpa"),
    }


MODELS = ("llama", "qwen3", "mistral", "gemma2", "gemma3", "gpt_oss", "whisper", "t5", "bart")
ENCODER_DECODER = ("whisper", "t5", "bart")


def reference_implementation(name: str) -> str:
    """The model's own attention implementation the cpattn one is compared with."""
    return _configs()[name][3]


def build(name: str, attn_implementation: str, seed: int = 0):
    """The named model, float32, in eval mode, its weights fixed by `seed`."""
    config_cls, model_cls, kwargs, _ = _configs()[name]
    config = config_cls(**kwargs)
    config._attn_implementation = attn_implementation  # what from_pretrained(attn_implementation=...) sets
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    assert model.config._attn_implementation == attn_implementation
    return model


DOCUMENTS = [2, 23, 1, 6]  # a 'documents' row: one document longer than the stream over 2 or 3 ranks, one token


def batch(name: str, kind: str = "plain", rows: int = 2, seq: int = SEQ, seed: int = 1) -> dict:
    """A full batch: 'plain' (no mask), 'padded' (right padding, its labels ignored), 'packed' (one row of
    documents, position ids restarting at 0 per document, the first label of each ignored), 'documents' (one
    row of DOCUMENTS, as 'packed') or 'collated' ('documents' with the cu_seq_lens_q/k and max_length_q/k that
    transformers' DataCollatorWithFlattening(return_flash_attn_kwargs=True) adds)."""
    gen = torch.Generator().manual_seed(seed)
    if name in ENCODER_DECODER:
        return _seq2seq_batch(name, rows, seq, gen)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=gen)
    out = {"input_ids": ids, "labels": ids.clone()}
    if kind == "padded":
        mask = torch.ones_like(ids)
        mask[0, seq - 4:] = 0
        mask[1, seq - 1:] = 0
        out["attention_mask"] = mask
        out["labels"] = ids.masked_fill(mask == 0, -100)
    elif kind == "packed":
        lengths = [7, 5, seq - 12]
        out = {"input_ids": ids[:1], "labels": ids[:1].clone(),
               "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
        out["labels"][0, torch.tensor([0, 7, 12])] = -100  # a document's first token is no one's target
    elif kind in ("documents", "collated"):
        ids = torch.randint(3, VOCAB, (1, sum(DOCUMENTS)), generator=gen)
        starts = torch.tensor([0, *DOCUMENTS[:-1]]).cumsum(0)
        positions = torch.cat([torch.arange(n) for n in DOCUMENTS])[None]
        out = {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}
        out["labels"][0, starts] = -100
        if kind == "collated":
            cu = torch.tensor([0, *DOCUMENTS]).cumsum(0).to(torch.int32)
            out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(DOCUMENTS), max_length_k=max(DOCUMENTS))
    return out


def _seq2seq_batch(name: str, rows: int, seq: int, gen) -> dict:
    decoder_ids = torch.randint(3, VOCAB, (rows, seq), generator=gen)
    labels = torch.randint(3, VOCAB, (rows, seq), generator=gen)
    if name == "whisper":
        encoder = {"input_features": torch.randn(rows, 8, 16, generator=gen)}
    else:
        encoder = {"input_ids": torch.randint(3, VOCAB, (rows, 11), generator=gen)}
    return {**encoder, "decoder_input_ids": decoder_ids, "labels": labels}


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, causal_lm: bool) -> torch.Tensor:
    """Mean cross-entropy of the whole batch on one device (targets shifted for causal LMs), as transformers'
    losses compute it."""
    if causal_lm:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                             ignore_index=-100)
