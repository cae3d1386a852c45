"""ONNX export wrappers: a transformers causal LM plus a static KV cache passed in and returned as graph tensors.

- ``IOCacheDecoder``: ``forward(input_ids [B,S], attention_mask [B,T], position_ids [B,S], *past)``
  ``-> (logits [B,S,V], *present)``; this step's tokens take positions (= cache slots) ``T-S .. T-1`` (the ORT GenAI
  shared-buffer contract: T = tokens so far including this step); ``position_ids`` feed the position embeddings.
- ``ConcatCacheDecoder``: the same interface with the concatenating (dynamic) cache contract.
- ``GQACacheDecoder``: ``IOCacheDecoder``'s interface with attention and cache writes in onnxruntime's
  ``GroupQueryAttention`` (``attention.onnxruntime_contrib_ops``).
See ``exporter.cache`` for the per-layer layouts.

State layers (convolution / SSM / linear attention, ``exporter.state_cache``; static cache only): their state is
passed in and returned beside the KV cache, per layer in order (a layer's keys and values, then its conv and
recurrent state: ``exporter.cache.split_past``). Their names are in ``exporter.backends.onnx.lower``. This step's
first position is ``T - S``; at position 0 the states read as zeros (a new sequence).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from attention.onnxruntime_contrib_ops import CACHE_KWARG
from exporter.cache import (ConcatCache, PositionedCache, PositionedKVLayer, cache_plan, empty_cache_tensors,
                            empty_state_tensors, has_state, pad_values_to_key_dim, past_tensors, split_past)
from exporter.checkpoint import LayerSpec
from exporter.state_cache import state_details


class StateDetails:
    """``state_details()`` for the ONNX wrappers: graph names of the states, ``input_pos`` rule, prefill kernels."""

    plan: list
    state_kernels: dict = {}  # how the state kernels computed, set by the capture

    def state_details(self) -> dict:
        """Build details of the state layers (``{}`` without any)."""
        return state_details(self.plan, self.state_kernels, lambda i: (f"past.{i}.conv", f"past.{i}.recurrent"))


class IOCacheDecoder(StateDetails, nn.Module):
    """Decoder whose static cache is passed in and returned (functional writes).

    Every layer's cache is full length, windowed layers included (their window is applied by the mask), and value
    caches are as wide as key caches (zero-padded for multi-head latent attention): ONNX Runtime GenAI allocates one
    shared buffer shape for all layers.
    """

    def __init__(self, model, layers: Sequence[LayerSpec], max_seq_len: int):
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len
        self.plan = pad_values_to_key_dim(cache_plan(model, layers, 1, max_seq_len, rings=False))
        self.num_layers = len(self.plan)

    def forward(self, input_ids, attention_mask, position_ids, *past_key_values):
        seq_len, total_len = input_ids.shape[1], attention_mask.shape[1]
        if has_state(self.plan):
            keys, values, states = split_past(self.plan, past_key_values)
            cache = PositionedCache(keys, values, self.plan, functional=True, states=states)
        else:
            cache = PositionedCache(list(past_key_values[0::2]), list(past_key_values[1::2]), self.plan,
                                    functional=True)
        cache.set_positions(torch.arange(seq_len, device=input_ids.device) + (total_len - seq_len))
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        if has_state(self.plan):
            return (out.logits, *cache.present_tensors())
        return (out.logits, *cache.key_value_tensors())

    def empty_past(self, batch_size: int = 1) -> list[torch.Tensor]:
        """Zero past tensors for a fresh sequence: ``[k0, v0, k1, v1, ...]``, with state layers' conv / recurrent
        states in their layer's place."""
        return empty_past(self.plan, batch_size)


def empty_past(plan, batch_size: int = 1) -> list[torch.Tensor]:
    """Zero past tensors of ``plan`` in graph-input order (``exporter.cache.split_past``), batch ``batch_size``."""
    keys, values = empty_cache_tensors(plan)
    if not has_state(plan):
        return [t.expand(batch_size, *t.shape[1:]).contiguous() for pair in zip(keys, values) for t in pair]
    flat = past_tensors(plan, keys, values, empty_state_tensors(plan))
    return [t.expand(batch_size, *t.shape[1:]).contiguous() for t in flat]


class ConcatCacheDecoder(StateDetails, nn.Module):
    """Decoder with the dynamic (concatenating) cache contract of ONNX Runtime GenAI
    (``past_present_share_buffer: false``): ``forward(input_ids [B,S], attention_mask [B,P+S], position_ids [B,S],
    *past [B,KVH,P,D]) -> (logits [B,S,V], *present [B,KVH,P+S,D])``. This step's tokens take positions
    ``P .. P+S-1``; sliding windows are applied by the mask (every layer keeps the whole sequence)."""

    def __init__(self, model, layers: Sequence[LayerSpec], max_seq_len: int):
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len
        self.plan = cache_plan(model, layers, 1, max_seq_len, rings=False)
        self.num_layers = len(self.plan)
        if has_state(self.plan):
            raise NotImplementedError("the dynamic (concatenating) cache takes attention layers only; state layers "
                                      "need the static cache (kv_cache = \"static\")")

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


