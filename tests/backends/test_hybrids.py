"""Hybrid / recurrent decoders exported with their state inside the program, driven through the real runtimes
(ExecuTorch runtime, onnxruntime, ONNX Runtime GenAI) and compared with eager transformers logits computed here:
prompts longer than the conv window fed in chunks at increasing positions, decode steps, a multi-token message
at a nonzero position, then a second sequence on the same loaded program without any reset (the state must start
from zero at position 0). Tiny models, cache of 32."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporter import pipeline, recipes
from exporter.backends.executorch.runtime import ExecuTorchSession
from exporter.backends.onnx.genai import GenAIModel
from exporter.backends.onnx.genai_verify import verify_genai
from exporter.backends.onnx.runtime import OnnxSession
from exporter.generation import EagerSession, eager_margin, greedy_generate
from exporter.progress import Progress
from exporter.verification.plan import prefill_chunk

MAX_LEN = 32
CHUNK = prefill_chunk(MAX_LEN)  # 16: the .pte's longest forward
TOLERANCE = 1e-4  # max |logit diff| vs eager fp32, as the fp32 recipes' README figure


def build(source, recipe, folder: Path) -> tuple[Path, dict]:
    """``recipe``'s artifact of ``source`` in ``folder`` (with the tokenizer and config, as the export writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = pipeline.load_export_model(source)
    details = pipeline.build_artifact(recipe, model, source, MAX_LEN, folder, Progress(quiet=True))
    for path in (*source.tokenizer_files, source.folder / "config.json"):
        shutil.copy2(path, folder / path.name)
    return folder, details


@pytest.fixture(scope="module")
def exports(builtin_checkpoint, tmp_path_factory):
    """``{(name, target): (folder, build details, checkpoint)}`` for tiny-lfm2 and tiny-qwen3-5."""
    root = tmp_path_factory.mktemp("hybrids")
    out = {}
    for name in ("tiny-lfm2", "tiny-qwen3-5"):
        source = builtin_checkpoint(name)
        for target, recipe in (("executorch", "xnnpack-fp32"), ("onnx", "onnx-fp32")):
            folder, details = build(source, recipes.load(recipe), root / f"{name}-{target}")
            out[(name, target)] = (folder, details, source)
    return out


