"""Export-safe attention masks: broadcast builders (no vmap, no skipping), the predicates transformers lacks, and
their registration in transformers' ``AttentionMaskInterface``."""

from transformers.masking_utils import AttentionMaskInterface

from masks.builders import additive_mask, bool_mask, index_grids, ring_slot_positions, to_additive
from masks.predicates import padding

__all__ = ["additive_mask", "bool_mask", "index_grids", "padding", "register", "ring_slot_positions", "to_additive"]


def register(name: str) -> None:
    """Register ``bool_mask`` as the mask builder for attention implementation ``name`` (idempotent)."""
    AttentionMaskInterface.register(name, bool_mask)
