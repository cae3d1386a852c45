"""The verifier can fail: bugs planted in the export path, each of a kind that once existed or easily could, must be
caught by verification (exit status / report), and nothing lands under the output name. Each test's control is
the same export without the bug, which passes (``test_correct_exports_pass``)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

import attention
import masks
from exporter import pipeline, recipes
from exporter.manifest import file_entries
from exporter.progress import Progress
from tests.conftest import read_json, run_cli

ARTIFACT = {"executorch": "model.pte", "onnx": "model.onnx"}
CACHE = 48  # > the built-ins' window 8, and room for every verification case


def export(tmp_path, model: str, recipe: str, max_seq_len: int = CACHE):
    """In-process export (so monkeypatched bugs take effect); the report, and whether anything landed."""
    output = tmp_path / "out"
    request = pipeline.ExportRequest(model=model, recipes=[recipes.load(recipe)], output=output,
                                     max_seq_len=max_seq_len)
    result = pipeline.run_export(request, Progress(quiet=True))
    assert not list(tmp_path.glob(".out.partial-*"))
    if result.passed:
        assert output.is_dir()
        return read_json(output / "verification.json"), True
    assert not output.exists()
    return read_json(tmp_path / "out.failed" / "verification.json"), False


def failed_stages(report: dict, target: str) -> list[str]:
    return [s["stage"] for s in report["artifacts"][ARTIFACT[target]]["stages"] if not s["passed"]]


# --- the bugs -----------------------------------------------------------------------------------------------------

def off_by_one_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                    attention_mask=None, device="cpu", **_):
    """Causal mask shifted by one: every query also sees the next position."""
    _, _, q, kv = masks.index_grids(batch_size, q_length, kv_length, q_offset, kv_offset, device)
    return (kv <= q + 1).expand(batch_size, 1, q_length, kv_length)


def plant_mask_off_by_one(monkeypatch):
    from transformers.masking_utils import AttentionMaskInterface

    monkeypatch.setattr(masks, "register", lambda name: AttentionMaskInterface.register(name, off_by_one_mask))


def plant_ring_slot_off_by_one(monkeypatch):
    """Ring slots labelled one position off once the ring has wrapped."""
    from exporter import cache

    real = cache.ring_slot_positions

    def shifted(next_position, window, invalid=cache.INVALID_POSITION):
        held = real(next_position, window, invalid)
        return torch.where(held >= window, held - 1, held)

    monkeypatch.setattr(cache, "ring_slot_positions", shifted)


def plant_stale_ring_slots(monkeypatch):
    """Never-written ring slots (a new sequence's, holding the previous sequence's keys) not invalidated."""
    from exporter import cache

    real = cache.ring_slot_positions
    monkeypatch.setattr(cache, "ring_slot_positions",
                        lambda next_position, window, invalid=cache.INVALID_POSITION:
                        real(next_position, window, -1))  # "position -1": causal, visible


def plant_wrong_slot_for_chunks(monkeypatch):
    """KV written one slot late, only for multi-token steps at a start position > 0 (a chat's next message)."""
    from exporter import cache

    real = cache.PositionedKVLayer._write

    def write(self, slots, key_states, value_states):
        later_chunk = ((slots[0] > 0) & (slots[-1] > slots[0])).long()
        real(self, slots + later_chunk, key_states, value_states)

    monkeypatch.setattr(cache.PositionedKVLayer, "_write", write)


def during_build(monkeypatch, apply):
    """Plant a bug in code the eager reference shares (transformers' model code) only while artifacts are built."""
    real = pipeline.build_artifact

    def build_with_bug(*args, **kwargs):
        with pytest.MonkeyPatch.context() as patch:
            apply(patch)
            return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "build_artifact", build_with_bug)


def plant_rotary_offset(monkeypatch):
    """Tokens from position 12 on are rotated as if one position later (cached keys before them are not)."""
    from transformers.models.llama import modeling_llama

    real = modeling_llama.LlamaRotaryEmbedding.forward
    during_build(monkeypatch, lambda patch: patch.setattr(
        modeling_llama.LlamaRotaryEmbedding, "forward",
        lambda self, x, position_ids: real(self, x, position_ids + (position_ids >= 12).long())))


def plant_gqa_window_off_by_one(monkeypatch):
    """GroupQueryAttention told a sliding window one key wider than the model's."""
    from attention import onnxruntime_contrib_ops

    real = onnxruntime_contrib_ops.ort_window
    monkeypatch.setattr(onnxruntime_contrib_ops, "ort_window", lambda w: real(w) + 1 if w else real(w))


def plant_wrong_eos(monkeypatch):
    """The .pte's get_eos_ids names a different token than the checkpoint."""
    from exporter.backends.executorch import build

    real = build.runner_metadata
    monkeypatch.setattr(build, "runner_metadata",
                        lambda vocab, chunk, context, eos, bos, **kw: real(vocab, chunk, context, [e + 1 for e in eos],
                                                                           bos, **kw))


