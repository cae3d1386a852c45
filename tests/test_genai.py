"""ONNX Runtime GenAI on the exported folder: greedy tokens equal eager transformers, eos handling, padded batches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter import genai
from exporter.verify import RUNNER_PROMPT, eager_greedy

THREADS = 1
MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory) -> Path:
    """``builtin:tiny-llama`` exported to ONNX once for this module (in process, quiet)."""
    from exporter import recipes
    from exporter.pipeline import ExportRequest, run_export
    from exporter.progress import Progress

    output = tmp_path_factory.mktemp("genai") / "tiny-llama-onnx"
    request = ExportRequest(model="builtin:tiny-llama", recipes=[recipes.load("onnx-fp32")], output=output)
    result = run_export(request, Progress(quiet=True))
    assert result.passed, json.dumps(result.verification)[:3000]
    return result.output


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same built-in checkpoint (deterministic) with transformers' default attention, and its tokenizer."""
    from transformers import AutoTokenizer

    from exporter import builtin, loading

    folder = builtin.materialize("tiny-llama", tmp_path_factory.mktemp("ref") / "tiny-llama")
    return loading.load_model(folder), AutoTokenizer.from_pretrained(folder)


def _with_eos(folder: Path, target: Path, eos: int) -> Path:
    """A copy of the export folder whose genai_config.json stops at ``eos``."""
    shutil.copytree(folder, target)
    config = json.loads((target / "genai_config.json").read_text())
    config["model"]["eos_token_id"] = eos
    (target / "genai_config.json").write_text(json.dumps(config))
    return target


