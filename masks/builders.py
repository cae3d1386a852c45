"""Broadcast mask builders: evaluate a mask predicate on index grids, never with vmap, never skipping.

The builders accept every argument transformers' mask creators pass to an ``AttentionMaskInterface`` function
(``q_offset``/``kv_offset`` as ints or tensors, ``local_size``, ``allow_is_causal_skip``, ``use_vmap``, ...), and
always return a full 4D mask: no ``None`` for "plain causal", no ``.item()``/``.all()`` on data.

``kv_offset`` may also be a 1D tensor ``[KV]``: key slot ``i`` then holds position ``i + kv_offset[i]``. Ring-buffer
caches use this to describe which absolute position each slot holds.
"""

from __future__ import annotations

import torch

from transformers.masking_utils import causal_mask_function

from masks.predicates import MaskPredicate, padding


def index_grids(batch_size: int, q_length, kv_length, q_offset=0, kv_offset=0, device="cpu"):
    """Broadcastable index tensors ``b [B,1,1,1]``, ``h [1,1,1,1]``, ``q [1,1,Q,1]``, ``kv [1,1,1,KV]``.

    Positions are absolute: ``q = arange(Q) + q_offset``, ``kv = arange(KV) + kv_offset`` (``kv_offset`` an int, a
    0-d tensor or a 1D ``[KV]`` tensor of per-slot offsets).
    """
    batch = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    head = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q_pos = (torch.arange(q_length, device=device) + q_offset).view(1, 1, -1, 1)
    kv_pos = (torch.arange(kv_length, device=device) + kv_offset).view(1, 1, 1, -1)
    return batch, head, q_pos, kv_pos


def ring_slot_positions(next_position, window: int, invalid: int = -(1 << 30)) -> torch.Tensor:
    """``[window]`` absolute position held by each slot of a ring buffer (position ``p`` lives in slot
    ``p % window``) once every position before ``next_position`` (int or 0-d tensor) is written; ``invalid`` for
    slots never written.

    Uses floor division only: ExecuTorch's portable ``remainder`` kernel truncates toward zero for negative ints
    (``-7 % 5`` gives -2 there, 3 in torch/onnxruntime), and ``next_position - 1 - slot`` is negative at prefill.
    """
    last = next_position - 1
    behind = last - torch.arange(window, device=getattr(next_position, "device", None))
    back = behind - window * torch.div(behind, window, rounding_mode="floor")  # behind mod window, always >= 0
    held = last - back
    return torch.where(held >= 0, held, torch.full_like(held, invalid))


def bool_mask(
    batch_size: int,
    q_length,
    kv_length,
    q_offset=0,
    kv_offset=0,
    mask_function: MaskPredicate = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    device="cpu",
    **_ignored,
) -> torch.Tensor:
    """4D boolean mask ``[B, 1, Q, KV]``, True where the query may attend (SDPA convention).

    ``attention_mask`` is the optional 2D padding mask ``[B, L]`` over absolute positions (1 = real token).
    Extra keyword arguments from transformers (``allow_is_causal_skip``, ``use_vmap``, ``local_size``, ``dtype``,
    ``config``...) are accepted and ignored: the mask is always materialised by broadcasting.
    """
    real_tokens = padding(attention_mask.to(torch.bool)) if attention_mask is not None else None
    grids = index_grids(batch_size, q_length, kv_length, q_offset, kv_offset, device)
    mask = mask_function(*grids)
    if real_tokens is not None:
        mask = mask & real_tokens(*grids)
    if not isinstance(mask, torch.Tensor):  # a constant predicate (e.g. ``lambda *args: True``); a type check only
        mask = torch.tensor(bool(mask), device=device)
    return mask.to(torch.bool).expand(batch_size, 1, q_length, kv_length)


def additive_mask(
    batch_size: int,
    q_length,
    kv_length,
    q_offset=0,
    kv_offset=0,
    mask_function: MaskPredicate = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    **_ignored,
) -> torch.Tensor:
    """4D float mask ``[B, 1, Q, KV]``: 0 where attending, ``finfo(dtype).min`` elsewhere (eager convention)."""
    mask = bool_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, device)
    return to_additive(mask, dtype)


def to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive float mask with ``finfo(dtype).min`` at masked positions (never -inf, so fully
    masked rows stay finite)."""
    return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)
