"""Build one ExecuTorch artifact for a recipe: quantize (torchao) -> wrap (static KV cache as mutable buffers) ->
capture -> lower (XNNPACK) -> ``model.pte`` (+ ``model.ptd`` holding the weights, each tensor once, when the recipe
says ``external_weights``).

Attention ``executorch_custom_ops`` (the XNNPACK recipes): ExecuTorch's ``llama::update_cache`` /
``llama::custom_sdpa`` through ``attention.executorch_custom_ops``, the runner metadata says
``use_sdpa_with_kv_cache``. It needs keys and values of one head size in every layer; models without (multi-head
latent attention) and model classes that do not route attention through ``AttentionInterface`` use the generic
``export_safe`` path, and the build details say so.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

import attention
from attention import executorch_custom_ops
from exporter.backends.executorch.lower import WEIGHTS_TAG, lower_to_pte, runner_metadata
from exporter.backends.executorch.quantize import quantize_model
from exporter.backends.executorch.wrapper import BufferCacheDecoder
from exporter.backends.executorch.state import executorch_state_kernels
from exporter.cache import cache_plan, has_state
from exporter.capture import export_buffer_decoder
from exporter.checkpoint import Checkpoint
from exporter.progress import Progress
from exporter.quiet import native_output_captured
from exporter.verification.plan import prefill_chunk


def custom_ops_blocker(model, plan) -> str | None:
    """Why the custom-op path cannot take ``model`` (None when it can)."""
    # hybrid models with state layers (Qwen3.5, Falcon-H1) call AttentionInterface without declaring it: for
    # them the probe (probe_custom_ops) is the check
    if not getattr(model, "_supports_attention_backend", False) and not has_state(plan):
        return f"{type(model).__name__} does not route attention through AttentionInterface"
    for layer in plan:
        if layer.has_kv and layer.key_shape[1::2] != layer.value_shape[1::2]:
            return "keys and values differ in shape (llama::custom_sdpa needs one head size)"
    return None


def probe_custom_ops(model, layers, max_seq_len: int) -> str | None:
    """Run the custom-op wrapper eagerly on a short prompt and one decode step and compare with the model's own
    forward (no cache): catches model code that reads the cache itself instead of going through
    ``AttentionInterface`` (e.g. DiffLlama's differential attention), which the static checks cannot see."""
    vocab = model.config.get_text_config().vocab_size
    ids = (torch.arange(7) * 7 + 3) % vocab
    length = min(6, max_seq_len - 1)
    with torch.no_grad():
        expected = model(input_ids=ids[None, :length + 1], use_cache=False).logits[0].float()
        with attention.switched(model, executorch_custom_ops.register()):
            wrapper = BufferCacheDecoder(model, layers, max_seq_len, custom_ops=True).eval()
            prefill = wrapper(ids[None, :length], torch.arange(length))[0]
            step = wrapper(ids[None, length:length + 1], torch.tensor([length]))[0]
    got = torch.cat([prefill, step]).float()
    diff = float((got - expected).abs().max())
    scale = float(expected.abs().max()) or 1.0
    if not diff <= 1e-3 * max(1.0, scale):  # also catches NaN
        return f"the custom-op attention disagrees with the model's own forward on a probe (max abs diff {diff:.3g})"
    return None


def build_executorch(recipe, model, checkpoint: Checkpoint, max_seq_len: int, staging: Path,
                     progress: Progress) -> dict:
    """Write ``model.pte`` (+ ``model.ptd``) into ``staging``; returns the build details for the manifest.

    ``model`` is this recipe's own copy when the recipe quantizes (it is quantized in place).
    """
    details = {}
    layers = checkpoint.layers
    custom_ops = recipe.attention == "executorch_custom_ops"
    if custom_ops:
        # before any cast or quantization: the probe compares the attention paths, and int8 activations or float16
        # would round them apart (measured: 0.03 on an 8da4w SmolLM2 shape, which sent it to the slow path)
        with executorch_state_kernels():
            blocker = (custom_ops_blocker(model, cache_plan(model, layers, 1, max_seq_len))
                       or probe_custom_ops(model, layers, max_seq_len))
        if blocker:
            progress.note(f"ExecuTorch custom ops not used: {blocker}")
            details["custom_ops_fallback"] = blocker
            custom_ops = False
    if recipe.dtype == "float16":
        model.to(torch.float16)  # weights, activations and the KV cache (the cache takes the model's dtype)
    quantized = recipe.quantization != "none" or recipe.embedding_quantization != "none"
    if quantized:
        with progress.stage("quantize", f"torchao {recipe.quantization} (group {recipe.group_size}), "
                                        f"embedding {recipe.embedding_quantization}"):
            summary = quantize_model(model, recipe.quantization, recipe.group_size,
                                     None if recipe.embedding_quantization == "none" else recipe.embedding_quantization)
        details["quantization"] = summary.as_dict()
    details["attention"] = "executorch_custom_ops" if custom_ops else "export_safe"
    implementation = executorch_custom_ops.register() if custom_ops else model.config._attn_implementation
    kernels = executorch_state_kernels() if custom_ops else contextlib.nullcontext()  # state layers' custom ops
    with attention.switched(model, implementation), kernels:  # the model may be shared with the next recipe
        with progress.stage("capture", f"torch.export for {recipe.name}"):
            wrapper = BufferCacheDecoder(model, layers, max_seq_len, custom_ops=custom_ops).eval()
            program = export_buffer_decoder(wrapper, prefill_chunk(max_seq_len))
    details.update(wrapper.state_details())  # state layers: buffers, the input_pos rule, prefill kernels
    ids = checkpoint.special_ids
    metadata = runner_metadata(checkpoint.vocab_size, prefill_chunk(max_seq_len), max_seq_len, ids.eos, ids.bos,
                               use_sdpa_with_kv_cache=custom_ops)
    with progress.stage("lower", f"ExecuTorch {recipe.backend} ({recipe.name})"), native_output_captured():
        data = lower_to_pte(program, metadata, quantized=quantized,
                            weights_dir=staging if recipe.external_weights else None)
        (staging / "model.pte").write_bytes(data)
    if recipe.external_weights:
        details["weights_file"] = f"{WEIGHTS_TAG}.ptd"
    return details
