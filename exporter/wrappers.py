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
from transformers.cache_utils import get_layer_types_and_kwargs

from exporter.cache import (ConcatCache, PositionedCache, PositionedKVLayer, cache_plan, empty_cache_tensors,
                            pad_values_to_key_dim)


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

    Every layer's cache is full length, windowed layers included (their window is applied by the mask), and value
    caches are as wide as key caches (zero-padded for multi-head latent attention): ONNX Runtime GenAI allocates one
    shared buffer shape for all layers.
    """

    def __init__(self, model, max_seq_len: int):
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len
        self.plan = pad_values_to_key_dim(cache_plan(model, 1, max_seq_len, rings=False))
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


# --- com.microsoft GroupQueryAttention (ONNX Runtime contrib op) fast path ----------------------------------------
GQA_LAYER_TYPES = ("full_attention", "sliding_attention")  # what GroupQueryAttention's causal/local window expresses


class GQAKVLayer(PositionedKVLayer):
    """A full-length shared-buffer layer whose write happens inside GroupQueryAttention: ``update`` returns this
    step's new ``[B, KVH, S, D]`` states unchanged and ``attention.ort_gqa`` replaces ``keys``/``values`` with the
    op's present."""

    def __init__(self, keys, values, owner, sliding: bool, window_size: int | None):
        super().__init__(keys, values, owner, sliding=sliding)
        self.window_size = window_size  # transformers' sliding_window (keys incl. the query's own), None = full

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states


class GQACache(PositionedCache):
    """``PositionedCache`` (functional writes at positions) whose planned layers are ``GQAKVLayer``s; carries the
    op's ``seqlens_k [B]`` int32 and ``total_sequence_length`` int32 scalar, derived from the attention mask."""

    def __init__(self, keys, values, plan, windows: list[int | None | bool], seqlens_k, total_sequence_length):
        super().__init__(keys, values, plan, functional=True)
        for i, window in enumerate(windows):
            if window is not False:
                layer = self.layers[i]
                self.layers[i] = GQAKVLayer(layer.keys, layer.values, self, layer.is_sliding, window)
        self.seqlens_k = seqlens_k
        self.total_sequence_length = total_sequence_length

    def gqa_layer(self, layer_idx: int) -> GQAKVLayer | None:
        layer = self.layers[layer_idx]
        return layer if isinstance(layer, GQAKVLayer) else None


def gqa_routes(model, plan) -> tuple[list[int | None | bool], dict[int, str]]:
    """Per layer: the sliding window GroupQueryAttention applies (None = full causal), or False when the layer keeps
    the ``export_safe`` path; and why, per fallback layer. Decided statically from the config, cache shapes and
    modules."""
    text_config = model.config.get_text_config()
    layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
    non_causal = {getattr(m, "layer_idx", None) for m in model.modules()
                  if getattr(m, "is_causal", True) is False and getattr(m, "layer_idx", None) is not None}
    routes, reasons = [], {}
    for i, (layer, layer_type, kwargs) in enumerate(zip(plan, layer_types, layer_kwargs)):
        if not getattr(model, "_supports_attention_backend", False):
            reason = f"{type(model).__name__} does not route attention through AttentionInterface"
        elif layer_type not in GQA_LAYER_TYPES:
            reason = f"{layer_type} has no GroupQueryAttention form"
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
            routes.append(kwargs.get("sliding_window") if layer_type == "sliding_attention" else None)
    return routes, reasons


class GQACacheDecoder(nn.Module):
    """``IOCacheDecoder``'s interface and graph I/O, with the cache write and attention of every layer that
    GroupQueryAttention can express done by ``attention.ort_gqa`` (ORT's shared-buffer layout: past/present
    ``[B, KVH, max_seq_len, D]``, ``seqlens_k`` = mask row sum - 1, ``total_sequence_length`` = mask width). The
    model must use ``attention.ort_gqa``'s implementation; other layers (``fallback``) keep the export_safe path.

    For unpadded rows the op writes at slots ``T-S .. T-1`` like ``IOCacheDecoder``; a right-padded row of a batch
    writes at its own length (``seqlens_k``), which is what ORT GenAI's batches expect.
    """

    def __init__(self, model, max_seq_len: int):
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len
        self.plan = cache_plan(model, 1, max_seq_len, rings=False)
        self.num_layers = len(self.plan)
        self.routes, self.fallback = gqa_routes(model, self.plan)

    @property
    def gqa_layers(self) -> int:
        return sum(route is not False for route in self.routes)

    def forward(self, input_ids, attention_mask, position_ids, *past_key_values):
        from attention.ort_gqa import CACHE_KWARG

        seq_len, total_len = input_ids.shape[1], attention_mask.shape[1]
        seqlens_k = (attention_mask.sum(-1) - 1).to(torch.int32)
        total = torch.ops.aten.scalar_tensor(total_len, dtype=torch.int32)
        cache = GQACache(list(past_key_values[0::2]), list(past_key_values[1::2]), self.plan, self.routes,
                         seqlens_k, total)
        cache.set_positions(torch.arange(seq_len, device=input_ids.device) + (total_len - seq_len))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=True, **{CACHE_KWARG: cache})
        return (out.logits, *cache.key_value_tensors())

    def empty_past(self, batch_size: int = 1) -> list[torch.Tensor]:
        """Zero past tensors ``[k0, v0, k1, v1, ...]`` for a fresh sequence."""
        keys, values = empty_cache_tensors(self.plan)
        return [t.expand(batch_size, *t.shape[1:]).contiguous() for pair in zip(keys, values) for t in pair]
