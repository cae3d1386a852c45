"""Build one ONNX artifact for a recipe: cast (float16) -> wrap (IO cache) -> capture -> lower -> weight-only
quantization (int4 / int8, ``quantize``) -> fusions (``fusions``) -> embedding quantization (``qembedding``) ->
``genai_config.json`` (``genai``).

Cache contracts (``recipe.kv_cache``): ``static`` (shared buffer of ``max_seq_len`` slots, ``IOCacheDecoder``) or
``dynamic`` (concatenating past/present, ``ConcatCacheDecoder``).

Fusions ``recipe.ort_fusions`` (``"cpu"``): after lowering and quantization, ``exporter.backends.onnx.fusions`` rewrites
the graph into onnxruntime's fused ops (skip RMSNorm, rotary, packed projections); verification checks the result.

Attention ``onnxruntime_contrib_ops`` (static cache only): ORT's ``com.microsoft`` GroupQueryAttention through
``attention.onnxruntime_contrib_ops`` and ``GQACacheDecoder`` (same graph I/O). Layers it cannot express (chunked, keys and values of
different head sizes, non-causal) keep the export_safe path; models whose class does not route attention through
``AttentionInterface`` use export_safe throughout. ``details["attention"]`` says which path was taken,
``details["gqa_fallback"]`` which layers fell back and why.
"""

from __future__ import annotations

from pathlib import Path

import attention
from attention import onnxruntime_contrib_ops
from exporter.backends.onnx.fusions import fuse_onnx_file
from exporter.backends.onnx.genai_state import write_genai_config
from exporter.backends.onnx.lower import export_onnx
from exporter.backends.onnx.qembedding import quantize_onnx_embeddings
from exporter.backends.onnx.quantize import BITS, quantize_onnx
from exporter.backends.onnx.wrappers import ConcatCacheDecoder, GQACacheDecoder, IOCacheDecoder
from exporter.capture import export_concat_decoder, export_io_decoder
from exporter.checkpoint import Checkpoint
from exporter.errors import describe
from exporter.progress import Progress

NAME = "model.onnx"


def build_onnx(recipe, model, checkpoint: Checkpoint, max_seq_len: int, staging: Path, progress: Progress) -> dict:
    """Write ``model.onnx`` (+ external data) and ``genai_config.json`` into ``staging``; returns the build details
    for the manifest.

    ``model`` is this recipe's own copy when the recipe is not exact (it may be cast or changed in place).
    """
    details: dict = {"kv_cache": recipe.kv_cache, "dtype": recipe.dtype, "quantization": recipe.quantization}
    if recipe.dtype == "float16":
        model.half()
    dynamic = recipe.kv_cache == "dynamic"
    layers = checkpoint.layers
    implementation, wrapper, table = model.config._attn_implementation, None, None
    if recipe.attention == "onnxruntime_contrib_ops":
        implementation = onnxruntime_contrib_ops.register()
    with attention.switched(model, implementation):  # an exact recipe shares the model with the other recipes
        if recipe.attention == "onnxruntime_contrib_ops":
            wrapper, table = _gqa_wrapper(model, layers, max_seq_len, details, progress)
        else:
            details["attention"] = "export_safe"
        if wrapper is None:
            wrapper = (ConcatCacheDecoder if dynamic else IOCacheDecoder)(model, layers, max_seq_len).eval()
        with progress.stage("capture", f"torch.export for {recipe.name} ({recipe.kv_cache} cache)"):
            program = (export_concat_decoder if dynamic else export_io_decoder)(wrapper)
        with progress.stage("lower", f"torch.onnx.export dynamo ({recipe.name})"):
            export_onnx(program, wrapper.plan, max_seq_len, staging / NAME, translation_table=table)
            del program
    if recipe.quantization != "none":
        with progress.stage("quantize", f"MatMulNBits {recipe.quantization}, block size {recipe.group_size}"):
            details.update(quantize_onnx(model, staging / NAME, BITS[recipe.quantization], recipe.group_size))
    if recipe.ort_fusions != "none":
        _fuse(staging / NAME, recipe.ort_fusions, details, progress)
    if recipe.embedding_quantization != "none":  # after the fusions: their constant folding would copy the
        # shared table into a second, reshaped initializer
        bits = {"4w": 4, "8w": 8}[recipe.embedding_quantization]
        block = recipe.group_size or 32
        with progress.stage("qembed", f"GatherBlockQuantized embedding, {bits} bits, block size {block}"):
            details.update(quantize_onnx_embeddings(model, staging / NAME, bits, block))
    details.update(wrapper.state_details())  # state layers: their graph I/O, the input_pos rule, prefill kernels
    details.update(write_genai_config(staging, checkpoint, wrapper.plan, max_seq_len, share_buffer=not dynamic))
    return details


def _fuse(path: Path, provider: str, details: dict, progress: Progress) -> None:
    """Fuse ``path`` in place for ``provider`` (``exporter.backends.onnx.fusions``). A fusion pass that raises leaves the
    unfused graph, which is then verified and shipped; ``details["ort_fusions"]`` says so with the error."""
    with progress.stage("fuse", f"onnxruntime fusions for {provider}"):
        try:
            details.update(fuse_onnx_file(path, provider))
        except Exception as exc:  # noqa: BLE001 - any failure inside the rewriter keeps the unfused graph
            message = describe(exc, 200)
            details["ort_fusions"] = f"not applied ({message})"
            progress.note(f"onnxruntime fusions not applied, the unfused graph is kept: {message}")


def _gqa_wrapper(model, layers, max_seq_len: int, details: dict, progress: Progress):
    """``(GQACacheDecoder, translation table)`` for a model running ``attention.onnxruntime_contrib_ops``, or
    ``(None, None)`` when no layer can take GroupQueryAttention (export_safe then; ``details`` say why)."""
    wrapper = GQACacheDecoder(model, layers, max_seq_len).eval()
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
    return wrapper, onnxruntime_contrib_ops.translation_table()