def ids_of(vocab: int, length: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def eager(reference, ids: list[int]) -> np.ndarray:
    return reference(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def drive(session, ids: list[int], second: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``ids``: a 20-token prompt as chunks 16 + 4, 4 decode steps, a 3-token message at position 24, 2 decode steps;
    then ``second`` at position 0 on the same session (no reset). Returns both logit sequences."""
    steps = [(0, 16), (16, 20), (20, 21), (21, 22), (22, 23), (23, 24), (24, 27), (27, 28), (28, 29)]
    first = np.concatenate([session.step(ids[a:b], a) for a, b in steps])
    again = np.concatenate([session.step(second[:4], 0), session.step(second[4:5], 4)])
    return first, again


@pytest.mark.parametrize("name", ["tiny-lfm2", "tiny-qwen3-5"])
@pytest.mark.parametrize("target", ["executorch", "onnx"])
def test_runtime_matches_eager_and_a_second_sequence_starts_afresh(exports, name, target):
    folder, _, source = exports[(name, target)]
    reference = source.load_model()
    session = ExecuTorchSession(folder / "model.pte") if target == "executorch" else OnnxSession(folder / "model.onnx")
    ids, second = ids_of(source.vocab_size, 29, 11), ids_of(source.vocab_size, 5, 12)
    first, again = drive(session, ids, second)
    assert np.abs(first - eager(reference, ids)).max() <= TOLERANCE
    assert np.abs(again - eager(reference, second)).max() <= TOLERANCE
    # the chunk at position 24 really depends on the state: fed as a new sequence it would differ
    fresh = eager(reference, ids[24:27])
    assert np.abs(first[24:27] - fresh).max() > 100 * TOLERANCE


def test_build_details_and_layout(exports):
    _, details, _ = exports[("tiny-qwen3-5", "executorch")]
    assert details["attention"] == "executorch_custom_ops"  # the attention layers keep the custom-op path
    state = details["state"]
    assert sorted(state["layers"]) == ["0", "1", "2"]
    assert state["layers"]["0"]["recurrent_state_0"] == [[1, 4, 16, 16], "float32"]
    assert "llama::gated_delta_rule" in state["prefill"]["gated_delta_rule"] and "conv" in state["prefill"]
    _, details, _ = exports[("tiny-qwen3-5", "onnx")]
    assert "scan over chunks" in details["state"]["prefill"]["gated_delta_rule"]
    folder, details, source = exports[("tiny-lfm2", "onnx")]
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    names = [i.name for i in graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == ["past.0.conv", "past.1.conv", "past_key_values.2.key", "past_key_values.2.value",
                         "past.3.conv", "past.4.conv", "past_key_values.5.key", "past_key_values.5.value"]
    assert [o.name for o in graph.output][1:3] == ["present.0.conv", "present.1.conv"]
    conv = next(i for i in graph.input if i.name == "past.0.conv").type.tensor_type
    assert conv.elem_type == onnx.TensorProto.FLOAT and [d.dim_value for d in conv.shape.dim][1:] == [64, 2]
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["layer_types"] == [spec.type for spec in source.layers] and decoder["conv_cache_size"] == 2
    assert decoder["inputs"]["past_conv_names"] == "past.%d.conv" and decoder["num_hidden_layers"] == 6
    folder, _, _ = exports[("tiny-qwen3-5", "onnx")]
    config = json.loads((folder / "genai_config.json").read_text())["model"]
    assert config["type"] == "qwen3_5_text"
    assert config["decoder"]["inputs"]["past_recurrent_names"] == "past.%d.recurrent"


@pytest.mark.parametrize("name", ["tiny-lfm2", "tiny-qwen3-5"])
def test_genai_generates_eager_greedy(exports, name):
    folder, _, source = exports[(name, "onnx")]
    reference = source.load_model()
    model, eos = GenAIModel(folder, threads=1), set(source.special_ids.eos)
    for seed in (5, 6):  # two sequences on one loaded model
        prompt = ids_of(source.vocab_size, 9, seed)
        expected = greedy_generate(EagerSession(reference), prompt, 8, eos)["tokens"]
        assert model.generate(prompt, 8)["tokens"] == expected


def test_genai_continues_a_qwen3_5_conversation_and_says_why_not_for_lfm2(exports):
    folder, _, source = exports[("tiny-qwen3-5", "onnx")]
    reference = source.load_model()
    turn1, turn2, eos = ids_of(source.vocab_size, 7, 1), ids_of(source.vocab_size, 5, 2), set(source.special_ids.eos)
    reply1 = greedy_generate(EagerSession(reference), turn1, 4, eos)["tokens"]
    reply2 = greedy_generate(EagerSession(reference), turn1 + reply1 + turn2, 4, eos)["tokens"]
    assert GenAIModel(folder, threads=1).chat([turn1, turn2], [4, 4]) == [reply1, reply2]
    lfm2 = GenAIModel(exports[("tiny-lfm2", "onnx")][0], threads=1)
    assert "RewindTo" in lfm2.continuation_blocker


def test_executorch_without_custom_ops_uses_the_scan_and_matches(exports, builtin_checkpoint, tmp_path):
    """The generic ExecuTorch path (export_safe attention, index_copy caches): the gated delta rule as a scan over
    chunks inside the .pte."""
    source = builtin_checkpoint("tiny-qwen3-5")
    recipe = dataclasses.replace(recipes.load("xnnpack-fp32"), attention="export_safe", external_weights=False)
    folder, details = build(source, recipe, tmp_path / "generic")
    assert details["attention"] == "export_safe" and "scan" in details["state"]["prefill"]["gated_delta_rule"]
    ids, second = ids_of(source.vocab_size, 29, 21), ids_of(source.vocab_size, 5, 22)
    first, again = drive(ExecuTorchSession(folder / "model.pte"), ids, second)
    reference = source.load_model()
    assert np.abs(first - eager(reference, ids)).max() <= TOLERANCE
    assert np.abs(again - eager(reference, second)).max() <= TOLERANCE


def test_a_family_without_a_genai_contract_runs_on_onnxruntime(builtin_checkpoint, tmp_path):
    """tiny-mamba2 (no attention layer at all): no genai_config.json, the graph says why, the GenAI check is an
    expected skip, the metadata check passes, and plain onnxruntime matches eager."""
    from exporter.backends.onnx import OnnxBackend

    source = builtin_checkpoint("tiny-mamba2")
    folder, details = build(source, recipes.load("onnx-fp32"), tmp_path / "mamba2")
    assert not (folder / "genai_config.json").exists() and "no contract" in details["genai"]
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert "mamba2" in {p.key: p.value for p in graph.metadata_props}["genai"]
    assert [i.name for i in graph.graph.input][3:] == ["past.0.conv", "past.0.recurrent", "past.1.conv",
                                                      "past.1.recurrent"]
    reference = source.load_model()
    stage = verify_genai(folder, reference, None, set(), 4, OnnxSession, eager_margin(reference), 0.0)
    assert stage["passed"] and stage["expected_skip"] and "no contract" in stage["skipped"]
    assert OnnxBackend().metadata_check(folder / "model.onnx", source, MAX_LEN)["passed"]
    ids, second = ids_of(source.vocab_size, 29, 31), ids_of(source.vocab_size, 5, 32)
    first, again = drive(OnnxSession(folder / "model.onnx"), ids, second)
    assert np.abs(first - eager(reference, ids)).max() <= TOLERANCE
    assert np.abs(again - eager(reference, second)).max() <= TOLERANCE


def test_quantized_recipes_keep_the_state_in_float(builtin_checkpoint, tmp_path):
    """8da4w (torchao) on tiny-qwen3-5: the planned state buffers are float32; onnx-int4 on tiny-lfm2: the
    projections become MatMulNBits, the conv state inputs / outputs stay float32."""
    from exporter.backends.executorch.quantize import quantize_model
    from exporter.cache import cache_plan

    qwen = builtin_checkpoint("tiny-qwen3-5")
    model = pipeline.load_export_model(qwen)
    quantize_model(model, "8da4w", 32, None)
    states = [layer.state for layer in cache_plan(model, qwen.layers, 1, MAX_LEN) if layer.state is not None]
    assert states and all(s.conv_dtype == s.recurrent_dtype == torch.float32 for s in states)
    source = builtin_checkpoint("tiny-lfm2")
    folder, details = build(source, recipes.load("onnx-int4"), tmp_path / "int4")
    assert details["matmulnbits"] > 0
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    states = [t for t in (*graph.input, *graph.output) if t.name.endswith(".conv")]
    assert len(states) == 8 and all(t.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for t in states)
