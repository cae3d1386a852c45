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
- state layers (convolution / SSM / linear attention): fixed-shape state tensors, ``exporter.state_cache``; layers
  holding both (``hybrid``: Falcon-H1) are ``PositionedHybridLayer``s; layers without any cache (``dummy``: MoE or
  MLP-only layers) hold nothing.

Write modes: in place (``index_copy_`` on registered buffers, ExecuTorch) or functional (``index_copy``, ONNX,
where the cache is a graph input/output).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DummyLayer, DynamicCache, LinearAttentionCacheLayerMixin

from exporter.checkpoint import LayerSpec
from exporter.state_cache import StateLayer, StatePlan, state_plan
from masks import ring_slot_positions

INVALID_POSITION = -(1 << 30)  # position given to never-written ring slots: fails every causal/window predicate


@dataclass(frozen=True)
class LayerPlan:
    """How one decoder layer's cache is laid out: a KV cache (``key_shape`` set), a state (``state`` set), both
    (``hybrid`` layers) or nothing (``dummy`` layers)."""

    key_shape: tuple[int, int, int, int] | None  # [B, KVH, length, D]
    value_shape: tuple[int, int, int, int] | None
    dtype: torch.dtype | None
    window: int | None  # ring size W, or None for a full-length cache
    sliding: bool  # the model builds this layer's mask with a sliding/chunked mask creator
    type: str  # the layer's type in the checkpoint's plan (``LayerSpec.type``)
    state: StatePlan | None = None  # conv / recurrent state (``exporter.state_cache``)

    @property
    def has_kv(self) -> bool:
        return self.key_shape is not None


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


class PositionedHybridLayer(PositionedKVLayer, StateLayer):
    """A layer holding a full-length KV cache and a state (transformers' ``hybrid`` layers: attention and an SSM
    side by side, Falcon-H1)."""

    def __init__(self, keys, values, owner, sliding: bool, conv: torch.Tensor, recurrent: torch.Tensor | None):
        PositionedKVLayer.__init__(self, keys, values, owner, sliding=sliding)
        self.attach_state(conv, recurrent)


class PositionedCache(Cache):
    """A transformers ``Cache`` over given tensors, laid out by ``plan``; call ``set_positions`` before a forward.

    ``keys`` / ``values``: per layer (None where the layer has no KV cache); ``states``: per layer ``(conv,
    recurrent)`` or None, for plans with state layers (``exporter.state_cache``: a forward at position 0 reads them
    as zeros; their updated tensors are ``layer.state_tensors()``).
    """

    full_layer, ring_layer, hybrid_layer = PositionedKVLayer, RingKVLayer, PositionedHybridLayer

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], plan: list[LayerPlan],
                 functional: bool, states: list | None = None):
        self.functional = functional
        self.positions: torch.Tensor | None = None
        super().__init__(layers=self.make_layers(keys, values, plan, states))

    def make_layers(self, keys, values, plan: list[LayerPlan], states: list | None) -> list:
        """One cache layer per planned layer, of this cache's layer classes."""
        states = states or [None] * len(plan)
        layers = []
        for k, v, layer, state in zip(keys, values, plan, states):
            if layer.has_kv and layer.state is not None:
                if layer.window is not None:
                    raise NotImplementedError("a windowed layer with a state beside its KV cache")
                layers.append(self.hybrid_layer(k, v, self, layer.sliding, *state))
            elif layer.state is not None:
                layers.append(StateLayer(*state))
            elif not layer.has_kv:
                layers.append(DummyLayer())
            elif layer.window is None:
                layers.append(self.full_layer(k, v, self, sliding=layer.sliding))
            else:
                layers.append(self.ring_layer(k, v, self, layer.window))
        return layers

    def set_positions(self, positions: torch.Tensor) -> None:
        """``positions [S]`` int64: the absolute positions of this forward's tokens (contiguous, increasing). A
        forward at position 0 starts a new sequence: state layers read their state as zeros."""
        self.positions = positions
        state_layers = self.state_layers()
        if state_layers:
            new_sequence = positions[0] == 0
            for layer in state_layers:
                layer.start_sequence(new_sequence)

    def state_layers(self) -> list[StateLayer]:
        return [layer for layer in self.layers if isinstance(layer, StateLayer)]

    def key_value_tensors(self) -> list[torch.Tensor]:
        """Flat ``[k0, v0, k1, v1, ...]`` as currently held (the updated tensors in functional mode)."""
        return [t for layer in self.layers for t in (layer.keys, layer.values)]

    def present_tensors(self) -> list[torch.Tensor]:
        """Per layer in order: its keys and values (if any), then its conv and recurrent state (if any), as
        currently held: the order of ``past_tensors`` / ``split_past``."""
        out = []
        for layer in self.layers:
            if isinstance(layer, CacheLayerMixin) and layer.keys is not None:
                out += [layer.keys, layer.values]
            if isinstance(layer, StateLayer):
                out += layer.state_tensors()
        return out

    def get_seq_length(self, layer_idx: int = 0):
        """Position of this forward's first token (a 0-d tensor). Asked of a layer without KV (a state layer tracks
        no positions; a cache without attention layers has no other layer to ask): ``positions[0]`` itself."""
        if layer_idx < len(self.layers) and not isinstance(self.layers[layer_idx], CacheLayerMixin):
            return self.positions[0]
        return super().get_seq_length(layer_idx)

    def get_query_offset(self, layer_idx: int = 0):
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int):
        """The asked layer's mask sizes; for a layer without KV, the first KV layer's (a cache with none: the
        query alone, a mask nothing reads)."""
        if layer_idx < len(self.layers) and not isinstance(self.layers[layer_idx], CacheLayerMixin):
            kv = [i for i, layer in enumerate(self.layers) if isinstance(layer, CacheLayerMixin)]
            if not kv:
                return query_length, 0
            layer_idx = kv[0]
        return super().get_mask_sizes(query_length, layer_idx)


