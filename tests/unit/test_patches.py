"""Capture-time rewrites (exporter/patches.py) compute exactly what the model code they replace computes."""

from __future__ import annotations

import pytest
import torch

from exporter.patches import PATCHES, export_patches

CASES = {
    # model_type: (module, rotary class, x layout builder)
    "llama4_text": ("transformers.models.llama4.modeling_llama4", "Llama4TextRotaryEmbedding", "bshd"),
    "deepseek_v2": ("transformers.models.deepseek_v2.modeling_deepseek_v2", "DeepseekV2RotaryEmbedding", "bhsd"),
}


@pytest.mark.parametrize("model_type", sorted(PATCHES))
def test_real_rotary_equals_complex_rotary(model_type):
    import importlib

    module_path, rotary_class, layout = CASES[model_type]
    module = importlib.import_module(module_path)
    rotary = getattr(module, rotary_class).__new__(getattr(module, rotary_class))
    torch.nn.Module.__init__(rotary)
    rotary.inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    rotary.attention_scaling = 1.25
    rotary.rope_type = "default"
    torch.manual_seed(0)
    batch, heads, seq, dim = 2, 3, 5, 16
    shape = (batch, seq, heads, dim) if layout == "bshd" else (batch, heads, seq, dim)
    xq, xk = torch.randn(shape), torch.randn(shape)
    positions = torch.arange(7, 7 + seq)[None].expand(batch, -1)
    expected = module.apply_rotary_emb(xq, xk, rotary.forward(xq, positions))
    with export_patches(model_type):
        got = module.apply_rotary_emb(xq, xk, rotary.forward(xq, positions))
        assert not got[0].is_complex()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert module.apply_rotary_emb.__name__ == "apply_rotary_emb"  # restored
