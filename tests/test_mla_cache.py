"""Multi-head latent attention (values narrower than keys) in the ONNX IO cache: values are stored zero-padded to the
key head size (ORT GenAI allocates one head size for every past/present buffer) and the model still computes
exactly what eager transformers computes."""

from __future__ import annotations

import torch


def test_io_cache_pads_mla_values_and_matches_eager():
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    from exporter.pipeline import use_export_safe_attention
    from exporter.wrappers import IOCacheDecoder

    torch.manual_seed(0)
    config = DeepseekV2Config(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                              num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None,
                              kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=8,
                              max_position_embeddings=64)
    reference = DeepseekV2ForCausalLM(config).eval()
    model = DeepseekV2ForCausalLM(config).eval()
    model.load_state_dict(reference.state_dict())
    model.set_attn_implementation(use_export_safe_attention())
    from exporter.cache import cache_plan

    raw = cache_plan(model, 1, 32, rings=False)
    assert all(layer.value_shape[3] < layer.key_shape[3] for layer in raw)  # MLA: the case under test
    wrapper = IOCacheDecoder(model, 32).eval()
    for layer in wrapper.plan:
        assert layer.value_shape == layer.key_shape
    value_dim = raw[0].value_shape[3]
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 64]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits[0]
        past = wrapper.empty_past(1)
        out = wrapper(ids[:, :5], torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None], *past)
        rows = [out[0][0]]
        for step in (5, 6):
            out = wrapper(ids[:, step:step + 1], torch.ones(1, step + 1, dtype=torch.long), torch.tensor([[step]]),
                          *out[1:])
            rows.append(out[0][0])
        # the padded part of the value caches stays zero
        assert all(float(v[..., value_dim:].abs().max()) == 0.0 for v in out[2::2])
    torch.testing.assert_close(torch.cat(rows), expected, atol=1e-5, rtol=0)