def plant_onnx_scales_doubled(monkeypatch):
    """Every MatMulNBits scale doubled in the file after quantization: the matched reference reads the file, so only
    the fp32 side can see it."""
    import onnx
    from onnx import numpy_helper

    from exporter.backends.onnx import build
    from exporter.backends.onnx.matmulnbits import save_model

    real = build.quantize_onnx

    def quantize_then_double(model, path, bits, block_size):
        details = real(model, path, bits, block_size)
        proto = onnx.load(str(path), load_external_data=True)
        scales = {n.input[2] for n in proto.graph.node if n.op_type == "MatMulNBits"}
        for init in proto.graph.initializer:
            if init.name in scales:
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2, init.name))
        save_model(proto, path)
        return details

    monkeypatch.setattr(build, "quantize_onnx", quantize_then_double)


def plant_torchao_scales_doubled(monkeypatch):
    """Every 4-bit group scale doubled after torchao quantization, in the artifact and in the matched reference
    alike (they share the quantizer): only the fp32 side can see it."""
    from exporter.backends.executorch import quantize

    real = quantize.quantize_model

    def quantize_then_double(model, scheme, group_size, embedding=None):
        summary = real(model, scheme, group_size, embedding)
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, torch.nn.Linear) and hasattr(weight, "scale"):
                weight.scale.mul_(2)
        return summary

    from exporter.backends.executorch import build

    monkeypatch.setattr(quantize, "quantize_model", quantize_then_double)  # the matched reference's
    monkeypatch.setattr(build, "quantize_model", quantize_then_double)  # the artifact's


BUGS = {
    # name: (plant, model, recipe, stage that must fail (prefix))
    "mask off by one (onnx)": (plant_mask_off_by_one, "builtin:tiny-llama", "onnx-fp32", "prefill["),
    "mask off by one (executorch, windowed layers)": (plant_mask_off_by_one, "builtin:tiny-mistral", "xnnpack-fp32",
                                                      "prefill["),
    "ring slot off by one after wrap": (plant_ring_slot_off_by_one, "builtin:tiny-mistral", "xnnpack-fp32",
                                        "decode["),
    "stale ring slots on a new sequence": (plant_stale_ring_slots, "builtin:tiny-mistral", "xnnpack-fp32",
                                           "second sequence "),
    "kv written at the wrong slot for chunks": (plant_wrong_slot_for_chunks, "builtin:tiny-llama", "onnx-fp32",
                                                "multi-turn chunk["),
    "rotary offset by one (executorch)": (plant_rotary_offset, "builtin:tiny-llama", "xnnpack-fp32", "decode["),
    "rotary offset by one (onnx)": (plant_rotary_offset, "builtin:tiny-llama", "onnx-fp32", "decode["),
    "sliding window off by one (GroupQueryAttention)": (plant_gqa_window_off_by_one, "builtin:tiny-mistral",
                                                        "onnx-fp32-gqa", "decode["),
    "wrong eos id in the .pte": (plant_wrong_eos, "builtin:tiny-llama", "xnnpack-fp32", "metadata"),
    "4-bit scales x2 (onnx)": (plant_onnx_scales_doubled, "builtin:tiny-llama", "onnx-int4", "vs fp32 "),
    "4-bit scales x2 (executorch)": (plant_torchao_scales_doubled, "builtin:tiny-llama", "xnnpack-8da4w", "vs fp32 "),
}


@pytest.mark.parametrize("name", sorted(BUGS))
def test_planted_bug_fails_verification(tmp_path, monkeypatch, name):
    plant, model, recipe, stage = BUGS[name]
    plant(monkeypatch)
    try:
        report, landed = export(tmp_path, model, recipe)
    finally:
        monkeypatch.undo()
        attention.register()  # the real mask builder back for later tests
    target = recipes.load(recipe).target
    assert not landed and report["passed"] is False
    failed = failed_stages(report, target)
    assert any(s.startswith(stage) for s in failed), failed


@pytest.mark.parametrize("model,recipe", sorted({(m, r) for _, m, r, _ in BUGS.values()}))
def test_correct_exports_pass(tmp_path, model, recipe):
    """Control: every export the bugs were planted in passes verification as it is."""
    report, landed = export(tmp_path, model, recipe)
    assert landed and report["passed"] is True


def test_corrupted_weights_file_fails_verify(tmp_path, tiny_export):
    """A .ptd whose weights changed (the manifest rewritten to match, so only the numbers can tell) fails
    ``export-model verify`` with exit 1."""
    folder = tmp_path / "artifact"
    shutil.copytree(tiny_export, folder)
    data = bytearray((folder / "model.ptd").read_bytes())
    for offset in range(len(data) // 4, len(data) // 2, 4096):  # flip the low mantissa bit of one float in 4096
        data[offset + 2] ^= 0x40
    (folder / "model.ptd").write_bytes(bytes(data))
    manifest = read_json(folder / "manifest.json")
    manifest["files"] = file_entries(folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("verify", folder)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]


def test_recipe_thresholds_are_what_the_bugs_are_graded_with():
    """The fp32 recipes grade against float64 with the stated noise multiple (the bugs above fail by far more)."""
    for name in ("xnnpack-fp32", "onnx-fp32", "onnx-fp32-gqa"):
        recipe = recipes.load(name)
        assert recipe.exact and recipe.max_error_ratio == 8.0 and recipe.min_top1_agreement == 1.0
    assert dataclasses.replace(recipes.load("onnx-int4")).fp32_max_mean_kl is not None
