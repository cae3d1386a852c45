"""State layers (exporter/state_cache.py, exporter/state_kernels.py): the export-friendly kernels compute what
transformers' torch kernels compute, for any length and from any state; the static-cache wrappers reproduce eager
no-cache logits when a sequence is fed in chunks, and a forward at position 0 starts afresh. Eager only (the
exported artifacts are driven through the runtimes in tests/backends/test_hybrids.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim
from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan as hf_ssd
from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule as hf_gdr

from exporter import pipeline, state_cache, state_kernels
from exporter.backends.executorch.wrapper import BufferCacheDecoder
from exporter.backends.onnx.lower import io_names
from exporter.backends.onnx.wrappers import IOCacheDecoder
from exporter.cache import cache_plan, split_past
from exporter.patches import export_patches

B, HK, HV, DK, DV = 1, 2, 4, 16, 16


def gdr_inputs(length: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, length, HK, DK, generator=gen), torch.randn(B, length, HK, DK, generator=gen),
            torch.randn(B, length, HV, DV, generator=gen), -F.softplus(torch.randn(B, length, HV, generator=gen)),
            torch.rand(B, length, HV, generator=gen))


STATE = torch.randn(B, HV, DK, DV, generator=torch.Generator().manual_seed(1)) * 0.3


@pytest.mark.parametrize("length", [1, 5, 64, 65, 130])
def test_gated_delta_rule_scan_equals_transformers(length):
    q, k, v, g, beta = gdr_inputs(length, length)
    expected, expected_state = hf_gdr(q, k, v, g=g, beta=beta, initial_state=STATE, output_final_state=True,
                                      use_qk_l2norm_in_kernel=True)
    out, state = state_kernels.chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=STATE,
                                                      output_final_state=True, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state, expected_state, atol=1e-6, rtol=1e-5)


def test_executorch_gated_delta_rule_op_equals_transformers():
    from exporter.backends.executorch.state import executorch_gated_delta_rule

    from attention.executorch_custom_ops import load_custom_ops

    load_custom_ops()
    for length in (1, 70):
        q, k, v, g, beta = gdr_inputs(length, 3)
        expected, expected_state = hf_gdr(q, k, v, g=g, beta=beta, initial_state=STATE, output_final_state=True,
                                          use_qk_l2norm_in_kernel=True)
        out, state = executorch_gated_delta_rule(q, k, v, g, beta, STATE, True)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state, expected_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 7, 8, 9, 30])
@pytest.mark.parametrize("dt_min", [0.0, 0.5])  # 0.5: the time-step clamp bites
def test_ssd_chunk_scan_equals_transformers(length, dt_min):
    gen = torch.Generator().manual_seed(length)
    heads, head_dim, state_size, groups = 4, 8, 16, 2
    x, dt = torch.randn(B, length, heads, head_dim, generator=gen), torch.randn(B, length, heads, generator=gen)
    b_, c_ = (torch.randn(B, length, groups, state_size, generator=gen) for _ in range(2))
    a, d, dt_bias = -torch.rand(heads, generator=gen) - 0.5, torch.randn(heads, generator=gen), torch.randn(heads)
    initial = torch.randn(B, heads, head_dim, state_size, generator=gen) * 0.3
    kwargs = dict(D=d, dt_bias=dt_bias, initial_states=initial, dt_softplus=True, dt_limit=(dt_min, float("inf")),
                  return_final_states=True)
    expected, expected_state = hf_ssd(x, dt, a, b_, c_, 8, **kwargs)
    out, state = state_kernels.mamba2_chunk_scan(x, dt, a, b_, c_, 8, **kwargs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, expected_state, atol=1e-5, rtol=1e-5)


def test_kernels_export_as_one_graph_for_any_length():
    """One exported graph (S dynamic, example 9) serves S = 1 and S across several chunks; no recompile."""

    class Kernel(torch.nn.Module):
        def forward(self, q, k, v, g, beta, state):
            return state_kernels.gated_delta_rule_scan(q, k, v, g, beta, state)

    seq = Dim("S", min=1, max=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(Kernel(), (*gdr_inputs(9, 0), STATE), dynamic_shapes=({1: seq},) * 5 + (None,),
                                      strict=False)
    assert any(n.target is torch.ops.higher_order.scan for n in program.graph.nodes)
    for length in (1, 130):
        q, k, v, g, beta = gdr_inputs(length, length)
        expected, expected_state = hf_gdr(q, k, v, g=g, beta=beta, initial_state=STATE, output_final_state=True,
                                          use_qk_l2norm_in_kernel=True)
        out, state = program.module()(q, k, v, g, beta, STATE)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(state, expected_state, atol=1e-6, rtol=1e-5)


def test_unit_lower_inverse():
    a = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0)).tril(-1) * 0.2
    expected = torch.linalg.inv(torch.eye(64) + a)
    torch.testing.assert_close(state_kernels.unit_lower_inverse(a), expected, atol=1e-5, rtol=1e-5)


# --- the wrappers, eagerly ------------------------------------------------------------------------------------------
MAX_LEN = 32
HYBRIDS = ("tiny-lfm2", "tiny-qwen3-5", "tiny-granitemoehybrid", "tiny-mamba2", "tiny-falcon-h1")


@pytest.fixture(scope="module")
def models(builtin_checkpoint):
    out = {}
    for name in HYBRIDS:
        source = builtin_checkpoint(name)
        out[name] = (source, pipeline.load_export_model(source), source.load_model())
    return out


def ids_of(vocab: int, length: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def eager(reference, ids: list[int]) -> np.ndarray:
    return reference(input_ids=torch.tensor([ids])).logits[0].numpy()


def chunks(ids: list[int]) -> list[tuple[int, int]]:  # noqa: ARG001 - one schedule for every sequence
    """(start, end) forwards: a 9-token prompt in chunks 6 + 3 (the conv window and beyond), 3 decode steps, a
    4-token message at a nonzero position."""
    return [(0, 6), (6, 9), (9, 10), (10, 11), (11, 12), (12, 16)]


@pytest.mark.parametrize("name", HYBRIDS)
@pytest.mark.parametrize("custom_ops", [False, True])
def test_buffer_decoder_matches_eager_and_resets(models, name, custom_ops):
    from attention import executorch_custom_ops
    from exporter.backends.executorch.state import executorch_state_kernels

    import attention

    source, model, reference = models[name]
    vocab = source.vocab_size
    first, second = ids_of(vocab, 16, 0), ids_of(vocab, 5, 1)
    implementation = executorch_custom_ops.register() if custom_ops else model.config._attn_implementation
    kernels = executorch_state_kernels() if custom_ops else torch.no_grad()
    with export_patches(source.model_type), attention.switched(model, implementation), kernels, torch.no_grad():
        wrapper = BufferCacheDecoder(model, source.layers, MAX_LEN, custom_ops=custom_ops).eval()
        assert wrapper.stateful
        got = np.concatenate([wrapper(torch.tensor([first[a:b]]), torch.arange(a, b))[0].numpy()
                              for a, b in chunks(first)])
        again = wrapper(torch.tensor([second]), torch.arange(len(second)))[0].numpy()  # no reset_cache()
    np.testing.assert_allclose(got, eager(reference, first), atol=2e-5, rtol=0)
    np.testing.assert_allclose(again, eager(reference, second), atol=2e-5, rtol=0)


def test_without_the_position_zero_rule_a_second_sequence_is_wrong(models, monkeypatch):
    """The reset check above can fail: with ``start_sequence`` disabled the second sequence reads the first's
    state and parts from eager."""
    source, model, reference = models["tiny-qwen3-5"]
    monkeypatch.setattr(state_cache.StateLayer, "start_sequence", lambda self, new_sequence: None)
    first, second = ids_of(source.vocab_size, 9, 0), ids_of(source.vocab_size, 5, 1)
    with export_patches(source.model_type), torch.no_grad():
        wrapper = BufferCacheDecoder(model, source.layers, MAX_LEN).eval()
        wrapper(torch.tensor([first]), torch.arange(len(first)))
        again = wrapper(torch.tensor([second]), torch.arange(len(second)))[0].numpy()
    assert np.abs(again - eager(reference, second)).max() > 1e-2


@pytest.mark.parametrize("name", ["tiny-lfm2", "tiny-qwen3-5", "tiny-falcon-h1"])
def test_io_decoder_matches_eager_and_names_follow_the_plan(models, name):
    source, model, reference = models[name]
    ids, second = ids_of(source.vocab_size, 16, 2), ids_of(source.vocab_size, 4, 3)
    with export_patches(source.model_type), torch.no_grad():
        wrapper = IOCacheDecoder(model, source.layers, MAX_LEN).eval()
        past = wrapper.empty_past()
        inputs, outputs = io_names(wrapper.plan)
        assert len(inputs) == 3 + len(past) and len(outputs) == 1 + len(past)
        rows = []
        for tokens, start in [(ids[a:b], a) for a, b in chunks(ids)] + [(second, 0)]:
            end = start + len(tokens)
            out = wrapper(torch.tensor([tokens]), torch.ones(1, end, dtype=torch.long), torch.arange(start, end)[None],
                          *past)
            rows.append(out[0][0].numpy())
            past = list(out[1:])
    np.testing.assert_allclose(np.concatenate(rows[:-1]), eager(reference, ids), atol=2e-5, rtol=0)
    np.testing.assert_allclose(rows[-1], eager(reference, second), atol=2e-5, rtol=0)  # stale past, position 0
    for name_in, tensor in zip(inputs[3:], wrapper.empty_past()):
        kind = name_in.rsplit(".", 1)[1]
        assert tensor.dim() == {"key": 4, "value": 4, "conv": 3, "recurrent": 4}[kind]


def test_plan_of_a_hybrid(models):
    source, model, _ = models["tiny-qwen3-5"]
    plan = cache_plan(model, source.layers, 1, MAX_LEN)
    assert [layer.has_kv for layer in plan] == [False, False, False, True]
    state = plan[0].state
    assert state.conv_shape == (1, 2 * HK * DK + HV * DV, 3)  # kernel 4: K-1 columns
    assert state.recurrent_shape == (1, HV, DK, DV) and state.recurrent_dtype == torch.float32
    flat = [torch.zeros(1)] * 8  # 3 x (conv, recurrent) + (key, value)
    keys, values, states = split_past(plan, flat)
    assert keys[:3] == [None] * 3 and keys[3] is not None and states[3] is None and states[0] is not None
    falcon = cache_plan(models["tiny-falcon-h1"][1], models["tiny-falcon-h1"][0].layers, 1, MAX_LEN)
    assert all(layer.has_kv and layer.state is not None for layer in falcon)  # "hybrid": both in one layer


def test_attention_only_plans_are_unchanged(builtin_checkpoint):
    source = builtin_checkpoint("tiny-llama")
    wrapper = BufferCacheDecoder(pipeline.load_export_model(source), source.layers, MAX_LEN)
    assert not wrapper.stateful and wrapper.state_details() == {}
    assert sorted(name for name, _ in wrapper.named_buffers() if "cache" in name or "state" in name) == \
        sorted(f"{kind}_cache_{i}" for i in range(len(source.layers)) for kind in ("k", "v"))
