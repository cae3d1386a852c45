"""Static KV caches written at explicit positions, for exported programs.

gpt-fast style: a layer's cache is a fixed tensor; a forward writes its new keys/values at the positions it is
given and the mask decides which slots are visible. Positions come from the program's inputs, never from
Python-side counters, so one exported graph serves prefill and decode.

Layer kinds:
- full attention: ``[B, KVH, max_len, D]``, slot ``i`` holds position ``i``;
- sliding window / chunked attention with window ``W < max_len``: a ring ``[B, KVH, W + 1, D]``. Position ``p``
  lives in slot ``p % W``; slot ``W`` is a trash slot for chunk tokens that are overwritten within the same
  forward (so no two writes of one forward target the same live slot). Attention sees the ring as it was before
  this forward, followed by this forward's keys; every key carries its absolute position for the mask, computed
  arithmetically from the first position (memory stays bounded, generation continues past the window).

- dynamic (ONNX ``--onnx-cache dynamic``): ``ConcatKVLayer`` appends this step's states to the past it was given.

Write modes: in place (``index_copy_`` on registered buffers, ExecuTorch) or functional (``index_copy``, ONNX,
where the cache is a graph input/output).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from exporter.checkpoint import LayerSpec
from masks import ring_slot_positions

INVALID_POSITION = -(1 << 30)  # position given to never-written ring slots: fails every causal/window predicate


@dataclass(frozen=True)
class LayerPlan:
    """How one decoder layer's cache is laid out."""

    key_shape: tuple[int, int, int, int]  # [B, KVH, length, D]
    value_shape: tuple[int, int, int, int]
    dtype: torch.dtype
    window: int | None  # ring size W, or None for a full-length cache
    sliding: bool  # the model builds this layer's mask with a sliding/chunked mask creator
    type: str  # the layer's type in the checkpoint's plan (``LayerSpec.type``)


class PositionedKVLayer(CacheLayerMixin):
    """A full-length static cache; ``update`` writes at the owner's current ``positions [S]``."""

    is_compileable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, owner: "PositionedCache", sliding: bool = False):
        super().__init__()
        self.keys, self.values, self.owner = keys, values, owner
        self.is_sliding = sliding
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # tensors are given up front
        return None

    def _write(self, slots: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        key_states, value_states = key_states.to(self.keys.dtype), value_states.to(self.values.dtype)
        if self.owner.functional:
            self.keys = self.keys.index_copy(2, slots, key_states)
            self.values = self.values.index_copy(2, slots, value_states)
        else:
            self.keys.index_copy_(2, slots, key_states)
            self.values.index_copy_(2, slots, value_states)

    def update(self, key_states, value_states, *args, **kwargs):
        """Write ``[B, KVH, S, D]`` states at the current positions; return the whole cache.

        A value cache wider than the values (``pad_values_to_key_dim``: multi-head latent attention in a runtime
        that wants one head size) holds them zero-padded; the returned view is sliced back to their width.
        """
        value_dim = value_states.shape[-1]
        if value_dim == self.values.shape[-1]:
            self._write(self.owner.positions, key_states, value_states)
            return self.keys, self.values
        value_states = torch.nn.functional.pad(value_states, (0, self.values.shape[-1] - value_dim))
        self._write(self.owner.positions, key_states, value_states)
        return self.keys, self.values[..., :value_dim]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The mask spans every slot; slot ``i`` holds position ``i``."""
        return self.keys.shape[2], 0

    def get_seq_length(self):
        """Position of the first query of this forward (a 0-d tensor, so the graph stays position-generic)."""
        return self.owner.positions[0]

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class RingKVLayer(PositionedKVLayer):
    """A window-sized ring (``W`` live slots + 1 trash slot) for sliding-window and chunked layers."""

    def __init__(self, keys, values, owner, window: int):
        super().__init__(keys, values, owner, sliding=True)
        self.window = window

    def update(self, key_states, value_states, *args, **kwargs):
        """Return ``[ring before this forward (W), new states (S)]`` and write the last ``min(S, W)`` new states."""
        window = self.window
        all_keys = torch.cat([self.keys[:, :, :window], key_states.to(self.keys.dtype)], dim=2)
        all_values = torch.cat([self.values[:, :, :window], value_states.to(self.values.dtype)], dim=2)
        positions = self.owner.positions
        seq_len = positions.shape[0]
        # Token j survives this forward iff no later token of the chunk maps to its slot, i.e. j >= S - W.
        survives = torch.arange(seq_len, device=positions.device) >= seq_len - window
        slots = torch.where(survives, torch.remainder(positions, window), window)
        self._write(slots, key_states, value_states)
        return all_keys, all_values

    def key_positions(self) -> torch.Tensor:
        """``[W + S]`` absolute positions of the keys ``update`` returns (never-written slots: INVALID_POSITION)."""
        positions = self.owner.positions  # the ring holds the W positions before this forward
        return torch.cat([ring_slot_positions(positions[0], self.window, INVALID_POSITION), positions])

    def get_mask_sizes(self, query_length: int):
        """``(W + S, per-key offsets)``: the builder computes key positions as ``arange(W + S) + offset``."""
        length = self.window + query_length
        offsets = self.key_positions() - torch.arange(length, device=self.owner.positions.device)
        return length, offsets

    def get_max_length(self) -> int:
        return self.window


class PositionedCache(Cache):
    """A transformers ``Cache`` over given tensors, laid out by ``plan``; call ``set_positions`` before a forward."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], plan: list[LayerPlan],
                 functional: bool):
        self.functional = functional
        self.positions: torch.Tensor | None = None
        layers = []
        for k, v, layer in zip(keys, values, plan):
            if layer.window is None:
                layers.append(PositionedKVLayer(k, v, self, sliding=layer.sliding))
            else:
                layers.append(RingKVLayer(k, v, self, layer.window))
        super().__init__(layers=layers)

    def set_positions(self, positions: torch.Tensor) -> None:
        """``positions [S]`` int64: the absolute positions of this forward's tokens (contiguous, increasing)."""
        self.positions = positions

    def key_value_tensors(self) -> list[torch.Tensor]:
        """Flat ``[k0, v0, k1, v1, ...]`` as currently held (the updated tensors in functional mode)."""
        return [t for layer in self.layers for t in (layer.keys, layer.values)]


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


