"""The verifier can fail: a deliberately broken mask must be caught, and nothing lands under the output name."""

from __future__ import annotations

import pytest

import attention
import masks
from exporter import pipeline, recipes
from exporter.progress import Progress
from tests.conftest import read_json


def off_by_one_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                    attention_mask=None, device="cpu", **_):
    """Causal mask shifted by one: every query also sees the next position (a classic off-by-one)."""
    grids = masks.index_grids(batch_size, q_length, kv_length, q_offset, kv_offset, device)
    _, _, q, kv = grids
    return (kv <= q + 1).expand(batch_size, 1, q_length, kv_length)


ARTIFACT_NAMES = {"executorch": "model.pte", "onnx": "model.onnx"}


# ExecuTorch: a sliding-window model, because xnnpack-fp32's custom_sdpa computes plain causal layers without a mask
# (is_causal=True); windowed layers take the mask path, so a broken mask must show there.
@pytest.mark.parametrize("target,model", [("onnx", "builtin:tiny-llama"), ("executorch", "builtin:tiny-mistral")])
def test_off_by_one_mask_fails_verification(tmp_path, monkeypatch, target, model):
    from transformers.masking_utils import AttentionMaskInterface

    def register_broken(name):
        AttentionMaskInterface.register(name, off_by_one_mask)

    monkeypatch.setattr(masks, "register", register_broken)
    output = tmp_path / "out"
    request = pipeline.ExportRequest(model=model, recipes=[recipes.default_recipe(target)], output=output,
                                     max_seq_len=32)
    try:
        result = pipeline.run_export(request, Progress(quiet=True))
    finally:
        monkeypatch.undo()
        masks.register(attention.EXPORT_SAFE)  # restore the real builder for later tests
    assert result.passed is False
    assert not output.exists()
    failed = tmp_path / "out.failed"
    report = read_json(failed / "verification.json")
    assert report["passed"] is False
    stages = report["artifacts"][ARTIFACT_NAMES[target]]["stages"]
    prefill = next(s for s in stages if s["stage"].startswith("prefill[") and s["positions"] > 1)
    assert prefill["passed"] is False and prefill["max_abs_diff"] > 1e-3
    assert not list(tmp_path.glob(".out.partial-*"))


def test_real_mask_passes_same_setup(tmp_path):
    """Control for the test above: the same small export with the real mask passes."""
    request = pipeline.ExportRequest(model="builtin:tiny-llama", recipes=[recipes.load("onnx-fp32")],
                                     output=tmp_path / "out", max_seq_len=32)
    result = pipeline.run_export(request, Progress(quiet=True))
    assert result.passed is True
    assert read_json(tmp_path / "out" / "verification.json")["passed"] is True
