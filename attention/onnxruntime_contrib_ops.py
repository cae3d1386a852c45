"""ONNX Runtime-optimized attention (``AttentionInterface`` name ``onnxruntime_contrib_ops``) on the
``com.microsoft`` ``GroupQueryAttention`` contrib op.

The custom torch op ``export_hf::group_query_attention`` has exactly the semantics of ORT's GroupQueryAttention
(onnxruntime 1.32, CPU kernel) in the mode used here, checked against the installed kernel
(``tests/backends/test_onnx_gqa.py``):

- ``query [B, S, H*D]``, new ``key``/``value`` ``[B, S, KVH*D]`` (after rotary: ``do_rotary=0``, rotary stays in
  the transformers model code), ``past_key``/``past_value`` ``[B, KVH, L, D]`` = the shared buffer of ``L`` slots;
- ``seqlens_k [B]`` int32 = per-row total length - 1 (attention-mask row sum - 1), ``total_sequence_length`` int32
  scalar = the mask width ``T``;
- first prompt (``S == T``): past length ``P = 0``; otherwise ``P = seqlens_k + 1 - S`` per row. The new K/V are
  written at slots ``P .. P+S-1`` of ``present`` (= past with those slots replaced), query row ``s`` is at absolute
  position ``P + s`` and sees slots ``j <= P + s``;
- ``local_window_size = W``: additionally ``j > P + s - W``, i.e. ``W`` keys including the query's own (measured
  on 1.32; older CPU kernels kept ``W + 1``), the same convention as transformers' ``sliding_window``;
- ``softcap > 0``: scores (already scaled) -> ``softcap * tanh(scores / softcap)`` before masking;
- ``head_sink [H]``: one extra logit per head in the softmax denominator with no value (gpt-oss sinks);
- ``scale``: the score scale (transformers' ``scaling``).
Rows of a right-padded first prompt beyond a row's length are unspecified in ORT (and ignored by callers).

Routing: the wrapper ``exporter.backends.onnx.wrappers.GQACacheDecoder`` decides statically which layers take the op (causal
full-attention and sliding-window layers whose keys and values share one head size); other layers (chunked
attention, multi-head latent attention, non-causal) keep the ``export_safe`` path. Without the wrapper's keyword
(e.g. a ``DynamicCache`` probe) this is ``attention.export_safe``.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

import masks
from attention.export_safe import sdpa_attention

ATTN_IMPLEMENTATION = "onnxruntime_contrib_ops"
CACHE_KWARG = "ort_gqa_cache"  # the GQACache, passed by the GQA wrapper through the model's kwargs
OP_NAME = "export_hf::group_query_attention"


@torch.library.custom_op(OP_NAME, mutates_args=())
def group_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total_sequence_length: torch.Tensor,
    head_sink: torch.Tensor | None,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
    softcap: float,
    local_window_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager CPU reference of ORT's GroupQueryAttention (see the module notes); returns
    ``(output [B, S, H*D], present_key, present_value)``."""
    batch, seq_len, _ = query.shape
    _, _, cache_len, head_dim = past_key.shape
    first_prompt = int(total_sequence_length) == seq_len
    past_len = torch.zeros_like(seqlens_k) if first_prompt else seqlens_k + 1 - seq_len  # [B]
    positions = past_len.long()[:, None] + torch.arange(seq_len)[None]  # [B, S] absolute = slot
    if int(positions.max()) >= cache_len or int(positions.min()) < 0:
        raise ValueError(f"GroupQueryAttention writes slots {int(positions.min())}..{int(positions.max())} "
                         f"outside a cache of {cache_len}")
    new_k = key.reshape(batch, seq_len, kv_num_heads, head_dim).transpose(1, 2)
    new_v = value.reshape(batch, seq_len, kv_num_heads, head_dim).transpose(1, 2)
    index = positions[:, None, :, None].expand(batch, kv_num_heads, seq_len, head_dim)
    present_key = past_key.scatter(2, index, new_k.to(past_key.dtype))
    present_value = past_value.scatter(2, index, new_v.to(past_value.dtype))

    q = query.reshape(batch, seq_len, num_heads, head_dim).transpose(1, 2).float()  # [B, H, S, D]
    group = num_heads // kv_num_heads
    heads = torch.arange(num_heads) // group
    k = present_key.float().index_select(1, heads)  # [B, H, L, D]
    v = present_value.float().index_select(1, heads)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    slots = torch.arange(cache_len)[None, None, None, :]
    query_pos = positions[:, None, :, None]
    visible = slots <= query_pos
    if local_window_size > 0:
        visible = visible & (slots > query_pos - local_window_size)
    scores = scores.masked_fill(~visible, float("-inf"))
    if head_sink is not None:
        sink = head_sink.float().reshape(1, num_heads, 1, 1).expand(batch, num_heads, seq_len, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, seq_len, num_heads * head_dim)
    return out.to(query.dtype), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, head_sink, num_heads,
      kv_num_heads, scale, softcap, local_window_size):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def _gqa_schema():
    """``onnx.defs.OpSchema`` of the part of ``com.microsoft::GroupQueryAttention`` used here (the onnx package does
    not know the contrib ops; onnxscript's tracer needs a schema to build the node)."""
    import onnx  # imported here: only an ONNX export needs the schema (ExecuTorch-only runs never load onnx)

    schema = _SCHEMA.get("gqa")
    if schema is None:
        OpSchema = onnx.defs.OpSchema
        single, optional = OpSchema.FormalParameterOption.Single, OpSchema.FormalParameterOption.Optional
        inputs = [("query", "T", single), ("key", "T", optional), ("value", "T", optional),
                  ("past_key", "T", optional), ("past_value", "T", optional), ("seqlens_k", "M", single),
                  ("total_sequence_length", "M", single), ("cos_cache", "T", optional),
                  ("sin_cache", "T", optional), ("position_ids", "tensor(int64)", optional),
                  ("attention_bias", "T", optional), ("head_sink", "T", optional)]
        attributes = [("num_heads", OpSchema.AttrType.INT), ("kv_num_heads", OpSchema.AttrType.INT),
                      ("scale", OpSchema.AttrType.FLOAT), ("softcap", OpSchema.AttrType.FLOAT),
                      ("local_window_size", OpSchema.AttrType.INT), ("do_rotary", OpSchema.AttrType.INT)]
        schema = OpSchema(
            "GroupQueryAttention", "com.microsoft", 1,
            inputs=[OpSchema.FormalParameter(name, kind, param_option=option) for name, kind, option in inputs],
            outputs=[OpSchema.FormalParameter(name, "T") for name in ("output", "present_key", "present_value")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                              ("M", ["tensor(int32)"], "")],
            attributes=[OpSchema.Attribute(name, kind, "", required=False) for name, kind in attributes],
        )
        _SCHEMA["gqa"] = schema
    return schema


