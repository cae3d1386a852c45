"""The ExecuTorch fast path: llama custom ops (update_cache / custom_sdpa) behind the ``executorch_custom_ops``
attention, the ``[B, L, KVH, D]`` cache, and torchao quantization; eager checks plus three small exports run in
ExecuTorch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attention import executorch_custom_ops
from attention.executorch_custom_ops import load_custom_ops
from exporter import recipes
from exporter.backends.executorch.quantize import quantize_model
from exporter.backends.executorch.wrapper import BufferCacheDecoder
from exporter.errors import UserError

MAX_LEN = 48
PROMPT = 12


@pytest.fixture(scope="module")
def models(builtin_checkpoint):
    return {name: builtin_checkpoint(name) for name in ("tiny-llama", "tiny-mistral")}


def sequence(vocab: int, length: int = 20) -> list[int]:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(7)).tolist()


@torch.no_grad()
def reference_logits(source, ids: list[int]) -> np.ndarray:
    model = source.load_model()
    return model(input_ids=torch.tensor([ids])).logits[0].numpy()


@torch.no_grad()
def wrapper_logits(step, ids: list[int]) -> np.ndarray:
    rows = [step(ids[:PROMPT], 0)] + [step([ids[i]], i) for i in range(PROMPT, len(ids))]
    return np.concatenate(rows)


def eager_step(wrapper):
    return lambda tokens, pos: wrapper(torch.tensor([tokens]), torch.arange(pos, pos + len(tokens)))[0].float().numpy()


def export_and_run(wrapper, tmp_path: Path, ids: list[int]) -> np.ndarray:
    """torch.export (non-strict, dynamic S) -> XNNPACK -> .pte -> executorch.runtime, teacher-forced."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from executorch.runtime import Runtime
    from torch.export import Dim

    import executorch.kernels.quantized  # noqa: F401  (quantized embedding kernels in this process's runtime)

    seq = Dim("seq_len", min=1, max=MAX_LEN)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(wrapper, (torch.zeros(1, 2, dtype=torch.long), torch.arange(2)),
                                      dynamic_shapes={"tokens": {1: seq}, "input_pos": {0: seq}}, strict=False)
        wrapper.reset_cache()
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert "llama.update_cache.default" in ops or "llama.update_cache_with_indices.default" in ops
        assert "llama.custom_sdpa.default" in ops
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
        et = edge.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True, do_quant_fusion_and_const_prop=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass()))
    # the caches are mutable buffers (planned memory, not serialized constants)
    assert len(et.exported_program().graph_signature.buffers_to_mutate) == 2 * len(wrapper.plan)
    path = tmp_path / "model.pte"
    path.write_bytes(et.buffer)
    method = Runtime.get().load_program(path).load_method("forward")

    def step(tokens, pos):
        out = method.execute([torch.tensor([tokens]), torch.arange(pos, pos + len(tokens))])[0]
        return out.reshape(-1, out.shape[-1]).float().numpy()

    return wrapper_logits(step, ids)


