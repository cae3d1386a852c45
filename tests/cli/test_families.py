"""Every built-in family exports to both targets and passes verification, windowed ones decoding past the window."""

from __future__ import annotations

import pytest

from exporter.builtin import BUILTIN_CONFIGS, WINDOW
from tests.conftest import read_json, run_cli

FAMILIES = sorted(set(BUILTIN_CONFIGS) - {"tiny-llama"})  # tiny-llama: the session export, tests/test_spine.py


@pytest.mark.parametrize("name", FAMILIES)
def test_family_exports_and_verifies(tmp_path, name):
    output = tmp_path / name
    result = run_cli("--model", f"builtin:{name}", "--target", "all", "--output", output, "--max-seq-len", "64")
    report_path = output / "verification.json"
    if not report_path.exists():
        report_path = tmp_path / f"{name}.failed" / "verification.json"
    assert result.returncode == 0, (result.stderr[-2000:], report_path.read_text()[-4000:]
                                    if report_path.exists() else "no report")
    report = read_json(report_path)
    assert report["passed"] is True
    overrides = BUILTIN_CONFIGS[name][1]
    windowed = overrides.get("sliding_window") is not None or overrides.get("attention_chunk_size") is not None
    for artifact in ("model.pte", "model.onnx"):
        stages = report["artifacts"][artifact]["stages"]
        assert all(stage["passed"] for stage in stages)
        decodes = [s for s in stages if s["stage"].startswith("decode[")]
        assert decodes
        if windowed:
            # a prompt longer than the window, a shorter one, each decoded well past the window
            prompts = [int(s["stage"][7:].split("+")[0]) for s in decodes]
            assert max(prompts) > WINDOW and min(prompts) < WINDOW
            assert all(p + s["positions"] >= 3 * WINDOW for p, s in zip(prompts, decodes))

