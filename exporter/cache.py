"""Static KV caches written at explicit positions, for exported programs.

gpt-fast style: each layer's cache is a ``[B, KVH, max_len, D]`` tensor; a forward writes its new keys/values at
the positions it is given (``index_copy``), and the mask decides which slots are visible. The write positions come
from the program's inputs, never from Python-side counters, so one exported graph serves prefill and decode.

Two write modes:
- in place (``index_copy_`` on registered buffers): the ExecuTorch program owns the cache as mutable buffers;
- functional (``index_copy``): the ONNX graph takes the cache as inputs and returns the updated one as outputs.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache


class PositionedKVLayer(CacheLayerMixin):
    """One attention layer's static cache; ``update`` writes at the cache's current ``positions [S]``."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, owner: "PositionedCache"):
        super().__init__()
        self.keys, self.values, self.owner = keys, values, owner
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # tensors are given up front
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        """Write ``key_states/value_states [B, KVH, S, D]`` at ``owner.positions`` and return the whole cache."""
        positions = self.owner.positions
        if self.owner.functional:
            self.keys = self.keys.index_copy(2, positions, key_states.to(self.keys.dtype))
            self.values = self.values.index_copy(2, positions, value_states.to(self.values.dtype))
        else:
            self.keys.index_copy_(2, positions, key_states.to(self.keys.dtype))
            self.values.index_copy_(2, positions, value_states.to(self.values.dtype))
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The mask spans every slot; slot ``i`` holds position ``i``."""
        return self.keys.shape[2], 0

    def get_seq_length(self):
        """Position of the first query of this forward (a 0-d tensor, so the graph stays position-generic)."""
        return self.owner.positions[0]

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class PositionedCache(Cache):
    """A transformers ``Cache`` of ``PositionedKVLayer``s; call ``set_positions`` before each forward."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], functional: bool):
        self.functional = functional
        self.positions: torch.Tensor | None = None
        super().__init__(layers=[PositionedKVLayer(k, v, self) for k, v in zip(keys, values)])

    def set_positions(self, positions: torch.Tensor) -> None:
        """``positions [S]`` int64: the absolute positions (= cache slots) of this forward's tokens."""
        self.positions = positions

    def key_value_tensors(self) -> list[torch.Tensor]:
        """Flat ``[k0, v0, k1, v1, ...]`` as currently held (the updated tensors in functional mode)."""
        return [t for layer in self.layers for t in (layer.keys, layer.values)]


def probe_kv_shapes(model) -> list[tuple[tuple[int, ...], tuple[int, ...], torch.dtype]]:
    """Per decoder layer: (key shape, value shape, dtype) of one token's cache entry, found by one eager step.

    Works for any family without reading its config conventions (head_dim, per-layer KV heads, MLA dims).
    """
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long), cache=cache, use_cache=True)
    shapes = []
    for layer in cache.layers:
        if not isinstance(layer, CacheLayerMixin) or layer.keys is None:
            raise NotImplementedError(f"cache layer {type(layer).__name__} is not an attention KV cache")
        shapes.append((tuple(layer.keys.shape), tuple(layer.values.shape), layer.keys.dtype))
    return shapes


def empty_cache_tensors(model, batch_size: int, max_len: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zero-filled ``[B, KVH, max_len, D]`` key and value tensors, one pair per decoder layer."""
    keys, values = [], []
    for k_shape, v_shape, dtype in probe_kv_shapes(model):
        keys.append(torch.zeros(batch_size, k_shape[1], max_len, k_shape[3], dtype=dtype))
        values.append(torch.zeros(batch_size, v_shape[1], max_len, v_shape[3], dtype=dtype))
    return keys, values