def test_custom_op_semantics():
    """custom_sdpa: [B,S,H,D] query, [B,L,KVH,D] caches, GQA; causal mode counts from start_pos; mask mode takes a
    float [S, L] mask over the whole cache; update_cache writes slots start_pos.. on dim 1."""
    load_custom_ops()
    torch.manual_seed(0)
    heads, kv_heads, dim, length = 6, 2, 16, 20
    k_cache, v_cache = torch.randn(1, length, kv_heads, dim), torch.randn(1, length, kv_heads, dim)

    def reference(q, start, mask):
        k = k_cache.transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
        v = v_cache.transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask).transpose(1, 2)

    for start, s in [(0, 5), (7, 3), (19, 1)]:
        q = torch.randn(1, s, heads, dim)
        pos, kv = torch.arange(start, start + s)[:, None], torch.arange(length)[None]
        causal = torch.where(kv <= pos, 0.0, float("-inf"))
        out = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0.0, True, None)
        assert (out - reference(q, start, causal)).abs().max() < 1e-5
        window = torch.where((kv <= pos) & (kv > pos - 4), 0.0, torch.finfo(torch.float32).min)
        out = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, 0, window, 0.0, False, None)
        assert (out - reference(q, start, window)).abs().max() < 1e-5
    cache, value = torch.zeros(1, length, kv_heads, dim), torch.randn(1, 3, kv_heads, dim)
    torch.ops.llama.update_cache(value, cache, 4)
    assert torch.equal(cache[:, 4:7], value) and cache[:, :4].abs().sum() == 0 and cache[:, 7:].abs().sum() == 0


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
def test_eager_wrapper_matches_transformers(models, name):
    """The wrapper with the custom-op attention/cache equals transformers' default attention (mistral: window 8 ring,
    decoding past the window)."""
    model = models[name].load_model(executorch_custom_ops.register())
    ids = sequence(model.config.vocab_size)
    wrapper = BufferCacheDecoder(model, models[name].layers, MAX_LEN, custom_ops=True).eval()
    got = wrapper_logits(eager_step(wrapper), ids)
    assert np.abs(got - reference_logits(models[name], ids)).max() < 1e-4


def test_standard_layout_without_start_pos(models):
    """Without the wrapper's cache keyword the attention is attention.export_safe (e.g. a DynamicCache run)."""
    model = models["tiny-llama"].load_model(executorch_custom_ops.register())
    ids = sequence(model.config.vocab_size, 10)
    with torch.no_grad():
        got = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - reference_logits(models["tiny-llama"], ids)).max() < 1e-4


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
def test_executorch_fp32_matches_transformers(models, name, tmp_path):
    model = models[name].load_model(executorch_custom_ops.register())
    ids = sequence(model.config.vocab_size)
    wrapper = BufferCacheDecoder(model, models[name].layers, MAX_LEN, custom_ops=True).eval()
    got = export_and_run(wrapper, tmp_path, ids)
    assert np.abs(got - reference_logits(models[name], ids)).max() < 1e-4


def test_executorch_8da4w_q4emb_matches_quantized_eager(models, tmp_path):
    """8da4w linears (group 32, bf16 scales as XNNPACK stores them) + 4-bit embedding: the artifact computes what the
    eager model quantized the same way computes."""
    model = models["tiny-llama"].load_model(executorch_custom_ops.register())
    summary = quantize_model(model, "8da4w", 32, "4w")
    assert summary.quantized_linears == 2 * 7 + 1 and summary.quantized_embeddings == 1
    wrapper = BufferCacheDecoder(model, models["tiny-llama"].layers, MAX_LEN, custom_ops=True).eval()
    ids = sequence(model.config.vocab_size)
    expected = wrapper_logits(eager_step(wrapper), ids)
    wrapper.reset_cache()
    got = export_and_run(wrapper, tmp_path, ids)
    # Bit-level agreement is typical (~1e-6); a dynamic activation value sitting on an int8 rounding boundary may
    # round the other way in XNNPACK (1-ulp float differences upstream), which shifts that token and every later one
    # by ~1e-2 relative. So: most rows tight, all rows close, top-1 kept.
    scale, rows = np.abs(expected).max(), np.abs(got - expected).max(-1)
    assert np.median(rows) < 1e-3 * scale and rows.max() < 5e-2 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def test_recipes_refuse_what_xnnpack_cannot_run():
    """The recipe validator owns these rules (torchao would quantize them; XNNPACK cannot run them)."""
    assert "int8" not in recipes.load("xnnpack-int8").quantization  # 8da8w: XNNPACK has no weight-only int8 linear
    with pytest.raises(UserError, match="per channel"):
        recipes.with_overrides(recipes.load("xnnpack-int8"), group_size=32)
    with pytest.raises(UserError, match="multiple of 32"):
        recipes.with_overrides(recipes.load("xnnpack-8da4w"), group_size=48)
    summary = quantize_model(torch.nn.Sequential(torch.nn.Linear(48, 32)), "8da4w", 32)
    assert summary.skipped_linears == ["0"] and summary.quantized_linears == 0