_SCHEMA: dict = {}


def onnx_group_query_attention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                               head_sink, num_heads: int, kv_num_heads: int, scale: float, softcap: float,
                               local_window_size: int):
    """onnxscript translation for ``torch.onnx.export(custom_translation_table=...)``: one
    ``com.microsoft.GroupQueryAttention`` node (``do_rotary=0``, no cos/sin caches)."""
    from onnxscript.values import Op, Opset  # imported here: onnxscript is heavy and only torch.onnx calls this

    gqa = Op(Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())
    inputs = [query, key, value, past_key, past_value, seqlens_k, total_sequence_length]
    if head_sink is not None:
        inputs += [None, None, None, None, head_sink]  # cos_cache, sin_cache, position_ids, attention_bias
    attributes = dict(num_heads=int(num_heads), kv_num_heads=int(kv_num_heads), scale=float(scale), do_rotary=0,
                      local_window_size=int(local_window_size))
    if softcap > 0:
        attributes["softcap"] = float(softcap)
    return gqa(*inputs, **attributes)


def translation_table() -> dict:
    """``custom_translation_table`` entry for ``torch.onnx.export``."""
    return {torch.ops.export_hf.group_query_attention.default: onnx_group_query_attention}


def ort_window(sliding_window: int | None) -> int:
    """ORT ``local_window_size`` for a transformers ``sliding_window`` of ``w`` keys (query included): ``w`` (same
    convention in onnxruntime 1.32); -1 (no window) for full attention."""
    return -1 if not sliding_window else int(sliding_window)


def ort_gqa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``query [B, H, S, D]``; on a GQA layer of the wrapper's cache, ``key``/``value`` are this step's new states
    ``[B, KVH, S, D]`` (the layer's ``update`` does not write) -> ``[B, S, H, D]``, and the layer's cache becomes
    the op's present. Elsewhere: ``attention.export_safe`` on the cache's ``[B, KVH, L, D]``."""
    cache = kwargs.pop(CACHE_KWARG, None)
    layer_idx = getattr(module, "layer_idx", None)
    layer = cache.gqa_layer(layer_idx) if cache is not None and layer_idx is not None else None
    if layer is None:
        return sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, softcap=softcap,
                              s_aux=s_aux, **kwargs)
    if not getattr(module, "is_causal", True):
        raise NotImplementedError(f"{type(module).__name__} layer {layer_idx} is not causal; GroupQueryAttention "
                                  "was planned for it")
    batch, num_heads, seq_len, head_dim = query.shape
    kv_heads = key.shape[1]
    scale = float(scaling) if scaling is not None else head_dim ** -0.5
    q = query.transpose(1, 2).reshape(batch, seq_len, num_heads * head_dim)
    k = key.to(query.dtype).transpose(1, 2).reshape(batch, seq_len, kv_heads * head_dim)
    v = value.to(query.dtype).transpose(1, 2).reshape(batch, seq_len, kv_heads * head_dim)
    sink = s_aux.to(query.dtype) if s_aux is not None else None
    out, layer.keys, layer.values = torch.ops.export_hf.group_query_attention(
        q, k, v, layer.keys, layer.values, cache.seqlens_k, cache.total_sequence_length, sink,
        num_heads, kv_heads, scale, float(softcap) if softcap else 0.0, ort_window(layer.window_size))
    return out.reshape(batch, seq_len, num_heads, head_dim), None


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register the attention (and this project's mask builder, for fallback layers) under ``name``; returns
    ``name`` (idempotent)."""
    AttentionInterface.register(name, ort_gqa_attention)
    masks.register(name)
    return name