def cache_plan(model, layers: Sequence[LayerSpec], batch_size: int, max_len: int,
               rings: bool = True) -> list[LayerPlan]:
    """Per decoder layer of the checkpoint's plan ``layers``: cache shapes and kind. With ``rings``, windowed layers
    get a ring when their window is < ``max_len``; without, every layer is full length (the window is then applied
    by the mask alone).

    Shapes come from one eager step with a DynamicCache, so per-layer head counts / head dims need no
    family-specific config reading.
    """
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long), cache=cache, use_cache=True)
    if len(cache.layers) != len(layers):
        raise NotImplementedError(f"cache has {len(cache.layers)} layers for {len(layers)} layer types")
    plan = []
    for layer, spec in zip(cache.layers, layers):
        if not isinstance(layer, CacheLayerMixin) or layer.keys is None or spec.type == "dummy":
            raise NotImplementedError(f"layer type {spec.type!r} ({type(layer).__name__}) has no KV cache to export")
        window = spec.window if spec.windowed else None
        ring = window if rings and window is not None and window < max_len else None
        length = max_len if ring is None else ring + 1
        k, v = layer.keys.shape, layer.values.shape
        plan.append(LayerPlan((batch_size, k[1], length, k[3]), (batch_size, v[1], length, v[3]),
                              layer.keys.dtype, ring, spec.windowed, spec.type))
    return plan


def pad_values_to_key_dim(plan: list[LayerPlan]) -> list[LayerPlan]:
    """``plan`` with every value cache as wide as its key cache where values are narrower (multi-head latent
    attention: DeepSeek-V2/V3, GLM-4 MoE Lite...). ONNX Runtime GenAI allocates past/present with one head size."""
    padded = []
    for layer in plan:
        (b, kvh, length, dk), (vb, vh, vlen, dv) = layer.key_shape, layer.value_shape
        if dv < dk and vh == kvh:
            layer = dataclasses.replace(layer, value_shape=(vb, vh, vlen, dk))
        padded.append(layer)
    return padded


def empty_cache_tensors(plan: list[LayerPlan]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zero-filled key and value tensors for ``plan``."""
    keys = [torch.zeros(layer.key_shape, dtype=layer.dtype) for layer in plan]
    values = [torch.zeros(layer.value_shape, dtype=layer.dtype) for layer in plan]
    return keys, values
