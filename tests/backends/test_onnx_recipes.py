"""ONNX recipes through the CLI: MatMulNBits int4 / int8, float16, the dynamic (concatenating) cache on windowed
models, and a matched reference that really is matched (a corrupted scale is caught)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from exporter.verification.compare import FP32_PREFIX
from tests.conftest import read_json, run_cli


def export(tmp_path_factory, model: str, *args: str) -> Path:
    output = tmp_path_factory.mktemp("onnx-recipes") / model.split(":")[-1]
    result = run_cli("--model", model, "--target", "onnx", "--output", output, "--quiet", *args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return output


def graph(folder: Path):
    import onnx

    return onnx.load(str(folder / "model.onnx"), load_external_data=False)


def check_verified(folder: Path, two_sided: bool) -> dict:
    """verification.json passed; logit stages against the matched reference (and fp32 when ``two_sided``) and the
    GenAI generation check all ran and passed; returns the stages by name."""
    report = read_json(folder / "verification.json")
    assert report["passed"] is True, json.dumps(report)[:3000]
    stages = {s["stage"]: s for s in report["artifacts"]["model.onnx"]["stages"]}
    tight = [s for name, s in stages.items() if "max_abs_diff" in s and not name.startswith(FP32_PREFIX)]
    loose = [s for name, s in stages.items() if name.startswith(FP32_PREFIX)]
    assert any(name.startswith("decode[") for name in stages) and tight
    assert bool(loose) == two_sided
    assert all(s["passed"] for s in stages.values())
    genai = stages["genai_generate"]
    turns = [t for t in genai["turns"] if "skipped" not in t]
    assert "skipped" not in genai and turns and all(t["matches"] and t["actual"] for t in turns)
    return stages


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory) -> Path:
    return export(tmp_path_factory, "builtin:tiny-llama", "--recipe", "onnx-int4")


def test_int4_has_matmulnbits_and_passes_both_sides(int4_export):
    from onnx import helper

    model = graph(int4_export)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    # tiny-llama: 2 layers x (q/k/v packed, o, gate/up packed, down) + lm_head: the 15 Linears in 9 kernels
    assert len(nbits) == 9
    packed = read_json(int4_export / "manifest.json")["build"]["onnx"]["packed_matmulnbits"]
    assert packed == 4
    # int8 activations round differently in a padded batch: that check says why it did not run (never a pass)
    batch = check_verified(int4_export, two_sided=True)["genai_generate"]["batch"]
    assert "passed" not in batch and "rounding depends on the batch layout" in batch["skipped"]
    for node in nbits:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["bits"] == 4 and attrs["block_size"] == 32 and node.domain == "com.microsoft"
    initializers = {i.name for i in model.graph.initializer}
    # one copy of the weights: no float copy of a quantized Linear weight stays behind
    assert not any(name.endswith(".weight.T") for name in initializers)
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers]
    stages = check_verified(int4_export, two_sided=True)
    recipe = read_json(int4_export / "manifest.json")["recipes"][0]
    for name, stage in stages.items():
        if "max_abs_diff" in stage and not name.startswith(FP32_PREFIX):  # matched reference: same weights
            assert stage["max_rel_diff"] <= recipe["max_rel_diff"] and stage["top1_agreement"] == 1.0
    assert read_json(int4_export / "genai_config.json")["search"]["past_present_share_buffer"] is True


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory) -> Path:
    from exporter.builtin import materialize

    return materialize("tiny-llama", tmp_path_factory.mktemp("tied") / "model", tie_word_embeddings=True)


def test_int4_gqa_fused_tied_lm_head_passes_both_sides(tied_llama_dir):
    """onnx-int4-gqa on a model with a tied lm_head: MatMulNBits (lm_head included: it reads the embedding table
    through a Transpose), GroupQueryAttention and onnxruntime's fusions compose; both sides verified; the float
    table stays once, for the Gather."""
    model_dir = tied_llama_dir
    config = read_json(model_dir / "config.json")
    assert config["tie_word_embeddings"] is True
    folder = model_dir.parent / "int4-gqa"
    result = run_cli("--model", model_dir, "--recipe", "onnx-int4-gqa", "--output", folder, "--quiet")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    check_verified(folder, two_sided=True)
    model = graph(folder)
    ops = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    assert ops["MatMulNBits"] == 9 and ops["GroupQueryAttention"] == 2  # q/k/v and gate/up packed
    assert ops["SkipSimplifiedLayerNormalization"] >= 2 and ops["RotaryEmbedding"] == 4
    assert "MatMul" not in ops and "FusedMatMul" not in ops and "Transpose" not in ops, ops
    tables = [i.name for i in model.graph.initializer if list(i.dims) == [config["vocab_size"], config["hidden_size"]]]
    assert len(tables) == 1, tables
    build = read_json(folder / "manifest.json")["build"]["onnx"]
    assert build["ort_fusions"] == "cpu" and build["matmulnbits"] == 9 and build["packed_matmulnbits"] == 4


def test_qembedding_shares_the_tied_lm_head_table(tied_llama_dir):
    """--qembedding 4w with a tied lm_head: the embedding lookup is a GatherBlockQuantized reading the lm_head's own
    MatMulNBits initializers, so no float table is left and the 4-bit table is stored once; the matched reference
    uses the dequantized table for the embedding too, and both sides pass."""
    folder = tied_llama_dir.parent / "int4-gqa-q4emb"
    result = run_cli("--model", tied_llama_dir, "--recipe", "onnx-int4-gqa", "--qembedding", "4w", "--output",
                     folder, "--quiet")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    check_verified(folder, two_sided=True)
    config = read_json(folder / "config.json")
    model = graph(folder)
    gathers = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 1 and not [n for n in model.graph.node if n.op_type == "Gather"]
    lm_head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith("lm_head"))
    reshape = next(n for n in model.graph.node if n.output[0] == gathers[0].input[0])
    assert reshape.op_type == "Reshape" and reshape.input[0] == lm_head.input[1]  # the same 4-bit table
    assert list(gathers[0].input[2:4]) == list(lm_head.input[2:4])  # and the same scales / zero points
    sizes = [list(i.dims) for i in model.graph.initializer]
    assert [config["vocab_size"], config["hidden_size"]] not in sizes
    build = read_json(folder / "manifest.json")["build"]["onnx"]
    assert build["embedding_shared_with_lm_head"] == 1 and build["embedding_bits"] == 4


def _corrupt_one_scale(folder: Path, target: Path) -> None:
    """A copy of ``folder`` whose first MatMulNBits has one block scale multiplied by 10 (x3 on one block of 32
    weights moves tiny-llama's logits by 0.248 of the largest: under the real-weight bound of 0.25, measured)."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(folder, target)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=True)
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    init = next(i for i in model.graph.initializer if i.name == node.input[2])
    scales = numpy_helper.to_array(init).copy()
    scales.flat[0] *= 10.0
    init.CopyFrom(numpy_helper.from_array(scales, init.name))
    for name in ("model.onnx", "model.onnx.data"):
        (target / name).unlink()
    onnx.save_model(model, str(target / "model.onnx"), save_as_external_data=True, location="model.onnx.data")


def test_matched_reference_tracks_the_file(int4_export, builtin_checkpoint, tmp_path):
    """The reference is read from the ONNX file: grading a corrupted artifact against the reference of the original
    fails the tight check; the reference read from the corrupted file matches it again."""
    from exporter import recipes
    from exporter.backends.onnx.quantize import onnx_reference_model
    from exporter.backends.onnx.runtime import OnnxSession
    from exporter.verification import compare
    from exporter.verification.plan import Case, Turn, VerifyPlan
    from exporter.verification.reference import build_reference

    recipe = recipes.load("onnx-int4")
    corrupted = tmp_path / "corrupted"
    _corrupt_one_scale(int4_export, corrupted)
    plan = VerifyPlan(cases=[Case("", (Turn(12, 4),))], prefill_chunk=64)
    tight = compare.Thresholds(recipe.min_top1_agreement, recipe.max_abs_diff, recipe.max_rel_diff)
    source = builtin_checkpoint("tiny-llama")

    def graded(reference_file: Path, artifact: Path) -> dict:
        model = onnx_reference_model(recipe, source.load_model(), reference_file)
        reference = build_reference(model, None, plan)
        session = OnnxSession(artifact)
        stages = compare.grade([compare.run_case(session, reference, c) for c in reference.cases], reference, tight)
        return {"stages": stages, "passed": all(s["passed"] for s in stages)}

    original = graded(int4_export / "model.onnx", int4_export / "model.onnx")
    stale = graded(int4_export / "model.onnx", corrupted / "model.onnx")
    fresh = graded(corrupted / "model.onnx", corrupted / "model.onnx")
    assert original["passed"] and fresh["passed"]
    assert not stale["passed"]
    worst = max(s["max_rel_diff"] for s in stale["stages"])
    assert worst > 2 * recipe.max_rel_diff, worst
    # read from the file it grades, the reference is exact up to float32 rounding on this model
    assert max(s["max_abs_diff"] for s in fresh["stages"] + original["stages"]) <= 1e-4


def test_reference_refuses_unmapped_matmulnbits(int4_export, builtin_checkpoint, tmp_path):
    import onnx

    from exporter import recipes
    from exporter.backends.onnx.matmulnbits import METADATA_KEY
    from exporter.backends.onnx.quantize import onnx_reference_model

    model = onnx.load(str(int4_export / "model.onnx"), load_external_data=True)
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    with pytest.raises(ValueError, match="maps to no Linear module"):
        onnx_reference_model(recipes.load("onnx-int4"), builtin_checkpoint("tiny-llama").load_model(),
                             tmp_path / "model.onnx")


def test_int8_dynamic_cache_on_gemma2(tmp_path_factory):
    """int8 MatMulNBits and the concatenating cache together, on a model with sliding-window layers and
    softcapping."""
    from onnx import helper

    folder = export(tmp_path_factory, "builtin:tiny-gemma2", "--recipe", "onnx-int8", "--onnx-cache", "dynamic")
    nbits = [n for n in graph(folder).graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(helper.get_attribute_value(a) == 8 for n in nbits for a in n.attribute if a.name == "bits")
    assert read_json(folder / "genai_config.json")["search"]["past_present_share_buffer"] is False
    check_verified(folder, two_sided=True)


def test_fp16(tmp_path_factory):
    from onnx import TensorProto

    folder = export(tmp_path_factory, "builtin:tiny-llama", "--recipe", "onnx-fp16")
    model = graph(folder)
    past = [i for i in model.graph.input if i.name.startswith("past_key_values.")]
    assert past and all(i.type.tensor_type.elem_type == TensorProto.FLOAT16 for i in past)
    weights = [i for i in model.graph.initializer if len(i.dims) == 2 and i.dims[0] * i.dims[1] >= 64 * 32]
    assert weights and all(i.data_type == TensorProto.FLOAT16 for i in weights)
    check_verified(folder, two_sided=True)


def test_dynamic_cache_sliding_window(tmp_path_factory):
    """tiny-mistral (sliding window 8) with the concatenating cache: past grows, windows come from the mask."""
    import onnxruntime as ort

    folder = export(tmp_path_factory, "builtin:tiny-mistral", "--onnx-cache", "dynamic")
    config = read_json(folder / "genai_config.json")
    assert config["search"]["past_present_share_buffer"] is False
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    past = next(i for i in session.get_inputs() if i.name == "past_key_values.0.key")
    assert isinstance(past.shape[2], str)  # symbolic past length
    stages = check_verified(folder, two_sided=False)
    decode = [s for name, s in stages.items() if name.startswith("decode[")]
    assert max(s["positions"] for s in decode) > 8  # decoded past the window
    # one step by hand: present = past + this step
    feeds = {"input_ids": np.array([[5, 6, 7]], dtype=np.int64), "attention_mask": np.ones((1, 3), dtype=np.int64),
             "position_ids": np.arange(3, dtype=np.int64)[None]}
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values."):
            feeds[spec.name] = np.zeros((1, spec.shape[1], 0, spec.shape[3]), dtype=np.float32)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    assert outputs["present.0.key"].shape[2] == 3
