"""ExecuTorch-optimized attention (``AttentionInterface`` name ``executorch_custom_ops``) on ExecuTorch's LLM custom
ops.

Facts about the ops (executorch 1.5.1, checked against the installed kernels):

``llama::custom_sdpa(Tensor query, Tensor key, Tensor value, SymInt start_pos, Tensor? attn_mask=None,
float drpout_p=0., bool is_causal=False, float? scale=None) -> Tensor``
- ``query [B, S, H, D]``, ``key``/``value`` = the whole caches ``[B, max_len, KVH, D]`` (sequence on dim 1), output
  ``[B, S, H, D]`` (transformers' expected attention output layout, no transpose needed).
- GQA/MQA natively (``H % KVH == 0``, KV head ``h // (H/KVH)``); no ``repeat_kv`` copies.
- ``is_causal=True, attn_mask=None``: query row ``i`` sees slots ``0 .. start_pos+i``; only the first
  ``start_pos+S`` slots are read (cost grows with the position, not with the cache length).
- ``attn_mask`` (with ``is_causal=False``; both together is an error): a 2D float32 additive mask ``[S, max_len]``
  over the *whole* cache (a width other than ``max_len`` aborts the process: "attn_mask shape mismatch"); bool masks
  are rejected at runtime ("Attention mask must be a Float tensor"), so they are converted here. The whole cache is
  read. ``start_pos`` is ignored for masking in this mode.
- ``scale`` defaults to ``1/sqrt(D)``; dropout is ignored. fp32, fp16 and bf16 inputs run.

Routing: plain causal layers (``full_attention`` in transformers' per-layer types) take the ``is_causal`` path
with ``start_pos``; every other layer (sliding window, chunked, rings) takes the explicit-mask path with the mask from this project's mask builder, so sliding-window models keep working.
Softcapping and attention sinks have no custom-op argument: those layers fall back to ``attention.export_safe``.

Contract: the ``executorch_cache`` keyword (the ``exporter.backends.executorch.cache.ExecuTorchCache`` of this
forward, passed to the model by ``exporter.backends.executorch.wrapper.BufferCacheDecoder(custom_ops=True)``) means
keys/values arrive in its ``[B, L, KVH, D]`` layout; the cache also gives the forward's ``start_pos`` and each layer's
type. Without it (e.g. a ``DynamicCache`` probe) this is ``attention.export_safe``.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

import masks
from attention.export_safe import sdpa_attention

ATTN_IMPLEMENTATION = "executorch_custom_ops"
CACHE_KWARG = "executorch_cache"  # the ExecuTorchCache of this forward, passed by the custom-op cache wrapper


def load_custom_ops() -> None:
    """Register ``torch.ops.llama.*`` (meta kernels for export + ATen CPU kernels for eager runs)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


def is_plain_causal(module: torch.nn.Module, layer_type: str, kwargs: dict) -> bool:
    """True when this layer's mask is exactly "causal over absolute positions" (a ``full_attention`` layer of a
    causal module, no window or chunk), i.e. what ``custom_sdpa(is_causal=True, start_pos)`` computes."""
    if not getattr(module, "is_causal", True) or kwargs.get("sliding_window"):
        return False
    return layer_type == "full_attention"


def float_mask_2d(attention_mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[B|1, 1, S, L]`` bool or additive mask -> contiguous float32 additive ``[S, L]`` (custom_sdpa's format)."""
    if batch_size != 1 or attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        raise NotImplementedError("llama::custom_sdpa takes one 2D mask: batch 1 and one mask for all heads only")
    mask = attention_mask[0, 0]
    if mask.dtype == torch.bool:
        return torch.where(mask, torch.zeros((), dtype=torch.float32), torch.finfo(torch.float32).min).contiguous()
    return mask.to(torch.float32).contiguous()


def executorch_sdpa_attention(
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
    """``query [B, H, S, D]``, ``key``/``value`` ``[B, L, KVH, D]`` (ExecuTorchCache layout) -> ``[B, S, H, D]``.

    Without ``executorch_cache`` in ``kwargs`` the inputs are transformers' standard layout and
    ``attention.export_safe`` runs.
    """
    cache = kwargs.pop(CACHE_KWARG, None)
    if cache is None:  # not under the custom-op cache wrapper (e.g. a DynamicCache probe): standard layout
        return sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, softcap=softcap,
                              s_aux=s_aux, **kwargs)
    if softcap is not None or s_aux is not None:  # no custom-op argument for these: generic path on [B, KVH, L, D]
        return sdpa_attention(module, query, key.transpose(1, 2), value.transpose(1, 2), attention_mask,
                              scaling=scaling, softcap=softcap, s_aux=s_aux)
    q = query.transpose(1, 2)  # [B, S, H, D]; cancels the projection's transpose
    if key.dtype != q.dtype:
        q = q.to(key.dtype)
    if is_plain_causal(module, cache.layer_type(getattr(module, "layer_idx", None)), kwargs):
        out = torch.ops.llama.custom_sdpa(q, key, value, cache.start_pos, None, 0.0, True, scaling)
    else:
        if attention_mask is None:
            raise NotImplementedError(f"{type(module).__name__}: a non-causal layer without a mask")
        mask = float_mask_2d(attention_mask, q.shape[0])
        out = torch.ops.llama.custom_sdpa(q, key, value, 0, mask, 0.0, False, scaling)
    return out.to(query.dtype), None


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register the attention (and this project's mask builder) under ``name``; returns ``name`` (idempotent)."""
    load_custom_ops()
    AttentionInterface.register(name, executorch_sdpa_attention)
    masks.register(name)
    return name
