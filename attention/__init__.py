"""Export-safe attention functions and their registration through transformers' ``AttentionInterface``.

Three implementations, each registered under the name recipes use for it (``attention = "..."``):
- ``export_safe`` (``attention.export_safe``): scaled dot-product attention with an explicit mask, any target;
- ``executorch_custom_ops`` (``attention.executorch_custom_ops``): ExecuTorch's ``llama::custom_sdpa``;
- ``onnxruntime_contrib_ops`` (``attention.onnxruntime_contrib_ops``): onnxruntime's ``GroupQueryAttention``.
Each registration also registers this project's mask builder (``masks``) under the same name.
"""

from __future__ import annotations

from contextlib import contextmanager

from transformers import AttentionInterface

import masks
from attention.export_safe import explicit_attention, repeat_kv, sdpa_attention

EXPORT_SAFE = "export_safe"

__all__ = ["EXPORT_SAFE", "explicit_attention", "register", "repeat_kv", "sdpa_attention", "switched"]


def register(name: str = EXPORT_SAFE) -> str:
    """Register ``sdpa_attention`` and the broadcast mask builder under ``name`` (idempotent); returns ``name``."""
    AttentionInterface.register(name, sdpa_attention)
    masks.register(name)
    return name


@contextmanager
def switched(model, name: str):
    """While active, ``model`` runs attention implementation ``name``; the previous one is restored afterwards
    (a model shared by several recipes must leave each build as it came)."""
    previous = model.config._attn_implementation
    if name != previous:
        model.set_attn_implementation(name)
    try:
        yield model
    finally:
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)
