"""The ExecuTorch export wrapper: a transformers causal LM plus a positioned static KV cache held as mutable buffers.

``BufferCacheDecoder.forward(tokens [1,S], input_pos [S]) -> logits [1,S,V]`` (what ExecuTorch's ``TextLLMRunner``
calls); the cache lives in the module as buffers ``k_cache_N`` / ``v_cache_N``, written in place. See
``exporter.cache`` for the per-layer layouts (full-length or ring).

State layers (convolution / SSM / linear attention, ``exporter.state_cache``) keep their state beside the KV cache
as buffers ``conv_state_N`` / ``recurrent_state_N`` (``N`` = the decoder layer), written back in place at the end of
every forward. ``input_pos`` is the one rule: a forward starting at position 0 begins a new sequence and every
state reads as zeros; otherwise the state continues (a long prompt comes in chunks at increasing positions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from attention.executorch_custom_ops import CACHE_KWARG
from exporter.backends.executorch.cache import ExecuTorchCache, bshd_cache_tensors
from exporter.cache import PositionedCache, cache_plan, empty_cache_tensors, empty_state_tensors, has_state
from exporter.checkpoint import LayerSpec
from exporter.state_cache import state_details

BUFFER_PREFIXES = ("k_cache_", "v_cache_", "conv_state_", "recurrent_state_")


class BufferCacheDecoder(nn.Module):
    """Decoder with its KV cache as mutable buffers (``k_cache_N`` / ``v_cache_N``) and, for state layers, its
    state (``conv_state_N`` / ``recurrent_state_N``).

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
        self.stateful = has_state(self.plan)
        self.state_kernels: dict = {}  # how the state kernels computed, set by the capture
        keys, values = bshd_cache_tensors(self.plan) if custom_ops else empty_cache_tensors(self.plan)
        for i, (k, v) in enumerate(zip(keys, values)):
            if k is not None:
                self.register_buffer(f"k_cache_{i}", k, persistent=False)
                self.register_buffer(f"v_cache_{i}", v, persistent=False)
        for i, state in enumerate(empty_state_tensors(self.plan)):
            if state is not None:
                self.register_buffer(f"conv_state_{i}", state[0], persistent=False)
                if state[1] is not None:
                    self.register_buffer(f"recurrent_state_{i}", state[1], persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        if self.stateful:
            return self._stateful_forward(tokens, input_pos)
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

    def _buffer(self, name: str) -> torch.Tensor | None:
        return self._buffers.get(name)

    def _stateful_forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """``forward`` for plans with state layers: the states are read from their buffers, start at zero for a
        forward at position 0 (``exporter.state_cache``), and are copied back once the model has run."""
        count = len(self.plan)
        keys = [self._buffer(f"k_cache_{i}") for i in range(count)]
        values = [self._buffer(f"v_cache_{i}") for i in range(count)]
        states = [(self._buffer(f"conv_state_{i}"), self._buffer(f"recurrent_state_{i}"))
                  if layer.state is not None else None for i, layer in enumerate(self.plan)]
        extra = {}
        if self.custom_ops:
            cache = ExecuTorchCache(keys, values, self.plan, self.max_seq_len, states=states)
            extra[CACHE_KWARG] = cache
        else:
            cache = PositionedCache(keys, values, self.plan, functional=False, states=states)
        cache.set_positions(input_pos)
        out = self.model(input_ids=tokens, position_ids=input_pos.unsqueeze(0), cache=cache, use_cache=True, **extra)
        for i, layer in enumerate(cache.layers):
            if self.plan[i].state is not None:
                self._buffer(f"conv_state_{i}").copy_(layer.conv_states[0])
                if layer.recurrent_states[0] is not None:
                    self._buffer(f"recurrent_state_{i}").copy_(layer.recurrent_states[0])
        return out.logits

    def state_details(self) -> dict:
        """Build details of the state layers (``{}`` without any): buffers, ``input_pos`` rule, prefill kernels."""
        return state_details(self.plan, self.state_kernels, lambda i: (f"conv_state_{i}", f"recurrent_state_{i}"))

    def reset_cache(self) -> None:
        """Zero every cache and state buffer (a fresh sequence)."""
        for name, buf in self.named_buffers():
            if name.startswith(BUFFER_PREFIXES):
                buf.zero_()
