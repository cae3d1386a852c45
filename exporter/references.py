"""Eager references for verification: the fp32 model as the checkpoint defines it, and for a quantized or
reduced-precision recipe the *matched* reference, the same eager model changed exactly the way the artifact was
(torchao quantization with the same scheme for ExecuTorch; weights read back from the ONNX file for ONNX). The
matched reference isolates what capture and lowering did; the fp32 reference measures what quantization cost."""

from __future__ import annotations

from pathlib import Path


def matched_reference_model(recipe, model_dir: Path, artifact: Path):
    """A freshly loaded eager model (transformers' default attention) numerically matched to ``recipe``."""
    from exporter import loading

    model = loading.load_model(model_dir)
    if recipe.exact:
        return model
    if recipe.target == "executorch" and recipe.dtype == "float16":
        import torch

        return model.to(torch.float16)  # recipes.check refuses float16 together with quantization
    if recipe.target == "executorch":
        from exporter.quantize import quantize_model

        embedding = None if recipe.embedding_quantization == "none" else recipe.embedding_quantization
        quantize_model(model, recipe.quantization, recipe.group_size, embedding)
        return model
    from exporter.onnx_quantize import onnx_reference_model

    return onnx_reference_model(recipe, model, artifact)
