"""ONNX Runtime GenAI model folders: ``genai_config.json`` for the exported decoder."""

from __future__ import annotations


def genai_config(config, max_seq_len: int, num_layers: int, kv_heads: int, head_dim: int,
                 bos_id: int | None, eos_ids: list[int], pad_id: int | None) -> dict:
    """``genai_config.json`` for ONNX Runtime GenAI: shared-buffer static cache of ``max_seq_len`` slots."""
    text_config = config.get_text_config()
    eos = eos_ids[0] if len(eos_ids) == 1 else list(eos_ids)
    return {
        "model": {
            "type": "decoder",
            "context_length": max_seq_len,
            "vocab_size": int(text_config.vocab_size),
            "bos_token_id": bos_id if bos_id is not None else (eos_ids[0] if eos_ids else 0),
            "eos_token_id": eos,
            "pad_token_id": pad_id if pad_id is not None else (eos_ids[0] if eos_ids else 0),
            "decoder": {
                "filename": "model.onnx",
                "head_size": head_dim,
                "hidden_size": int(getattr(text_config, "hidden_size", kv_heads * head_dim)),
                "num_attention_heads": int(getattr(text_config, "num_attention_heads", kv_heads)),
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": num_layers,
                "inputs": {
                    "input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value",
                },
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "max_length": max_seq_len, "min_length": 0,
            "past_present_share_buffer": True, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
            "repetition_penalty": 1.0, "early_stopping": True, "length_penalty": 1.0,
            "no_repeat_ngram_size": 0, "num_return_sequences": 1, "diversity_penalty": 0.0,
        },
    }