def test_genai_config_matches_the_graph(onnx_export):
    import onnxruntime as ort

    config = json.loads((onnx_export / "genai_config.json").read_text())
    session = ort.InferenceSession(str(onnx_export / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    decoder = config["model"]["decoder"]
    cache_len = inputs["past_key_values.0.key"].shape[2]
    # GenAI sizes its shared buffer to the graph's fixed cache length and refuses max_length > context_length.
    assert config["model"]["context_length"] == cache_len == config["search"]["max_length"] == 128
    assert config["search"]["past_present_share_buffer"] is True
    assert inputs["attention_mask"].type == inputs["position_ids"].type == "tensor(int64)"
    for i in range(decoder["num_hidden_layers"]):
        for kind in ("key", "value"):
            assert decoder["inputs"][f"past_{kind}_names"] % i in inputs
            assert decoder["outputs"][f"present_{kind}_names"] % i in outputs
            shape = inputs[decoder["inputs"][f"past_{kind}_names"] % i].shape
            assert shape[1:] == [decoder["num_key_value_heads"], cache_len, decoder["head_size"]]


def test_genai_greedy_tokens_equal_eager(onnx_export, reference):
    model, tokenizer = reference
    stage = genai.verify_genai(onnx_export, model, tokenizer, {2}, MAX_NEW_TOKENS, threads=THREADS)
    assert stage["stage"] == "genai_generate" and stage["passed"] is True
    assert len(stage["prompts"]) >= 2 and len({len(p) for p in stage["prompts"]}) == len(stage["prompts"])
    assert stage["actual"] == stage["expected"]
    assert all(len(tokens) == MAX_NEW_TOKENS for tokens in stage["actual"])  # the random model emits no eos here
    assert stage["batch"]["passed"] is True and stage["batch"]["actual"] == stage["expected"]
    assert stage["genai_tokenizer"]["matches"] is True
    for timing in stage["timings"]:
        assert timing["prefill_s"] > 0 and timing["decode_tokens_per_s"] > 0


def test_genai_and_eager_stop_at_the_same_eos(onnx_export, reference, tmp_path):
    model, tokenizer = reference
    first = eager_greedy(model, tokenizer(genai.GENAI_PROMPTS[0])["input_ids"], MAX_NEW_TOKENS, set())
    index = next(i for i, t in enumerate(first) if i >= 1 and t not in first[:i])  # first new token after #0
    eos = first[index]
    folder = _with_eos(onnx_export, tmp_path / "eos", eos)
    stage = genai.verify_genai(folder, model, tokenizer, {eos}, MAX_NEW_TOKENS, threads=THREADS)
    assert stage["passed"] is True, stage
    assert stage["actual"][0] == first[: index + 1]  # stopped right after the eos, eos included
    # The check is not vacuous: with an eos the folder's GenAI config does not know, the runs diverge.
    mismatched = genai.verify_genai(onnx_export, model, tokenizer, {eos}, MAX_NEW_TOKENS, threads=THREADS)
    assert mismatched["passed"] is False
    assert mismatched["expected"][0] == first[: index + 1] and len(mismatched["actual"][0]) == MAX_NEW_TOKENS


def test_generate_from_text_with_genai_tokenizer(onnx_export, reference):
    model, tokenizer = reference
    result = genai.generate_genai(onnx_export, RUNNER_PROMPT, 8, threads=THREADS)
    hf_ids = tokenizer(RUNNER_PROMPT)["input_ids"]
    assert result["prompt_ids"] == hf_ids and hf_ids[0] == tokenizer.bos_token_id  # BOS added like transformers
    assert result["tokens"] == eager_greedy(model, hf_ids, 8, {2})
    assert result["finish"] == "length" and result["prompt_tokens"] == len(hf_ids)
    assert result["text"] == tokenizer.decode(result["tokens"])
    assert result["prefill_s"] > 0 and result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0


def test_genai_refuses_prompts_without_room(onnx_export):
    model = genai.GenAIModel(onnx_export, threads=THREADS)
    with pytest.raises(ValueError, match="no room"):
        model.generate([5] * model.context_length, 4)
    assert len(model.generate([5] * (model.context_length - 3), 10)["tokens"]) == 3  # capped by the context


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_through_onnxruntime_matches_eager_per_prompt(onnx_export, reference, side):
    model, tokenizer = reference
    prompts = [tokenizer(text)["input_ids"] for text in (RUNNER_PROMPT, "Hi", "The quick brown fox jumps")]
    assert len({len(p) for p in prompts}) == 3
    stage = genai.padded_batch_check(onnx_export / "model.onnx", model, prompts, pad_id=0, side=side,
                                     decode_steps=4, max_abs_diff=1e-4)
    assert stage["passed"] is True, stage
    assert stage["prefill_max_abs_diff"] <= 1e-4 and stage["decode_max_abs_diff"] <= 1e-4
    assert stage["top1_agreement"] is True


def test_leading_pads_must_be_masked(onnx_export, reference):
    """What GenAI 0.18 feeds for leading pads given to ``append_tokens`` (mask 1 and positions counted through
    them) changes the short row's logits: batches must be right-padded (GenAI's ``encode_batch``) or masked."""
    import onnxruntime as ort

    model, tokenizer = reference
    long, short = tokenizer("The quick brown fox jumps")["input_ids"], tokenizer("Hi")["input_ids"]
    pads = len(long) - len(short)
    session = ort.InferenceSession(str(onnx_export / "model.onnx"), providers=["CPUExecutionProvider"])
    past = {spec.name: np.zeros([2, *spec.shape[1:]], dtype=np.float32)
            for spec in session.get_inputs() if spec.name.startswith("past_key_values.")}
    ids = np.array([long, [0] * pads + short], dtype=np.int64)
    positions = np.tile(np.arange(len(long), dtype=np.int64), (2, 1))
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([short])).logits[0].numpy()

    def short_row(mask):
        feeds = {"input_ids": ids, "attention_mask": np.array(mask, dtype=np.int64), "position_ids": positions}
        return session.run(["logits"], {**feeds, **past})[0][1, pads:]

    unmasked = short_row([[1] * len(long), [1] * len(long)])
    masked = short_row([[1] * len(long), [0] * pads + [1] * len(short)])
    assert np.abs(unmasked - expected).max() > 1e-2
    # Masked, a constant position offset is harmless (RoPE is relative), so only the mask matters here.
    assert np.abs(masked - expected).max() <= 1e-4
