"""Export-safe attention masks: index predicates, broadcast builders, and their registration in transformers."""

from masks.builders import additive_mask, bool_mask, index_grids, ring_slot_positions, to_additive
from masks.predicates import (
    and_masks,
    bidirectional,
    bidirectional_sliding_window,
    causal,
    chunked_causal,
    chunked_overlay,
    count_left_padding,
    or_masks,
    padding,
    sliding_window_causal,
    sliding_window_overlay,
    token_blocks,
)

__all__ = [
    "additive_mask", "and_masks", "bidirectional", "bidirectional_sliding_window", "bool_mask", "causal",
    "chunked_causal", "chunked_overlay", "count_left_padding", "index_grids", "or_masks", "padding",
    "ring_slot_positions", "sliding_window_causal", "sliding_window_overlay", "to_additive", "token_blocks",
    "register",
]


def register(name: str) -> None:
    """Register ``bool_mask`` as the mask builder for attention implementation ``name`` (idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface

    AttentionMaskInterface.register(name, bool_mask)
