"""Numerically identical rewrites of model code that export tools cannot convert, applied only while capturing.

Each patch names the family, what it replaces and why. The verification stage runs the unpatched eager model, so
a patch that changed the numbers would be caught.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager

import torch

from exporter import state_kernels


def _real_rotary_forward(self, x, position_ids):
    """A complex rotary embedding (``torch.polar(1, freqs) * scaling``) as a real tensor ``[..., D/2, 2]`` of
    (cos, sin) * scaling (Llama 4, DeepSeek-V2)."""
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack([torch.cos(freqs), torch.sin(freqs)], dim=-1) * self.attention_scaling


def _rotate_pairs(x, cos, sin):
    """The complex product of ``x``'s (even, odd) pairs with ``cos + i sin``, in real arithmetic."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(3).type_as(x)


def _llama4_apply_rotary_emb(xq, xk, freqs_cis):
    """Llama 4: ``x [B, S, H, D]``, ``freqs_cis [B, S, D/2]`` broadcast over heads (dim 2)."""
    cos, sin = freqs_cis[:, :, None, :, 0], freqs_cis[:, :, None, :, 1]
    return _rotate_pairs(xq, cos, sin), _rotate_pairs(xk, cos, sin)


def _deepseek_v2_apply_rotary_emb(xq, xk, freqs_cis):
    """DeepSeek-V2: ``x [B, H, S, D]``, ``freqs_cis [B, S, D/2]`` broadcast over heads (dim 1)."""
    cos, sin = freqs_cis[:, None, :, :, 0], freqs_cis[:, None, :, :, 1]
    return _rotate_pairs(xq, cos, sin), _rotate_pairs(xk, cos, sin)


def _complex_rope_patch(module_path: str, rotary_class: str, apply_rotary):
    """(object, attribute, replacement) triples replacing a family's complex rotary embedding."""
    module = importlib.import_module(module_path)
    return [(getattr(module, rotary_class), "forward", _real_rotary_forward),
            (module, "apply_rotary_emb", apply_rotary)]


def _no_recurrent_mask(*args, **kwargs):
    """State layers take no padding mask: the exported programs are fed unpadded rows (positions come from the
    cache), and only attention layers get masks."""
    return None


# kernel name in the modeling module -> its export-friendly drop-in (``exporter.state_kernels``)
STATE_KERNELS = {
    "torch_chunk_gated_delta_rule": state_kernels.chunk_gated_delta_rule,
    "mamba2_chunk_scan": state_kernels.mamba2_chunk_scan,
}


def _state_patch(family: str, *kernels: str):
    """(object, attribute, replacement) triples for a family with state layers: its chunked kernels (the torch
    forms loop over a dynamic number of chunks or pad with shape guards the exporter cannot prove, see
    ``exporter.state_kernels``) and its recurrent padding mask. The mixers look these names up in their module's
    globals at call time."""
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    return ([(module, "create_recurrent_attention_mask", _no_recurrent_mask)]
            + [(module, name, STATE_KERNELS[name]) for name in kernels])


# complex tensors (torch.polar, view_as_complex) exist in neither ExecuTorch's kernels nor ONNX
PATCHES = {
    "llama4_text": lambda: _complex_rope_patch("transformers.models.llama4.modeling_llama4",
                                               "Llama4TextRotaryEmbedding", _llama4_apply_rotary_emb),
    "deepseek_v2": lambda: _complex_rope_patch("transformers.models.deepseek_v2.modeling_deepseek_v2",
                                               "DeepseekV2RotaryEmbedding", _deepseek_v2_apply_rotary_emb),
}
# families with state layers (convolution / SSM / linear attention)
STATE_PATCHES = {
    "lfm2": lambda: _state_patch("lfm2"),
    "lfm2_moe": lambda: _state_patch("lfm2_moe"),
    "qwen3_5_text": lambda: _state_patch("qwen3_5", "torch_chunk_gated_delta_rule"),
    "qwen3_5_moe_text": lambda: _state_patch("qwen3_5_moe", "torch_chunk_gated_delta_rule"),
    "qwen3_next": lambda: _state_patch("qwen3_next", "torch_chunk_gated_delta_rule"),
    "mamba2": lambda: _state_patch("mamba2", "mamba2_chunk_scan"),
    "granitemoehybrid": lambda: _state_patch("granitemoehybrid", "mamba2_chunk_scan"),
    "falcon_h1": lambda: _state_patch("falcon_h1", "mamba2_chunk_scan"),
    "bamba": lambda: _state_patch("bamba", "mamba2_chunk_scan"),
    "nemotron_h": lambda: _state_patch("nemotron_h", "mamba2_chunk_scan"),
    "zamba2": lambda: _state_patch("zamba2", "mamba2_chunk_scan"),
}


@contextmanager
def export_patches(model_type: str):
    """Apply the capture-time rewrites for ``model_type`` (none for most families)."""
    table = PATCHES if model_type in PATCHES else STATE_PATCHES
    if model_type not in table:
        yield
        return
    patches = table[model_type]()
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
