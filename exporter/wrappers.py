"""Export wrappers: a transformers causal LM plus a positioned static KV cache, with a fixed tensor interface.

- ``BufferCacheDecoder`` (ExecuTorch): ``forward(tokens [1,S], input_pos [S]) -> logits [1,S,V]``; the cache lives in
  the module as mutable buffers, written in place.
- ``IOCacheDecoder`` (ONNX): ``forward(input_ids [B,S], attention_mask [B,T], position_ids [B,S], *past)``
  ``-> (logits [B,S,V], *present)``; this step's tokens take positions (= cache slots) ``T-S .. T-1`` (the ORT GenAI
  shared-buffer contract: T = tokens so far including this step); ``position_ids`` feed the position embeddings.
See ``exporter.cache`` for the per-layer layouts (full-length or ring).
"""

from __future__ import annotations

import torch
from torch import nn

from exporter.cache import PositionedCache, cache_plan, empty_cache_tensors


class BufferCacheDecoder(nn.Module):
    """Decoder with its KV cache as mutable buffers (``k_cache_N`` / ``v_cache_N``)."""

    def __init__(self, model, max_seq_len: int):
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len
        self.plan = cache_plan(model, 1, max_seq_len)
        keys, values = empty_cache_tensors(self.plan)
        for i, (k, v) in enumerate(zip(keys, values)):
            self.register_buffer(f"k_cache_{i}", k, persistent=False)
            self.register_buffer(f"v_cache_{i}", v, persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        keys = [getattr(self, f"k_cache_{i}") for i in range(len(self.plan))]
        values = [getattr(self, f"v_cache_{i}") for i in range(len(self.plan))]
        cache = PositionedCache(keys, values, self.plan, functional=False)
        cache.set_positions(input_pos)
        out = self.model(input_ids=tokens, position_ids=input_pos.unsqueeze(0), cache=cache, use_cache=True)
        return out.logits

    def reset_cache(self) -> None:
        """Zero every cache buffer (a fresh sequence)."""
        for name, buf in self.named_buffers():
            if name.startswith(("k_cache_", "v_cache_")):
                buf.zero_()


class IOCacheDecoder(nn.Module):
    """Decoder whose static cache is passed in and returned (functional writes).

    Every layer's cache is full length, windowed layers included (their window is applied by the mask): ONNX
    Runtime GenAI allocates one shared buffer shape for all layers.
    """

    def __init__(self, model, max_seq_len: int):
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len
        self.plan = cache_plan(model, 1, max_seq_len, rings=False)
        self.num_layers = len(self.plan)

    def forward(self, input_ids, attention_mask, position_ids, *past_key_values):
        seq_len, total_len = input_ids.shape[1], attention_mask.shape[1]
        cache = PositionedCache(list(past_key_values[0::2]), list(past_key_values[1::2]), self.plan, functional=True)
        cache.set_positions(torch.arange(seq_len, device=input_ids.device) + (total_len - seq_len))
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        return (out.logits, *cache.key_value_tensors())

    def empty_past(self, batch_size: int = 1) -> list[torch.Tensor]:
        """Zero past tensors ``[k0, v0, k1, v1, ...]`` for a fresh sequence."""
        keys, values = empty_cache_tensors(self.plan)
        return [t.expand(batch_size, *t.shape[1:]).contiguous() for pair in zip(keys, values) for t in pair]
