"""KV cache layers for ExecuTorch's LLM custom ops: ``[B, length, KVH, D]`` buffers (sequence on dim 1, the layout
``llama::update_cache`` / ``llama::custom_sdpa`` require) written in place by the custom op, no functional copy.

Same layer plan as ``exporter.cache`` (``cache_plan``): full-length layers and window-sized rings, only transposed;
state layers (``exporter.state_cache``) and the KV side of ``hybrid`` layers as there.

Facts (executorch 1.5.1, measured on the installed kernels):
- ``llama::update_cache(Tensor value, Tensor(a!) cache, SymInt start_pos) -> Tensor``: ``value [B, S, KVH, D]``,
  ``cache [B, max_len, KVH, D]``; copies ``value`` into slots ``start_pos .. start_pos+S-1`` (one memcpy per batch
  row); returns a dummy ``[1]`` tensor. Its meta kernel adds ``start_pos >= 0``, ``start_pos < max_len`` and
  ``start_pos + S <= max_len`` checks.
- ``llama::update_cache_with_indices(Tensor value, Tensor(a!) cache, SymInt start_pos, Tensor indices) -> Tensor``:
  ``indices [B, S]`` int64 slots (``start_pos`` ignored); used for the ring layers.
- ``start_pos`` is a SymInt; in the exported program it is ``input_pos[0].item()``, read once per forward in
  ``set_positions`` and shared by every layer's write and attention call.

Contract with ``attention.executorch_custom_ops``: ``update`` returns keys/values in ``[B, L, KVH, D]`` (not
transformers' ``[B, KVH, L, D]``) so the graph has no transpose (= copy) of the cache; the wrapper
(``exporter.backends.executorch.wrapper.BufferCacheDecoder`` with ``custom_ops=True``) passes this cache to the model
as ``executorch_cache`` and the attention reads ``start_pos`` and the layer types from it, so this layout never
reaches another attention function.
A forward's positions must be consecutive (``start .. start+S-1``), which is what ``TextLLMRunner`` passes.
"""

from __future__ import annotations

import torch

from attention.executorch_custom_ops import load_custom_ops
from exporter.cache import LayerPlan, PositionedCache, PositionedHybridLayer, PositionedKVLayer, RingKVLayer

# the attention a plan type's layer runs (``hybrid`` layers: full causal attention beside the state)
ATTENTION_TYPES = {"hybrid": "full_attention"}


class ExecuTorchKVLayer(PositionedKVLayer):
    """Full-length ``[B, max_len, KVH, D]`` layer; slot ``i`` holds position ``i``."""

    def update(self, key_states, value_states, *args, **kwargs):
        """Write ``[B, KVH, S, D]`` states at ``start_pos`` with ``llama::update_cache``; return the buffers."""
        start = self.owner.start_pos
        torch.ops.llama.update_cache(key_states.transpose(1, 2).to(self.keys.dtype), self.keys, start)
        torch.ops.llama.update_cache(value_states.transpose(1, 2).to(self.values.dtype), self.values, start)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[1], 0

    def get_max_length(self) -> int:
        return self.keys.shape[1]


class ExecuTorchRingLayer(RingKVLayer):
    """Ring ``[B, W + 1, KVH, D]`` (W live slots + trash slot); same slot arithmetic and key positions (mask) as
    ``RingKVLayer``, whose ``ring_slot_positions`` avoids ExecuTorch's truncating int ``remainder``."""

    def update(self, key_states, value_states, *args, **kwargs):
        """Return ``[ring before this forward (W), new states (S)]`` along dim 1; write the surviving new states."""
        window = self.window
        new_keys = key_states.transpose(1, 2).to(self.keys.dtype)
        new_values = value_states.transpose(1, 2).to(self.values.dtype)
        all_keys = torch.cat([self.keys[:, :window], new_keys], dim=1)
        all_values = torch.cat([self.values[:, :window], new_values], dim=1)
        positions = self.owner.positions
        seq_len = positions.shape[0]
        survives = torch.arange(seq_len, device=positions.device) >= seq_len - window
        slots = torch.where(survives, torch.remainder(positions, window), window).unsqueeze(0)
        start = self.owner.start_pos
        torch.ops.llama.update_cache_with_indices(new_keys, self.keys, start, slots)
        torch.ops.llama.update_cache_with_indices(new_values, self.values, start, slots)
        return all_keys, all_values


class ExecuTorchHybridLayer(ExecuTorchKVLayer, PositionedHybridLayer):
    """``ExecuTorchKVLayer`` with a state beside it (``hybrid`` layers)."""


class ExecuTorchCache(PositionedCache):
    """``PositionedCache`` over ``[B, length, KVH, D]`` tensors; ``set_positions`` also reads ``start_pos``."""

    full_layer, ring_layer, hybrid_layer = ExecuTorchKVLayer, ExecuTorchRingLayer, ExecuTorchHybridLayer

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], plan: list[LayerPlan], max_len: int,
                 states: list | None = None):
        load_custom_ops()
        self.functional = False
        self.positions = None
        self.start_pos = None
        self.plan = plan
        self.max_len = max_len  # positions never reach it (rings are shorter, full-length layers are this long)
        super(PositionedCache, self).__init__(layers=self.make_layers(keys, values, plan, states))

    def layer_type(self, layer_idx: int | None) -> str | None:
        """The attention type of decoder layer ``layer_idx`` (the plan's type: ``full_attention``...; a ``hybrid``
        layer's attention is ``full_attention``), None for an unknown layer."""
        if layer_idx is None:
            return None
        kind = self.plan[layer_idx].type
        return ATTENTION_TYPES.get(kind, kind)

    def set_positions(self, positions: torch.Tensor) -> None:
        """``positions [S]`` int64, consecutive; ``positions[0]`` becomes the graph's one ``start_pos`` SymInt.
        A forward at position 0 starts a new sequence (state layers read zeros)."""
        super().set_positions(positions)
        start = positions[0].item()
        torch._check(start >= 0)
        torch._check(start + positions.shape[0] <= self.max_len)
        self.start_pos = start


def bshd_cache_tensors(plan: list[LayerPlan], dtype: torch.dtype | None = None):
    """Zero ``[B, length, KVH, D]`` key and value tensors for ``plan`` (its shapes are ``[B, KVH, length, D]``;
    None for layers without a KV cache)."""
    keys, values = [], []
    for layer in plan:
        if not layer.has_kv:
            keys.append(None)
            values.append(None)
            continue
        (b, kvh, length, dk), (_, vh, _, dv) = layer.key_shape, layer.value_shape
        if (kvh, dk) != (vh, dv):
            raise NotImplementedError("llama::custom_sdpa needs keys and values of one shape (no MLA)")
        keys.append(torch.zeros(b, length, kvh, dk, dtype=dtype or layer.dtype))
        values.append(torch.zeros(b, length, vh, dv, dtype=dtype or layer.dtype))
    return keys, values
