"""Mask predicates transformers lacks, as pure index functions ``(batch_idx, head_idx, q_idx, kv_idx) -> bool``.

transformers' own predicates (``causal_mask_function``, ``sliding_window_overlay``, ``chunked_overlay``,
``and_masks``...) are passed to the builders by its mask creators and are used as they are. What it lacks is a
padding predicate that accepts *any* key position: its ``padding_mask_function`` indexes the 2D mask directly, so
every key position must lie in ``[0, L)`` — true for its own caches, not for a ring buffer whose slots carry
absolute positions (some before 0: never written) or for a padding mask shorter than the cache.

Predicates are written with tensor operators only, so they evaluate on broadcast index tensors
(``batch [B,1,1,1]``, ``head [1,H,1,1]``, ``q [1,1,Q,1]``, ``kv [1,1,1,KV]``) and trace into a static graph.
"""

from __future__ import annotations

from typing import Callable

import torch

MaskPredicate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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
