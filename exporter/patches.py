"""Numerically identical rewrites of model code that export tools cannot convert, applied only while capturing.

Each patch names the family, what it replaces and why. The verification stage runs the unpatched eager model, so
a patch that changed the numbers would be caught.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _llama4_rotary_forward(self, x, position_ids):
    """Llama 4 rotary embedding as a real tensor ``[..., D/2, 2]`` of (cos, sin) instead of complex ``freqs_cis``."""
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack([torch.cos(freqs), torch.sin(freqs)], dim=-1) * self.attention_scaling


def _llama4_apply_rotary_emb(xq, xk, freqs_cis):
    """The complex product ``x * freqs_cis`` over (even, odd) pairs, written with real arithmetic."""
    cos, sin = freqs_cis[:, :, None, :, 0], freqs_cis[:, :, None, :, 1]

    def rotate(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        real, imag = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
        return rotated.flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


@contextmanager
def export_patches(model_type: str):
    """Apply the capture-time rewrites for ``model_type`` (none for most families)."""
    if model_type != "llama4_text":
        yield
        return
    from transformers.models.llama4 import modeling_llama4 as llama4

    saved = llama4.Llama4TextRotaryEmbedding.forward, llama4.apply_rotary_emb
    # complex tensors (torch.polar, view_as_complex) exist in neither ExecuTorch's kernels nor ONNX
    llama4.Llama4TextRotaryEmbedding.forward = _llama4_rotary_forward
    llama4.apply_rotary_emb = _llama4_apply_rotary_emb
    try:
        yield
    finally:
        llama4.Llama4TextRotaryEmbedding.forward, llama4.apply_rotary_emb = saved
