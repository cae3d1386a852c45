"""Export the IO-cache decoder to ONNX with ``torch.onnx.export(dynamo=True)``.

Graph contract (ONNX Runtime GenAI, ``past_present_share_buffer: true``):
inputs ``input_ids [B,S] int64``, ``attention_mask [B,T] int64``, ``position_ids [B,S] int64``,
``past_key_values.N.key/value [B,KVH,max_len,D]``; outputs ``logits [B,S,V]`` and
``present.N.key/value [B,KVH,max_len,D]`` (the past with this step's entries written at slots T-S..T-1).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.export import Dim


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the decoder graph, in positional order."""
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_onnx(wrapper, path: Path) -> None:
    """Write ``path`` (+ ``path.data`` external weights) for ``IOCacheDecoder`` ``wrapper``; batch, S and T dynamic."""
    max_len = wrapper.max_seq_len
    example_len = min(2, max_len)
    input_ids = torch.zeros(1, example_len, dtype=torch.long)
    attention_mask = torch.ones(1, example_len, dtype=torch.long)
    position_ids = torch.arange(example_len, dtype=torch.long)[None]
    past = wrapper.empty_past(1)
    batch = Dim("batch", min=1, max=64)
    seq = Dim("seq_len", min=1, max=max_len)
    total = Dim("total_len", min=1, max=max_len)
    cache_shape = {0: batch}
    dynamic_shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: total},
        {0: batch, 1: seq},
        tuple(cache_shape for _ in past),  # the *past_key_values varargs form one nested entry
    )
    input_names, output_names = io_names(wrapper.num_layers)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            (input_ids, attention_mask, position_ids, *past),
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
        program.save(str(path), external_data=True)


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
