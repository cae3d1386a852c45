"""Build one ONNX artifact for a recipe: cast (float16) -> wrap (IO cache) -> capture -> lower -> weight-only
quantization (int4 / int8, ``exporter.onnx_quantize``) -> ``genai_config.json``.

Cache contracts (``recipe.kv_cache``): ``static`` (shared buffer of ``max_seq_len`` slots, ``IOCacheDecoder``) or
``dynamic`` (concatenating past/present, ``ConcatCacheDecoder``).
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
    wrapper = (ConcatCacheDecoder if dynamic else IOCacheDecoder)(model, max_seq_len).eval()
    with progress.stage("capture", f"torch.export for {recipe.name} ({recipe.kv_cache} cache)"):
        program = (export_concat_decoder if dynamic else export_io_decoder)(wrapper)
    with progress.stage("lower", f"torch.onnx.export dynamo ({recipe.name})"):
        export_onnx(program, wrapper.num_layers, max_seq_len, staging / name)
        del program
    if recipe.quantization != "none":
        from exporter.onnx_quantize import BITS, quantize_onnx

        if recipe.quantization not in BITS:
            raise ValueError(f"unknown ONNX quantization {recipe.quantization!r}")
        with progress.stage("quantize", f"MatMulNBits {recipe.quantization}, block size {recipe.group_size}"):
            details.update(quantize_onnx(model, staging / name, BITS[recipe.quantization], recipe.group_size))
    past = wrapper.empty_past()
    kv_heads, head_dim = past[0].shape[1], past[0].shape[3]
    genai = genai_config(config, max_seq_len, wrapper.num_layers, kv_heads, head_dim, ids.bos, ids.eos, ids.pad,
                         share_buffer=not dynamic)
    (staging / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n")
    return name, details
