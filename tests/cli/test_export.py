"""The spine end to end: the CLI's artifacts load in their runtimes and agree with eager transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.manifest import sha256_file
from tests.conftest import read_json

EXPECTED_FILES = {"model.pte", "model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json",
                  "tokenizer_config.json", "config.json", "verification.json", "manifest.json"}


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


def test_output_folder_is_complete_and_verified(tiny_export):
    assert EXPECTED_FILES <= {p.name for p in tiny_export.iterdir()}
    report = read_json(tiny_export / "verification.json")
    assert report["passed"] is True
    for name in ("model.pte", "model.onnx"):
        stages = {s["stage"]: s for s in report["artifacts"][name]["stages"]}
        assert any(k.startswith("prefill[1]") for k in stages)
        decode = [s for k, s in stages.items() if k.startswith("decode[")]
        assert decode and decode[0]["positions"] >= 16
        for stage in stages.values():
            if "max_abs_diff" in stage:
                assert stage["max_abs_diff"] <= 1e-4 and stage["top1_agreement"] == 1.0


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


def test_pte_constant_methods(tiny_export):
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(tiny_export / "model.pte")
    value = lambda name: program.load_method(name).execute([])[0]  # noqa: E731
    config = read_json(tiny_export / "config.json")
    assert value("get_max_seq_len") == 128 and value("get_max_context_len") == 128
    assert value("get_vocab_size") == config["vocab_size"]
    assert value("get_bos_id") == config["bos_token_id"]
    assert value("get_eos_ids") == config["eos_token_id"]
    assert value("use_kv_cache") is True and value("enable_dynamic_shape") is True
    assert value("use_sdpa_with_kv_cache") is True  # xnnpack-fp32 uses llama::custom_sdpa + update_cache


def test_pte_prefill_and_decode_match_eager(tiny_export, eager):
    from executorch.runtime import Runtime

    from exporter.backends.executorch.runtime import load_executorch_kernels

    load_executorch_kernels()  # the .pte calls llama::custom_sdpa / llama::update_cache (xnnpack-fp32 fast path)
    model, tokenizer = eager
    ids = tokenizer("A small prompt that is not the verifier's")["input_ids"]
    method = Runtime.get().load_program(tiny_export / "model.pte").load_method("forward")
    expected = eager_logits(model, ids)
    split = len(ids) - 5
    prefill = method.execute([torch.tensor([ids[:split]]), torch.arange(split)])[0][0].numpy()
    steps = [method.execute([torch.tensor([[t]]), torch.tensor([split + i])])[0][0, -1].numpy()
             for i, t in enumerate(ids[split:])]
    np.testing.assert_allclose(prefill, expected[:split], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.stack(steps), expected[split:], atol=1e-4, rtol=0)


def test_onnx_prefill_and_decode_match_eager(tiny_export, eager):
    import onnxruntime as ort

    model, tokenizer = eager
    ids = tokenizer("Another prompt, run through onnxruntime")["input_ids"]
    session = ort.InferenceSession(str(tiny_export / "model.onnx"), providers=["CPUExecutionProvider"])
    past = {i.name: np.zeros([1, *i.shape[1:]], np.float32) for i in session.get_inputs()
            if i.name.startswith("past_key_values.")}
    assert all(v.shape[2] == 128 for v in past.values())
    names = [o.name for o in session.get_outputs()]
    expected = eager_logits(model, ids)
    got, start = [], 0
    for chunk in (ids[:6], *[[t] for t in ids[6:]]):
        end = start + len(chunk)
        out = session.run(None, {"input_ids": np.array([chunk]), "attention_mask": np.ones((1, end), np.int64),
                                 "position_ids": np.arange(start, end)[None], **past})
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], out[1:])}
        got.append(out[0][0])
        start = end
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-4, rtol=0)


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
    runner = TextLLMRunner(str(tiny_export / "model.pte"), str(tiny_export / "tokenizer.json"))
    runner.generate(prompt, GenerationConfig(temperature=0.0, max_new_tokens=20, echo=False, num_bos=1),
                    token_callback=pieces.append, stats_callback=stats.append)
    assert stats[-1].num_prompt_tokens == len(ids)
    # The runner hands back decoded pieces: compare them one by one with eager's tokens.
    assert pieces == [tokenizer.decode([t]) for t in expected_ids]