def split_past(plan: list[LayerPlan], tensors) -> tuple[list, list, list | None]:
    """``(keys, values, states)`` per layer from the flat ``present_tensors`` order (None where a layer has no
    such tensor; ``states`` None when no layer has a state)."""
    tensors = list(tensors)
    if all(layer.has_kv and layer.state is None for layer in plan):
        return tensors[0::2], tensors[1::2], None
    keys, values, states, position = [], [], [], 0
    for layer in plan:
        kv = tensors[position:position + 2] if layer.has_kv else [None, None]
        position += 2 if layer.has_kv else 0
        keys.append(kv[0])
        values.append(kv[1])
        state = None
        if layer.state is not None:
            count = 1 if layer.state.recurrent_shape is None else 2
            found = tensors[position:position + count]
            state = (found[0], found[1] if count == 2 else None)
            position += count
        states.append(state)
    return keys, values, states


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
    family-specific config reading. Convolution / SSM / linear-attention layers get a ``state`` (its shapes from
    the same step), layers without any cache (``dummy``) neither KV nor state.
    """
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long), cache=cache, use_cache=True)
    if len(cache.layers) != len(layers):
        raise NotImplementedError(f"cache has {len(cache.layers)} layers for {len(layers)} layer types")
    plan = []
    for layer, spec in zip(cache.layers, layers):
        state = state_plan(layer, batch_size) if isinstance(layer, LinearAttentionCacheLayerMixin) else None
        has_kv = isinstance(layer, CacheLayerMixin) and layer.keys is not None
        if not has_kv:
            if state is None and not isinstance(layer, DummyLayer):
                raise NotImplementedError(f"layer type {spec.type!r} ({type(layer).__name__}) has no cache to export")
            plan.append(LayerPlan(None, None, None, None, False, spec.type, state))
            continue
        window = spec.window if spec.windowed else None
        ring = window if rings and window is not None and window < max_len else None
        length = max_len if ring is None else ring + 1
        k, v = layer.keys.shape, layer.values.shape
        plan.append(LayerPlan((batch_size, k[1], length, k[3]), (batch_size, v[1], length, v[3]),
                              layer.keys.dtype, ring, spec.windowed, spec.type, state))
    return plan


def pad_values_to_key_dim(plan: list[LayerPlan]) -> list[LayerPlan]:
    """``plan`` with every value cache as wide as its key cache where values are narrower (multi-head latent
    attention: DeepSeek-V2/V3, GLM-4 MoE Lite...). ONNX Runtime GenAI allocates past/present with one head size."""
    padded = []
    for layer in plan:
        if not layer.has_kv:
            padded.append(layer)
            continue
        (_, kvh, _, dk), (vb, vh, vlen, dv) = layer.key_shape, layer.value_shape
        if dv < dk and vh == kvh:
            layer = dataclasses.replace(layer, value_shape=(vb, vh, vlen, dk))
        padded.append(layer)
    return padded


def empty_cache_tensors(plan: list[LayerPlan]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zero-filled key and value tensors for ``plan`` (None for layers without a KV cache)."""
    keys = [torch.zeros(layer.key_shape, dtype=layer.dtype) if layer.has_kv else None for layer in plan]
    values = [torch.zeros(layer.value_shape, dtype=layer.dtype) if layer.has_kv else None for layer in plan]
    return keys, values


def empty_state_tensors(plan: list[LayerPlan]) -> list[tuple[torch.Tensor, torch.Tensor | None] | None]:
    """Zero ``(conv, recurrent or None)`` per layer of ``plan`` (None for layers without a state)."""
    return [layer.state.tensors() if layer.state is not None else None for layer in plan]


def has_state(plan: list[LayerPlan]) -> bool:
    """Whether any layer of ``plan`` holds a state or no cache at all (the plan is not attention-only)."""
    return any(layer.state is not None or not layer.has_kv for layer in plan)


def past_tensors(plan: list[LayerPlan], keys, values, states) -> list[torch.Tensor]:
    """The flat per-layer order of ``split_past`` / ``PositionedCache.present_tensors``."""
    out = []
    for i, layer in enumerate(plan):
        if layer.has_kv:
            out += [keys[i], values[i]]
        if layer.state is not None:
            out += [t for t in states[i] if t is not None]
    return out