# --- com.microsoft GroupQueryAttention (ONNX Runtime contrib op) fast path ----------------------------------------
GQA_LAYER_TYPES = ("full_attention", "sliding_attention")  # what GroupQueryAttention's causal/local window expresses


class GQAKVLayer(PositionedKVLayer):
    """A full-length shared-buffer layer whose write happens inside GroupQueryAttention: ``update`` returns this
    step's new ``[B, KVH, S, D]`` states unchanged and ``attention.onnxruntime_contrib_ops`` replaces ``keys``/``values`` with the
    op's present."""

    def __init__(self, keys, values, owner, sliding: bool, window_size: int | None):
        super().__init__(keys, values, owner, sliding=sliding)
        self.window_size = window_size  # transformers' sliding_window (keys incl. the query's own), None = full

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states


class GQACache(PositionedCache):
    """``PositionedCache`` (functional writes at positions) whose planned layers are ``GQAKVLayer``s; carries the
    op's ``seqlens_k [B]`` int32 and ``total_sequence_length`` int32 scalar, derived from the attention mask."""

    def __init__(self, keys, values, plan, windows: list[int | None | bool], seqlens_k, total_sequence_length,
                 states: list | None = None):
        super().__init__(keys, values, plan, functional=True, states=states)
        for i, window in enumerate(windows):
            if window is not False:
                layer = self.layers[i]
                self.layers[i] = GQAKVLayer(layer.keys, layer.values, self, layer.is_sliding, window)
        self.seqlens_k = seqlens_k
        self.total_sequence_length = total_sequence_length

    def gqa_layer(self, layer_idx: int) -> GQAKVLayer | None:
        layer = self.layers[layer_idx]
        return layer if isinstance(layer, GQAKVLayer) else None


def gqa_routes(model, layers: Sequence[LayerSpec], plan) -> tuple[list[int | None | bool], dict[int, str]]:
    """Per layer: the sliding window GroupQueryAttention applies (None = full causal), or False when the layer keeps
    the ``export_safe`` path; and why, per fallback layer. Decided statically from the layer plan, cache shapes and
    modules."""
    non_causal = {getattr(m, "layer_idx", None) for m in model.modules()
                  if getattr(m, "is_causal", True) is False and getattr(m, "layer_idx", None) is not None}
    routes, reasons = [], {}
    for i, (layer, spec) in enumerate(zip(plan, layers)):
        if not layer.has_kv:  # a state or dummy layer: no attention to route
            routes.append(False)
            continue
        if not getattr(model, "_supports_attention_backend", False):
            reason = f"{type(model).__name__} does not route attention through AttentionInterface"
        elif spec.type not in GQA_LAYER_TYPES:
            reason = f"{spec.type} has no GroupQueryAttention form"
        elif layer.key_shape[1::2] != layer.value_shape[1::2]:
            reason = "keys and values differ in shape"
        elif i in non_causal:
            reason = "not causal"
        else:
            reason = None
        if reason:
            reasons[i] = reason
            routes.append(False)
        else:
            routes.append(spec.window if spec.type == "sliding_attention" else None)
    return routes, reasons


class GQACacheDecoder(StateDetails, nn.Module):
    """``IOCacheDecoder``'s interface and graph I/O, with the cache write and attention of every layer that
    GroupQueryAttention can express done by ``attention.onnxruntime_contrib_ops`` (ORT's shared-buffer layout: past/present
    ``[B, KVH, max_seq_len, D]``, ``seqlens_k`` = mask row sum - 1, ``total_sequence_length`` = mask width). The
    model must use ``attention.onnxruntime_contrib_ops``; other layers (``fallback``) keep the export_safe path.

    For unpadded rows the op writes at slots ``T-S .. T-1`` like ``IOCacheDecoder``; a right-padded row of a batch
    writes at its own length (``seqlens_k``), which is what ORT GenAI's batches expect.
    """

    def __init__(self, model, layers: Sequence[LayerSpec], max_seq_len: int):
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len
        self.plan = cache_plan(model, layers, 1, max_seq_len, rings=False)
        self.num_layers = len(self.plan)
        self.routes, self.fallback = gqa_routes(model, layers, self.plan)

    @property
    def gqa_layers(self) -> int:
        return sum(route is not False for route in self.routes)

    def forward(self, input_ids, attention_mask, position_ids, *past_key_values):
        seq_len, total_len = input_ids.shape[1], attention_mask.shape[1]
        seqlens_k = (attention_mask.sum(-1) - 1).to(torch.int32)
        total = torch.ops.aten.scalar_tensor(total_len, dtype=torch.int32)
        keys, values, states = split_past(self.plan, past_key_values)
        cache = GQACache(keys, values, self.plan, self.routes, seqlens_k, total, states=states)
        cache.set_positions(torch.arange(seq_len, device=input_ids.device) + (total_len - seq_len))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=True, **{CACHE_KWARG: cache})
        if has_state(self.plan):
            return (out.logits, *cache.present_tensors())
        return (out.logits, *cache.key_value_tensors())

    def empty_past(self, batch_size: int = 1) -> list[torch.Tensor]:
        """Zero past tensors for a fresh sequence (``IOCacheDecoder.empty_past``'s order)."""
        return empty_past(self.plan, batch_size)
