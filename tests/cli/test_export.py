"""The main job end to end: ``export-model --model builtin:tiny-llama --target all``, then the artifacts driven in
their real runtimes by this test's own code (not the verifier's) and compared with eager transformers: prompts,
a multi-token message at a nonzero position, chunked prefill, a second sequence on the same loaded program, and
ExecuTorch's own ``TextLLMRunner``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.manifest import sha256_file
from tests.conftest import read_json, run_cli

EXPECTED_FILES = {"model.pte", "model.ptd", "model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json",
                  "tokenizer_config.json", "generation_config.json", "config.json", "verification.json",
                  "manifest.json"}
CACHE = 512  # the recipes' 2048, capped by the built-in's position limit
CHUNK = 256  # ExecuTorch's longest forward (get_max_seq_len) for that cache


@pytest.fixture(scope="module")
def eager(tiny_llama_dir):
    """The reference: the built-in checkpoint (rebuilt, it is deterministic) with transformers' default attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert model.config._attn_implementation == "sdpa"
    return model, tokenizer


def eager_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def conversation(tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of a two-turn conversation and how an app feeds them: (start, count) chunks, multi-token chunks at
    nonzero positions included."""
    first = tokenizer("A small prompt that is not the verifier's")["input_ids"]
    second = tokenizer(" and a second message, appended later", add_special_tokens=False)["input_ids"]
    ids = first + [40, 41, 42] + second + [43, 44]
    steps, position = [], 0
    for count in (len(first), 1, 1, 1, len(second), 1, 1):
        steps.append((position, count))
        position += count
    return ids, steps


def test_output_folder_is_complete_and_verified(tiny_export):
    assert EXPECTED_FILES <= {p.name for p in tiny_export.iterdir()}
    report = read_json(tiny_export / "verification.json")
    assert report["passed"] is True
    for name in ("model.pte", "model.onnx"):
        stages = report["artifacts"][name]["stages"]
        assert all(s["passed"] and "skipped" not in s for s in stages), [s["stage"] for s in stages]
        names = [s["stage"] for s in stages]
        assert "prefill[1]" in names and "metadata" in names
        assert any(n.startswith("multi-turn chunk[") for n in names)
        assert any(n.startswith("chunked prompt chunk[") for n in names)
        assert any(n.startswith("second sequence ") for n in names)
        for stage in stages:
            if stage["stage"].startswith(("multi-turn chunk", "chunked prompt chunk")):
                assert stage["start_pos"] > 0 and stage["tokens"] > 1
            if "error_ratio" in stage:
                assert stage["error_ratio"] <= 8 and stage["top1_agreement_margin_safe"] == 1.0


def test_manifest_hashes_every_file(tiny_export):
    manifest = read_json(tiny_export / "manifest.json")
    files = {p.name for p in tiny_export.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(tiny_export / name)
        assert entry["size"] == (tiny_export / name).stat().st_size
    assert manifest["packages"]["torch"].startswith("2.13.0")
    assert manifest["packages"]["executorch"] == "1.5.1"
    assert manifest["packages"]["transformers"] == "5.24.0"
    assert manifest["model"]["model_type"] == "llama"
    assert manifest["verification"]["passed"] is True
    assert manifest["build"]["executorch"]["attention"] == "executorch_custom_ops"
    assert manifest["build"]["onnx"]["attention"] == "export_safe"


def test_pte_constant_methods(tiny_export):
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(tiny_export / "model.pte", data_path=str(tiny_export / "model.ptd"))
    value = lambda name: program.load_method(name).execute([])[0]  # noqa: E731
    config = read_json(tiny_export / "config.json")
    assert value("get_max_seq_len") == CHUNK and value("get_max_context_len") == CACHE
    assert value("get_vocab_size") == config["vocab_size"]
    assert value("get_bos_id") == config["bos_token_id"]
    assert value("get_eos_ids") == config["eos_token_id"]
    assert value("use_kv_cache") is True and value("enable_dynamic_shape") is True
    assert value("use_sdpa_with_kv_cache") is True  # xnnpack-fp32 uses llama::custom_sdpa + update_cache


def test_pte_conversation_and_second_sequence_match_eager(tiny_export, eager):
    """Driven like an app: one loaded method, a conversation with a multi-token message at a nonzero position,
    then a new sequence from position 0 on the same method (its cache still holds the first one)."""
    from executorch.runtime import Runtime

    from exporter.backends.executorch.runtime import load_executorch_kernels

    load_executorch_kernels()  # the .pte calls llama::custom_sdpa / llama::update_cache
    model, tokenizer = eager
    program = Runtime.get().load_program(tiny_export / "model.pte", data_path=str(tiny_export / "model.ptd"))
    method = program.load_method("forward")
    ids, steps = conversation(tokenizer)
    got = np.concatenate([method.execute([torch.tensor([ids[s:s + n]]), torch.arange(s, s + n)])[0][0].numpy()
                          for s, n in steps])
    np.testing.assert_allclose(got, eager_logits(model, ids), atol=2e-5, rtol=0)
    fresh = tokenizer("Another sequence")["input_ids"]
    again = method.execute([torch.tensor([fresh]), torch.arange(len(fresh))])[0][0].numpy()
    np.testing.assert_allclose(again, eager_logits(model, fresh), atol=2e-5, rtol=0)


def test_onnx_conversation_and_second_sequence_match_eager(tiny_export, eager):
    """The same through onnxruntime: the cache passed in and out, a multi-token step at a nonzero position, then a
    new sequence at position 0 on the previous sequence's buffers."""
    import onnxruntime as ort

    model, tokenizer = eager
    session = ort.InferenceSession(str(tiny_export / "model.onnx"), providers=["CPUExecutionProvider"])
    past = {i.name: np.zeros([1, *i.shape[1:]], np.float32) for i in session.get_inputs()
            if i.name.startswith("past_key_values.")}
    assert all(v.shape[2] == CACHE for v in past.values())
    names = [o.name for o in session.get_outputs()]

    def run(ids, steps):
        nonlocal past
        rows = []
        for start, count in steps:
            end = start + count
            out = session.run(None, {"input_ids": np.array([ids[start:end]]),
                                     "attention_mask": np.ones((1, end), np.int64),
                                     "position_ids": np.arange(start, end)[None], **past})
            past = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], out[1:])}
            rows.append(out[0][0])
        return np.concatenate(rows)

    ids, steps = conversation(tokenizer)
    np.testing.assert_allclose(run(ids, steps), eager_logits(model, ids), atol=2e-5, rtol=0)
    fresh = tokenizer("Another sequence")["input_ids"]
    np.testing.assert_allclose(run(fresh, [(0, len(fresh))]), eager_logits(model, fresh), atol=2e-5, rtol=0)


