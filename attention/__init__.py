"""Export-safe attention functions and their registration through transformers' ``AttentionInterface``."""

from attention.sdpa import explicit_attention, repeat_kv, sdpa_attention

__all__ = ["explicit_attention", "repeat_kv", "sdpa_attention", "register"]


def register(name: str) -> None:
    """Register ``sdpa_attention`` under ``name`` in transformers' global attention registry (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, sdpa_attention)
