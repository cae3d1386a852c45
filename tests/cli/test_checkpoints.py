"""Checkpoints as users bring them: composite (vision + text) checkpoints, GGUF files, padded vocabularies, model
types without a built-in; and how the CLI reports each model type's tier."""

from __future__ import annotations

from exporter import tiers
from tests.conftest import read_json, run_cli


def test_padded_vocabulary_exports_and_passes(tmp_path, builtin_checkpoint):
    """config.vocab_size (16384) far beyond the tokenizer (124 tokens), as in Qwen2.5 or Phi-3: the runtimes'
    generation checks compare ids (random weights pick ids without text most of the time)."""
    folder = builtin_checkpoint("tiny-llama", vocab_size=16384).folder
    result = run_cli("--model", folder, "--target", "all", "--output", tmp_path / "out", "--max-seq-len", "48")
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_json(tmp_path / "out" / "verification.json")
    for name in ("model.pte", "model.onnx"):
        stages = {s["stage"]: s for s in report["artifacts"][name]["stages"]}
        generation = stages.get("text_llm_runner") or stages.get("genai_generate")
        first = generation["turns"][0]
        assert first["passed"] and any(t >= 124 for t in first["expected"]), first  # ids the tokenizer lacks
        assert stages["metadata"]["passed"]


def test_composite_checkpoint_exports_its_text_decoder(tmp_path):
    """A Gemma 3 vision checkpoint as published: its text decoder is exported and verified against the
    composite model's own text-only forward; the manifest says where it came from."""
    result = run_cli("--model", "builtin:tiny-gemma3-vision", "--target", "onnx", "--output", tmp_path / "out",
                     "--max-seq-len", "48")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_json(tmp_path / "out" / "manifest.json")
    assert manifest["model"]["model_type"] == "gemma3_text"
    assert manifest["model"]["composite"]["model_type"] == "gemma3"
    assert manifest["model"]["composite"]["architectures"] == ["Gemma3ForConditionalGeneration"]
    report = read_json(tmp_path / "out" / "verification.json")
    assert "composite model's own text-only forward" in report["reference"] and report["passed"]


def test_gguf_input_errors_are_one_line(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    result = run_cli("--model", bad, "--output", tmp_path / "out")
    assert result.returncode == 2 and result.stderr.strip() == f"export-model: error: --model {bad}: not a GGUF file"
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (folder / name).write_bytes(b"GGUF" + b"\0" * 16)
    result = run_cli("--model", folder, "--output", tmp_path / "out")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "holds 2 GGUF files (a.gguf, b.gguf); pick one with --gguf-file NAME" in result.stderr
    result = run_cli("--model", folder, "--gguf-file", "c.gguf", "--output", tmp_path / "out")
    assert result.returncode == 2 and "--gguf-file c.gguf: no such file" in result.stderr
    assert not (tmp_path / "out").exists()


def test_every_causal_lm_type_has_a_tier():
    listed = tiers.all_tiers()
    by_type = {t.model_type: t for t in listed}
    assert by_type["llama"].tier == tiers.TESTED and by_type["gemma3"].tier == tiers.TESTED  # a composite built-in
    assert sum(t.tier == tiers.VERIFIED for t in listed) >= 70  # from exporter/model_tiers.json
    assert all(t.tier in (tiers.TESTED, tiers.VERIFIED, tiers.NOT_VERIFIED) for t in listed)
    result = run_cli("models", "--tier", "tested")
    assert result.returncode == 0 and "tiny-gemma4" in result.stdout


def test_a_type_without_built_in_is_attempted_and_its_tier_said_up_front(tmp_path, builtin_checkpoint):
    """OLMo 3 has no built-in: it is exported and verified like any other, and the CLI says its tier first."""
    import json
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from exporter.builtin import _common, build_tokenizer_json

    folder = tmp_path / "olmo3"
    config = AutoConfig.for_model("olmo3", **_common(sliding_window=8, num_hidden_layers=4,
                                                   layer_types=["sliding_attention"] * 3 + ["full_attention"]))
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    (folder / "tokenizer.json").write_text(build_tokenizer_json())
    shutil.copy(builtin_checkpoint("tiny-llama").folder / "tokenizer_config.json", folder)
    result = run_cli("--model", folder, "--target", "onnx", "--output", tmp_path / "out", "--max-seq-len", "48")
    assert result.returncode == 0, result.stderr[-3000:]
    first_note = next(line for line in result.stderr.splitlines() if line.startswith("        "))
    assert first_note.strip().startswith(f"olmo3: {tiers.tier_of('olmo3').tier}")
    assert json.loads((tmp_path / "out" / "verification.json").read_text())["passed"]