def test_text_llm_runner_greedy_matches_eager(tiny_export, eager):
    """ExecuTorch's own LLM runner (what mobile apps use), temperature 0, against eager greedy tokens."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    model, tokenizer = eager
    prompt = "In the beginning"
    ids = tokenizer(prompt)["input_ids"]
    eos = model.config.eos_token_id
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=eos)
    expected_ids = out[0, len(ids):].tolist()  # ends with eos if eager stopped there; the runner prints it too
    pieces, stats = [], []
    runner = TextLLMRunner(str(tiny_export / "model.pte"), str(tiny_export / "tokenizer.json"),
                           str(tiny_export / "model.ptd"))
    runner.generate(prompt, GenerationConfig(temperature=0.0, max_new_tokens=20, echo=False, num_bos=1),
                    token_callback=pieces.append, stats_callback=stats.append)
    assert stats[-1].num_prompt_tokens == len(ids)
    # The runner hands back decoded pieces: compare them one by one with eager's tokens.
    assert pieces == [tokenizer.decode([t]) for t in expected_ids]


def test_export_bytes_do_not_depend_on_the_process(tmp_path):
    """Gemma 3's model code builds its rotary tables in the iteration order of a set of strings; the CLI fixes the
    hash seed, so two runs write the same bytes (release artifacts built twice are the same artifacts)."""
    hashes = []
    for run in ("first", "second"):
        output = tmp_path / run
        result = run_cli("--model", "builtin:tiny-gemma3", "--target", "onnx", "--output", output, "--max-seq-len",
                         "32", "--quiet")
        assert result.returncode == 0, result.stderr[-2000:]
        hashes.append({name: entry["sha256"] for name, entry in read_json(output / "manifest.json")["files"].items()
                       if name.startswith("model.")})
    assert hashes[0] == hashes[1]
