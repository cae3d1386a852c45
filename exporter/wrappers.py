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
    """Decoder with its KV cache as mutable buffers (``k_cache_N`` / ``v_cache_N``).

    ``custom_ops=False``: ``[1, KVH, length, D]`` buffers written by ``index_copy`` (``exporter.cache``), any
    attention function. ``custom_ops=True``: ``[1, length, KVH, D]`` buffers written by ExecuTorch's
    ``llama::update_cache`` (``exporter.executorch_cache``); the model must use ``attention.executorch_sdpa``.
    Both keep window-sized rings for sliding-window layers.
    """

    def __init__(self, model, max_seq_len: int, custom_ops: bool = False):
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len
        self.custom_ops = custom_ops
        self.plan = cache_plan(model, 1, max_seq_len)
        if custom_ops:
            from exporter.executorch_cache import bshd_cache_tensors

            keys, values = bshd_cache_tensors(self.plan)
        else:
            keys, values = empty_cache_tensors(self.plan)
        for i, (k, v) in enumerate(zip(keys, values)):
            self.register_buffer(f"k_cache_{i}", k, persistent=False)
            self.register_buffer(f"v_cache_{i}", v, persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        keys = [getattr(self, f"k_cache_{i}") for i in range(len(self.plan))]
        values = [getattr(self, f"v_cache_{i}") for i in range(len(self.plan))]
        extra = {}
        if self.custom_ops:
            from attention.executorch_sdpa import START_POS_KWARG
            from exporter.executorch_cache import ExecuTorchCache

            cache = ExecuTorchCache(keys, values, self.plan, self.max_seq_len)
            cache.set_positions(input_pos)
            extra[START_POS_KWARG] = cache.start_pos
        else:
            cache = PositionedCache(keys, values, self.plan, functional=False)
            cache.set_positions(input_pos)
        out = self.model(input_ids=tokens, position_ids=input_pos.unsqueeze(0), cache=cache, use_cache=True, **extra)
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


# --- dynamic (concatenating) cache for ONNX Runtime GenAI's past_present_share_buffer: false ---------------------
from transformers.cache_utils import Cache  # noqa: E402

from exporter.cache import PositionedKVLayer  # noqa: E402


class ConcatKVLayer(PositionedKVLayer):
    """A growing cache: ``update`` appends this step's ``[B, KVH, S, D]`` states to the past (slot ``i`` holds
    position ``i``); windows are applied by the mask alone."""

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys = torch.cat([self.keys, key_states.to(self.keys.dtype)], dim=2)
        self.values = torch.cat([self.values, value_states.to(self.values.dtype)], dim=2)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Keys after this step's append: the ``P`` past positions then the ``S`` new ones."""
        return self.keys.shape[2] + query_length, 0


class ConcatCache(PositionedCache):
    """``PositionedCache`` whose layers concatenate (``ConcatKVLayer``) instead of writing at positions."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], plan):
        Cache.__init__(self, layers=[ConcatKVLayer(k, v, self, sliding=layer.sliding)
                                     for k, v, layer in zip(keys, values, plan)])
        self.functional = True
        self.positions = None


class ConcatCacheDecoder(nn.Module):
    """Decoder with the dynamic (concatenating) cache contract of ONNX Runtime GenAI
    (``past_present_share_buffer: false``): ``forward(input_ids [B,S], attention_mask [B,P+S], position_ids [B,S],
    *past [B,KVH,P,D]) -> (logits [B,S,V], *present [B,KVH,P+S,D])``. This step's tokens take positions
    ``P .. P+S-1``; sliding windows are applied by the mask (every layer keeps the whole sequence)."""

    def __init__(self, model, max_seq_len: int):
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len
        self.plan = cache_plan(model, 1, max_seq_len, rings=False)
        self.num_layers = len(self.plan)

    def forward(self, input_ids, attention_mask, position_ids, *past_key_values):
        seq_len, past_len = input_ids.shape[1], past_key_values[0].shape[2]
        cache = ConcatCache(list(past_key_values[0::2]), list(past_key_values[1::2]), self.plan)
        cache.set_positions(torch.arange(seq_len, device=input_ids.device) + past_len)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        return (out.logits, *cache.key_value_tensors())

    def empty_past(self, batch_size: int = 1, past_len: int = 0) -> list[torch.Tensor]:
        """Past tensors ``[k0, v0, k1, v1, ...]`` of ``past_len`` zero entries (0: a fresh sequence)."""
        return [torch.zeros(batch_size, shape[1], past_len, shape[3], dtype=layer.dtype)
                for layer in self.plan for shape in (layer.key_shape, layer.value_shape)]
