"""Unit tests of the static cache layers (``exporter.cache``): where each write lands, what each layer returns, and
the ONNX IO cache for multi-head latent attention (values zero-padded to the key head size)."""

from __future__ import annotations

import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

import attention
from exporter.backends.onnx.wrappers import IOCacheDecoder
from exporter.cache import INVALID_POSITION, LayerPlan, PositionedCache, cache_plan
from exporter.checkpoint import layer_specs

WINDOW = 4


def _plan(length: int, window: int | None) -> list[LayerPlan]:
    return [LayerPlan((1, 1, length, 1), (1, 1, length, 1), torch.float32, window, window is not None,
                      "sliding_attention" if window else "full_attention")]


def _states(positions: torch.Tensor) -> torch.Tensor:
    """``[1, 1, S, 1]`` states whose value is their position + 100 (so a slot shows who wrote it)."""
    return (positions.float() + 100).view(1, 1, -1, 1)


def test_full_length_layer_writes_each_position_into_its_slot():
    keys, values = torch.zeros(1, 1, 8, 1), torch.zeros(1, 1, 8, 1)
    cache = PositionedCache([keys], [values], _plan(8, None), functional=False)
    for positions in (torch.arange(3), torch.tensor([3]), torch.arange(4, 6)):
        cache.set_positions(positions)
        returned_keys, _ = cache.layers[0].update(_states(positions), _states(positions))
        assert returned_keys is keys  # in place: the buffer itself
    assert keys.flatten().tolist() == [100, 101, 102, 103, 104, 105, 0, 0]


def test_functional_layer_leaves_the_given_tensors_untouched():
    keys, values = torch.zeros(1, 1, 8, 1), torch.zeros(1, 1, 8, 1)
    cache = PositionedCache([keys], [values], _plan(8, None), functional=True)
    cache.set_positions(torch.arange(2, 5))
    cache.layers[0].update(_states(torch.arange(2, 5)), _states(torch.arange(2, 5)))
    assert float(keys.abs().max()) == 0.0
    assert cache.key_value_tensors()[0].flatten().tolist() == [0, 0, 102, 103, 104, 0, 0, 0]


def test_ring_layer_keeps_the_last_window_positions_after_wrapping():
    keys, values = torch.zeros(1, 1, WINDOW + 1, 1), torch.zeros(1, 1, WINDOW + 1, 1)
    cache = PositionedCache([keys], [values], _plan(WINDOW + 1, WINDOW), functional=False)
    layer = cache.layers[0]
    cache.set_positions(torch.arange(6))  # a prompt longer than the window: positions 0, 1 are overwritten
    returned, _ = layer.update(_states(torch.arange(6)), _states(torch.arange(6)))
    assert returned.shape[2] == WINDOW + 6  # the ring as it was (empty), then this forward's keys
    assert layer.key_positions().tolist()[:WINDOW] == [INVALID_POSITION] * WINDOW
    # positions 2..5 live in slots p % 4; the trash slot (4) took a token that was overwritten in this forward
    assert keys.flatten()[:WINDOW].tolist() == [104, 105, 102, 103]
    cache.set_positions(torch.tensor([6]))
    returned, _ = layer.update(_states(torch.tensor([6])), _states(torch.tensor([6])))
    # attention sees positions 2..5 (the ring before this step) and 6; slot 2 now holds position 6
    assert layer.key_positions().tolist() == [4, 5, 2, 3, 6]
    assert returned.flatten().tolist() == [104, 105, 102, 103, 106]
    assert keys.flatten()[:WINDOW].tolist() == [104, 105, 106, 103]


def test_io_cache_pads_mla_values_and_matches_eager():
    torch.manual_seed(0)
    config = DeepseekV2Config(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                              num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None,
                              kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=8,
                              max_position_embeddings=64)
    reference = DeepseekV2ForCausalLM(config).eval()
    model = DeepseekV2ForCausalLM(config).eval()
    model.load_state_dict(reference.state_dict())
    model.set_attn_implementation(attention.register())
    layers = layer_specs(config)
    raw = cache_plan(model, layers, 1, 32, rings=False)
    assert all(layer.value_shape[3] < layer.key_shape[3] for layer in raw)  # MLA: the case under test
    wrapper = IOCacheDecoder(model, layers, 32).eval()
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
