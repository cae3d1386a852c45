"""Build one ONNX artifact for a recipe: cast (float16) -> wrap (IO cache) -> capture -> lower -> weight-only
quantization (int4 / int8, ``exporter.onnx_quantize``) -> fusions -> embedding quantization
(``exporter.onnx_qembedding``) -> ``genai_config.json``.

Cache contracts (``recipe.kv_cache``): ``static`` (shared buffer of ``max_seq_len`` slots, ``IOCacheDecoder``) or
``dynamic`` (concatenating past/present, ``ConcatCacheDecoder``).

Fusions ``recipe.ort_fusions`` (``"cpu"``): after lowering and quantization, ``exporter.onnx_fusions`` rewrites
the graph into onnxruntime's fused ops (skip RMSNorm, rotary, packed projections); verification checks the result.

Attention ``onnxruntime_contrib_ops`` (static cache only): ORT's ``com.microsoft`` GroupQueryAttention through
``attention.ort_gqa`` and ``GQACacheDecoder`` (same graph I/O). Layers it cannot express (chunked, keys and values of
different head sizes, non-causal) keep the export_safe path; models whose class does not route attention through
``AttentionInterface`` use export_safe throughout. ``details["attention"]`` says which path was taken,
``details["gqa_fallback"]`` which layers fell back and why.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from exporter.loading import SpecialIds
from exporter.progress import Progress


def build_onnx(recipe, model, config, max_seq_len: int, ids: SpecialIds, staging: Path, progress: Progress) -> tuple[str, dict]:
    """Write ``model.onnx`` (+ external data) and ``genai_config.json`` into ``staging``; returns the file name and
    build details for the manifest.

    ``model`` is this recipe's own copy when the recipe is not exact (it may be cast or changed in place).
    """
    from exporter.capture import export_concat_decoder, export_io_decoder
    from exporter.genai import genai_config
    from exporter.lower_onnx import export_onnx
    from exporter.wrappers import ConcatCacheDecoder, IOCacheDecoder

    name = "model.onnx"
    details: dict = {"kv_cache": recipe.kv_cache, "dtype": recipe.dtype, "quantization": recipe.quantization}
    if recipe.dtype == "float16" and recipe.quantization != "none":
        # measured on tiny-llama: float16 MatMulNBits rounds differently from any reference we can build (matched
        # top-1 0.875, max rel diff 2.5e-2), so the export could not be verified tightly
        raise ValueError(f"{recipe.quantization} weights with float16 activations are not supported for ONNX; "
                         "use float32 (the default) with int4/int8")
    if recipe.dtype == "float16":
        model.half()
    elif recipe.dtype != "float32":
        raise ValueError(f"ONNX export supports float32 and float16, not {recipe.dtype}")
    dynamic = recipe.kv_cache == "dynamic"
    previous_attention = model.config._attn_implementation
    wrapper, table = None, None
    if recipe.attention == "onnxruntime_contrib_ops":
        wrapper, table = _gqa_wrapper(model, max_seq_len, dynamic, details, progress)
    else:
        details["attention"] = "export_safe"
    if wrapper is None:
        wrapper = (ConcatCacheDecoder if dynamic else IOCacheDecoder)(model, max_seq_len).eval()
    try:
        with progress.stage("capture", f"torch.export for {recipe.name} ({recipe.kv_cache} cache)"):
            program = (export_concat_decoder if dynamic else export_io_decoder)(wrapper)
        with progress.stage("lower", f"torch.onnx.export dynamo ({recipe.name})"):
            export_onnx(program, wrapper.num_layers, max_seq_len, staging / name, translation_table=table)
            del program
    finally:  # an exact recipe shares the model with the other recipes of this export
        if model.config._attn_implementation != previous_attention:
            model.set_attn_implementation(previous_attention)
    if recipe.quantization != "none":
        from exporter.onnx_quantize import BITS, quantize_onnx

        if recipe.quantization not in BITS:
            raise ValueError(f"unknown ONNX quantization {recipe.quantization!r}")
        with progress.stage("quantize", f"MatMulNBits {recipe.quantization}, block size {recipe.group_size}"):
            details.update(quantize_onnx(model, staging / name, BITS[recipe.quantization], recipe.group_size))
    if recipe.ort_fusions != "none":
        _fuse(staging / name, recipe.ort_fusions, details, progress)
    if recipe.embedding_quantization != "none":  # after the fusions: their constant folding would copy the
        # shared table into a second, reshaped initializer
        from exporter.onnx_qembedding import quantize_onnx_embeddings

        bits = {"4w": 4, "8w": 8}[recipe.embedding_quantization]
        block = recipe.group_size or 32
        with progress.stage("qembed", f"GatherBlockQuantized embedding, {bits} bits, block size {block}"):
            details.update(quantize_onnx_embeddings(model, staging / name, bits, block))
    past = wrapper.empty_past()
    kv_heads, head_dim = past[0].shape[1], past[0].shape[3]
    genai = genai_config(config, max_seq_len, wrapper.num_layers, kv_heads, head_dim, ids.bos, ids.eos, ids.pad,
                         share_buffer=not dynamic)
    (staging / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n")
    return name, details


def _fuse(path: Path, provider: str, details: dict, progress: Progress) -> None:
    """Fuse ``path`` in place for ``provider`` (``exporter.onnx_fusions``). A fusion pass that raises leaves the
    unfused graph, which is then verified and shipped; ``details["ort_fusions"]`` says so with the error."""
    from exporter.onnx_fusions import fuse_onnx_file

    with progress.stage("fuse", f"onnxruntime fusions for {provider}"):
        try:
            details.update(fuse_onnx_file(path, provider))
        except Exception as exc:  # noqa: BLE001 - any failure inside the rewriter keeps the unfused graph
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            details["ort_fusions"] = f"not applied ({message})"
            progress.note(f"onnxruntime fusions not applied, the unfused graph is kept: {message}")


def _gqa_wrapper(model, max_seq_len: int, dynamic: bool, details: dict, progress: Progress):
    """``(GQACacheDecoder, translation table)`` with the model switched to ``attention.ort_gqa``, or
    ``(None, None)`` when no layer can take GroupQueryAttention (export_safe then; ``details`` say why)."""
    from exporter.wrappers import GQACacheDecoder

    if dynamic:
        raise ValueError("attention onnxruntime_contrib_ops needs the static (shared-buffer) cache, not dynamic")
    from attention import ort_gqa

    model.set_attn_implementation(ort_gqa.register())
    wrapper = GQACacheDecoder(model, max_seq_len).eval()
    if wrapper.fallback:
        reasons = sorted(set(wrapper.fallback.values()))
        details["gqa_fallback"] = {str(i): reason for i, reason in wrapper.fallback.items()}
        progress.note(f"GroupQueryAttention not used on {len(wrapper.fallback)}/{wrapper.num_layers} layers: "
                      f"{'; '.join(reasons)}")
    if not wrapper.gqa_layers:
        details["attention"] = "export_safe"
        return None, None
    details["attention"] = "onnxruntime_contrib_ops"
    details["gqa_layers"] = wrapper.gqa_layers
    return wrapper, ort_gqa.translation_table()
