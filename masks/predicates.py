"""Mask predicates: pure index functions ``(batch_idx, head_idx, q_idx, kv_idx) -> bool``.

Every predicate is written with tensor operators only, so it can be evaluated on broadcast index tensors
(``batch [B,1,1,1]``, ``head [1,H,1,1]``, ``q [1,1,Q,1]``, ``kv [1,1,1,KV]``) and returns a broadcastable
bool tensor. ``q_idx`` and ``kv_idx`` are *absolute* token positions, not slots. Nothing here inspects tensor
values in Python, so every predicate traces into a static graph.
"""

from __future__ import annotations

from typing import Callable

import torch

MaskPredicate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def and_masks(*predicates: MaskPredicate) -> MaskPredicate:
    """Intersection: a position is visible only if every predicate allows it."""

    def and_mask(b, h, q, kv):
        result = predicates[0](b, h, q, kv)
        for predicate in predicates[1:]:
            result = result & predicate(b, h, q, kv)
        return result

    return and_mask


def or_masks(*predicates: MaskPredicate) -> MaskPredicate:
    """Union: a position is visible if any predicate allows it."""

    def or_mask(b, h, q, kv):
        result = predicates[0](b, h, q, kv)
        for predicate in predicates[1:]:
            result = result | predicate(b, h, q, kv)
        return result

    return or_mask


def causal(b, h, q, kv):
    """A query sees every key at or before its own position."""
    return kv <= q


def bidirectional(b, h, q, kv):
    """A query sees every key (the index comparison keeps the result a broadcastable tensor)."""
    return (q >= 0) & (kv >= 0)


def sliding_window_overlay(window: int) -> MaskPredicate:
    """Keys strictly less than ``window`` positions behind the query (combine with ``causal``)."""

    def in_window(b, h, q, kv):
        return kv > q - window

    return in_window


def sliding_window_causal(window: int) -> MaskPredicate:
    """Causal attention restricted to the last ``window`` positions, the query's own included."""
    return and_masks(sliding_window_overlay(window), causal)


def bidirectional_sliding_window(window: int) -> MaskPredicate:
    """Any key within ``window`` positions of the query, in either direction (inclusive)."""

    def near(b, h, q, kv):
        return (q - kv).abs() <= window

    return near


def chunked_overlay(chunk_size: int, left_padding: torch.Tensor) -> MaskPredicate:
    """Query and key in the same chunk, chunks counted from each row's first real token (``left_padding[b]``)."""

    def same_chunk(b, h, q, kv):
        offset = left_padding[b]
        return torch.div(kv - offset, chunk_size, rounding_mode="floor") == torch.div(
            q - offset, chunk_size, rounding_mode="floor"
        )

    return same_chunk


def chunked_causal(chunk_size: int, left_padding: torch.Tensor) -> MaskPredicate:
    """Causal attention within fixed-size chunks (Llama 4 local layers)."""
    return and_masks(chunked_overlay(chunk_size, left_padding), causal)


def padding(padding_mask: torch.Tensor) -> MaskPredicate:
    """Keys marked ``True`` in the 2D ``padding_mask [B, L]`` are real tokens; positions outside ``[0, L)`` are not.

    Reading out-of-range positions as padding matches transformers, which right-pads the 2D mask with False up to
    the cache length; here no padding copy is needed, so ``L`` may be symbolic and ``kv`` may hold any positions.
    """
    length = padding_mask.shape[-1]

    def is_real_token(b, h, q, kv):
        inside = (kv >= 0) & (kv < length)
        return padding_mask[b, kv.clamp(0, length - 1)] & inside

    return is_real_token


def token_blocks(block_ids: torch.Tensor) -> MaskPredicate:
    """Tokens sharing a block id >= 0 (e.g. one image) see each other both ways. ``block_ids [B, L]``.

    Positions outside ``[0, L)`` belong to no block (as transformers' ``-1`` right padding of the ids), so ``L``
    may be shorter than the cache and symbolic.
    """
    length = block_ids.shape[-1]

    def block_of(b, pos):
        inside = (pos >= 0) & (pos < length)
        return torch.where(inside, block_ids[b, pos.clamp(0, length - 1)], -1)

    def same_block(b, h, q, kv):
        q_block = block_of(b, q)
        return (q_block == block_of(b, kv)) & (q_block >= 0)

    return same_block


def count_left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row of a 2D padding mask ``[B, L]``, the number of padding tokens before the first real one ``[B]``.

    Same count as transformers' ``create_chunked_causal_mask`` uses to start chunks at each row's first real token.
    """
    return (attention_mask.to(torch.long).cumsum(dim=-1) == 0).sum(dim=-1)
