"""Export-safe attention functions with the ``AttentionInterface`` signature.

Shapes: ``query [B, H, Q, D]``, ``key``/``value`` ``[B, KVH, KV, D]``, ``attention_mask`` bool or additive
``[B, 1|H, Q, KV]`` (or None = attend everywhere). Output ``[B, Q, H, D]`` (transformers transposes back).
No ``is_causal`` switching, no value-dependent branches: the mask is always explicit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from masks.builders import to_additive


def repeat_kv(states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, KVH, KV, D] -> [B, KVH * n_rep, KV, D]``, each KV head repeated for its query group (GQA/MQA).

    A gather on the head axis rather than expand + reshape: the reshape of a symbolic-length expand makes
    torch.export emit a stride guard it cannot prove (``Min(...)``) for ring-buffer caches.
    """
    if n_rep == 1:
        return states
    heads = torch.arange(states.shape[1] * n_rep, device=states.device) // n_rep
    return states.index_select(1, heads)


def additive_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The mask as an additive bias in ``dtype`` (bool masks converted, float masks passed through)."""
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        return to_additive(attention_mask, dtype)
    return attention_mask.to(dtype)


def sdpa_attention(
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
    """Scaled dot-product attention with an explicit mask; GQA, softcapping and attention sinks when asked.

    Guarantees: identical math to transformers' eager attention for the same mask (dropout is always off: this
    is an inference path), one graph for every sequence length.
    """
    n_rep = query.shape[1] // key.shape[1]
    key = repeat_kv(key, n_rep)
    value = repeat_kv(value, n_rep)
    bias = additive_bias(attention_mask, query.dtype)
    if bias is not None:
        bias = bias[:, :, :, : key.shape[-2]]
    if softcap is None and s_aux is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, scale=scaling)
    else:
        out = explicit_attention(query, key, value, bias, scaling, softcap, s_aux)
    return out.transpose(1, 2).contiguous(), None


def explicit_attention(query, key, value, bias, scaling, softcap, sinks):
    """Attention written out as matmul + softmax, for the variants SDPA has no argument for.

    ``softcap``: scores -> ``softcap * tanh(scores / softcap)`` before masking (Gemma 2).
    ``sinks [H]``: one extra learned logit per head that takes softmax mass and contributes no value (gpt-oss).
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    if sinks is not None:
        sink_logits = sinks.reshape(1, -1, 1, 1).to(scores.dtype).expand(scores.shape[0], -1, scores.shape[2], 1)
        # softmax is shift-invariant and subtracts the row max itself; an explicit amax (as in transformers'
        # eager code) would split XNNPACK partitions (its amax supports 2D/3D inputs only)
        probs = torch.softmax(torch.cat([scores, sink_logits], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return torch.matmul(probs.to(value.dtype), value)
