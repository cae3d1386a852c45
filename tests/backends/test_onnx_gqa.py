"""The ONNX GroupQueryAttention fast path (recipe onnx-fp32-gqa, ``attention/onnxruntime_contrib_ops.py``): the custom op's eager
implementation equals onnxruntime's com.microsoft GroupQueryAttention node that our translation emits, at several
positions and in every mode used (full, sliding window, softcap, sinks, ragged batch); exported models hold one
GroupQueryAttention node per layer, keep the onnx-fp32 graph I/O and pass the unchanged verification (logits vs eager
at 1e-4, GenAI greedy generation); layers the op cannot express fall back statically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attention import onnxruntime_contrib_ops
from tests.conftest import read_json, run_cli

H, KVH, D, L = 4, 2, 8, 24  # query heads, kv heads, head size, cache slots


class OneOp(torch.nn.Module):
    """Just the custom op, with the attributes fixed."""

    def __init__(self, softcap: float, window: int, sink: bool):
        super().__init__()
        self.softcap, self.window = softcap, window
        self.sink = torch.nn.Parameter(torch.randn(H)) if sink else None

    def forward(self, query, key, value, past_key, past_value, seqlens_k, total_sequence_length):
        return torch.ops.export_hf.group_query_attention(query, key, value, past_key, past_value, seqlens_k,
                                                         total_sequence_length, self.sink, H, KVH, 0.35,
                                                         self.softcap, self.window)


def onnx_session(module: OneOp, tmp_path: Path):
    import onnxruntime as ort
    from torch.export import Dim

    batch, seq = Dim("batch", min=1, max=8), Dim("seq", min=1, max=L)
    args = (torch.randn(2, 3, H * D), torch.randn(2, 3, KVH * D), torch.randn(2, 3, KVH * D),
            torch.zeros(2, KVH, L, D), torch.zeros(2, KVH, L, D), torch.tensor([6, 6], dtype=torch.int32),
            torch.tensor(7, dtype=torch.int32))
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch}, {0: batch}, {0: batch}, None)
    program = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
    onnx_program = torch.onnx.export(program, dynamo=True, custom_translation_table=onnxruntime_contrib_ops.translation_table(),
                                     verbose=False)
    nodes = [n for n in onnx_program.model.graph if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == 1 and nodes[0].domain == "com.microsoft"
    path = tmp_path / "gqa.onnx"
    onnx_program.save(str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# (batch, new tokens S, per-row total lengths, mask width T): first prompts (S == T), decode steps before and past
# the window, a multi-token step on a filled cache, a ragged batch (right-padded rows), the last slot
CASES = [(1, 7, [7], 7), (1, 1, [2], 2), (1, 1, [5], 5), (1, 1, [13], 13), (1, 4, [15], 15), (2, 1, [20, 20], 20),
         (2, 1, [9, 16], 16), (2, 6, [4, 6], 6), (1, 1, [L], L)]


@pytest.mark.parametrize("softcap,window,sink", [(0.0, -1, False), (0.0, 5, False), (1.5, 4, False),
                                                 (0.0, -1, True), (2.0, 5, True)])
def test_custom_op_eager_equals_onnxruntime_node(tmp_path, softcap, window, sink):
    torch.manual_seed(0)
    module = OneOp(softcap, window, sink).eval()
    session = onnx_session(module, tmp_path)
    for batch, seq_len, totals, width in CASES:
        inputs = (torch.randn(batch, seq_len, H * D), torch.randn(batch, seq_len, KVH * D),
                  torch.randn(batch, seq_len, KVH * D), torch.randn(batch, KVH, L, D), torch.randn(batch, KVH, L, D),
                  torch.tensor(totals, dtype=torch.int32) - 1, torch.tensor(width, dtype=torch.int32))
        with torch.no_grad():
            expected = [t.numpy() for t in module(*inputs)]
        names = [i.name for i in session.get_inputs()]
        actual = session.run(None, dict(zip(names, [t.numpy() for t in inputs])))
        for row, total in enumerate(totals):
            first = seq_len == width
            valid = min(seq_len, total) if first else seq_len  # rows past a padded prompt's length: unspecified
            case = (batch, seq_len, totals, width, row)
            np.testing.assert_allclose(actual[0][row, :valid], expected[0][row, :valid], atol=1e-5, err_msg=str(case))
            for got, want in zip(actual[1:], expected[1:]):  # the cache up to the row's length (beyond: unspecified)
                np.testing.assert_allclose(got[row, :, :total], want[row, :, :total], atol=1e-6, err_msg=str(case))
    # the eager op is not trivially right: a wrong window or cache write shows (guards the comparison itself)
    inputs = (torch.randn(1, 1, H * D), torch.randn(1, 1, KVH * D), torch.randn(1, 1, KVH * D),
              torch.randn(1, KVH, L, D), torch.randn(1, KVH, L, D), torch.tensor([11], dtype=torch.int32),
              torch.tensor(12, dtype=torch.int32))
    out, present_key, _ = module(*inputs)
    assert torch.equal(present_key[0, :, 11], inputs[1].reshape(KVH, D))
    shifted = torch.ops.export_hf.group_query_attention(*inputs, module.sink, H, KVH, 0.35, softcap,
                                                        3 if window == -1 else window + 1)
    assert (out - shifted[0]).abs().max() > 1e-3


def gqa_nodes(folder: Path) -> list:
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return [n for n in model.graph.node if n.op_type == "GroupQueryAttention"], model


def export(tmp_path_factory, model: str) -> Path:
    output = tmp_path_factory.mktemp("onnx-gqa") / model.split(":")[-1]
    result = run_cli("--model", model, "--target", "onnx", "--recipe", "onnx-fp32-gqa", "--output", output, "--quiet")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return output


def check_verified(folder: Path, layers: int) -> list:
    from onnx import helper

    report = read_json(folder / "verification.json")
    assert report["passed"] is True, json.dumps(report)[:3000]
    stages = {s["stage"]: s for s in report["artifacts"]["model.onnx"]["stages"]}
    assert any(name.startswith("decode[") for name in stages) and all(s["passed"] for s in stages.values())
    graded = [s for s in stages.values() if "error_ratio" in s]
    assert graded and all(s["error_ratio"] <= 8.0 for s in graded)  # within the recipe's multiple of fp32's noise
    genai = stages["genai_generate"]
    turns = [t for t in genai["turns"] if "skipped" not in t]
    assert "skipped" not in genai and turns and all(t["matches"] and t["actual"] for t in turns)
    build = read_json(folder / "manifest.json")["build"]["onnx"]
    assert build["attention"] == "onnxruntime_contrib_ops" and build["gqa_layers"] == layers
    # the recipe's onnxruntime fusions ran (a failing fusion pass would say "not applied (...)")
    assert build["ort_fusions"] == "cpu" and build["nodes"] < build["nodes_before_fusion"], build
    assert build["contrib_ops"]["SkipSimplifiedLayerNormalization"] >= layers, build
    nodes, model = gqa_nodes(folder)
    assert len(nodes) == layers and all(n.domain == "com.microsoft" for n in nodes)
    # the graph I/O is onnx-fp32's: input_ids, attention_mask, position_ids, past [B, KVH, max_seq_len, D]
    names = [i.name for i in model.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and names[3] == "past_key_values.0.key"
    past = [d.dim_value for d in model.graph.input[3].type.tensor_type.shape.dim[1:]]
    assert past[1] == read_json(folder / "manifest.json")["max_seq_len"]
    return [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]


def test_tiny_llama_gqa_verifies(tmp_path_factory):
    folder = export(tmp_path_factory, "builtin:tiny-llama")
    attrs = check_verified(folder, layers=2)
    assert all(a["local_window_size"] == -1 and a["do_rotary"] == 0 and "softcap" not in a for a in attrs)
    # q/k/v and gate/up packed: 4 MatMuls per layer (q/k/v, o, gate/up, down) + the lm_head; rotary its own op
    _, model = gqa_nodes(folder)
    assert sum(n.op_type == "MatMul" for n in model.graph.node) == 4 * 2 + 1
    assert sum(n.op_type == "RotaryEmbedding" for n in model.graph.node) == 2 * 2


def test_tiny_mistral_sliding_window_gqa_verifies(tmp_path_factory):
    """Sliding window 8 on every layer; the verification decodes past the window."""
    folder = export(tmp_path_factory, "builtin:tiny-mistral")
    attrs = check_verified(folder, layers=len(read_json(folder / "config.json").get("layer_types") or [0, 0]))
    assert all(a["local_window_size"] == 8 for a in attrs)
    stages = [s["stage"] for s in read_json(folder / "verification.json")["artifacts"]["model.onnx"]["stages"]]
    assert any(name.startswith("decode[") and int(name[7:].split("+")[0]) > 8 for name in stages), stages


def test_unexpressible_layers_fall_back_statically(builtin_checkpoint):
    """tiny-llama4: chunked-attention layers keep the export_safe path, its full-attention layers take the op."""
    from exporter import pipeline
    from exporter.backends.onnx.wrappers import gqa_routes
    from exporter.cache import cache_plan

    source = builtin_checkpoint("tiny-llama4")
    model = pipeline.load_export_model(source)
    model.set_attn_implementation(onnxruntime_contrib_ops.register())
    routes, reasons = gqa_routes(model, source.layers, cache_plan(model, source.layers, 1, 32, rings=False))
    types = model.config.get_text_config().layer_types
    assert "chunked_attention" in types and "full_attention" in types
    for i, layer_type in enumerate(types):
        if layer_type == "chunked_attention":
            assert routes[i] is False and "chunked_attention" in reasons[i]
        else:
            assert routes[i] is None and i not in reasons
