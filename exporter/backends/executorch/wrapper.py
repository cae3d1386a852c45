"""The ExecuTorch export wrapper: a transformers causal LM plus a positioned static KV cache held as mutable buffers.

``BufferCacheDecoder.forward(tokens [1,S], input_pos [S]) -> logits [1,S,V]`` (what ExecuTorch's ``TextLLMRunner``
calls); the cache lives in the module as buffers ``k_cache_N`` / ``v_cache_N``, written in place. See
``exporter.cache`` for the per-layer layouts (full-length or ring).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from attention.executorch_custom_ops import CACHE_KWARG
from exporter.backends.executorch.cache import ExecuTorchCache, bshd_cache_tensors
from exporter.cache import PositionedCache, cache_plan, empty_cache_tensors
from exporter.checkpoint import LayerSpec


class BufferCacheDecoder(nn.Module):
    """Decoder with its KV cache as mutable buffers (``k_cache_N`` / ``v_cache_N``).

    ``custom_ops=False``: ``[1, KVH, length, D]`` buffers written by ``index_copy`` (``exporter.cache``), any
    attention function. ``custom_ops=True``: ``[1, length, KVH, D]`` buffers written by ExecuTorch's
    ``llama::update_cache`` (``exporter.backends.executorch.cache``); the model must use
    ``attention.executorch_custom_ops``. Both keep window-sized rings for sliding-window layers.
    """

    def __init__(self, model, layers: Sequence[LayerSpec], max_seq_len: int, custom_ops: bool = False):
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len
        self.custom_ops = custom_ops
        self.plan = cache_plan(model, layers, 1, max_seq_len)
        keys, values = bshd_cache_tensors(self.plan) if custom_ops else empty_cache_tensors(self.plan)
        for i, (k, v) in enumerate(zip(keys, values)):
            self.register_buffer(f"k_cache_{i}", k, persistent=False)
            self.register_buffer(f"v_cache_{i}", v, persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        keys = [getattr(self, f"k_cache_{i}") for i in range(len(self.plan))]
        values = [getattr(self, f"v_cache_{i}") for i in range(len(self.plan))]
        extra = {}
        if self.custom_ops:
            cache = ExecuTorchCache(keys, values, self.plan, self.max_seq_len)
            cache.set_positions(input_pos)
            extra[CACHE_KWARG] = cache
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
