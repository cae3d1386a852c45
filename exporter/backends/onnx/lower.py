"""Convert the captured IO-cache decoder to ONNX with ``torch.onnx.export(dynamo=True)``.

Graph contract (ONNX Runtime GenAI, ``past_present_share_buffer: true``):
inputs ``input_ids [B,S] int64``, ``attention_mask [B,T] int64``, ``position_ids [B,S] int64``,
``past_key_values.N.key/value [B,KVH,max_len,D]``; outputs ``logits [B,S,V]`` and
``present.N.key/value [B,KVH,max_len,D]`` (the past with this step's entries written at slots T-S..T-1).
The graph's metadata carries ``max_seq_len``.

State layers (``exporter.state_cache``), named by decoder layer ``N`` as ONNX Runtime GenAI's builder names them
(one numbering for every kind, so a layer's name says where it is): ``past.N.conv [B, C, K-1]`` ->
``present.N.conv`` and ``past.N.recurrent`` -> ``present.N.recurrent`` (float32). Attention layers keep their
``past_key_values.N.*`` names with the same ``N``; a ``hybrid`` layer has both.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.export import ExportedProgram

PAST_PREFIXES = ("past_key_values.", "past.")  # graph inputs carrying cache or state


def io_names(plan) -> tuple[list[str], list[str]]:
    """Input and output names of the decoder graph, in positional order, for the cache plan ``plan``
    (``exporter.cache.LayerPlan`` per decoder layer)."""
    past, present = [], []
    for i, layer in enumerate(plan):
        if layer.has_kv:
            past += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
            present += [f"present.{i}.key", f"present.{i}.value"]
        if layer.state is not None:
            kinds = ("conv",) if layer.state.recurrent_shape is None else ("conv", "recurrent")
            past += [f"past.{i}.{kind}" for kind in kinds]
            present += [f"present.{i}.{kind}" for kind in kinds]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def past_name(present: str) -> str:
    """The graph input a ``present.*`` output feeds on the next step."""
    rest = present.removeprefix("present.")
    return f"past.{rest}" if rest.endswith((".conv", ".recurrent")) else f"past_key_values.{rest}"


def export_onnx(program: ExportedProgram, plan, max_seq_len: int, path: Path,
                translation_table: dict | None = None, metadata: dict | None = None) -> None:
    """Write ``path`` (+ ``path.data`` external weights) from the captured ``IOCacheDecoder`` program (or its
    GroupQueryAttention sibling, whose custom op ``translation_table`` maps to the contrib op); ``plan``: the
    wrapper's cache plan; ``metadata``: extra graph metadata."""
    input_names, output_names = io_names(plan)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=input_names, output_names=output_names,
                                         optimize=True, verbose=False,
                                         custom_translation_table=translation_table)
        onnx_program.model.metadata_props["max_seq_len"] = str(max_seq_len)
        for key, value in (metadata or {}).items():
            onnx_program.model.metadata_props[key] = str(value)
        onnx_program.save(str(path), external_data=True)


def graph_metadata_check(artifact: Path, checkpoint, max_seq_len: int) -> dict:
    """A folder without ``genai_config.json`` (plain onnxruntime): the graph's ``max_seq_len`` metadata, its
    vocabulary, every cache / state input paired with the output that feeds it next step, layer numbers within the
    checkpoint's layers, and the KV inputs' cache length: a verification stage."""
    import onnx  # only this check reads the file back

    model = onnx.load(str(artifact), load_external_data=False)
    graph = model.graph
    meta = {p.key: p.value for p in model.metadata_props}
    outputs = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in graph.output}
    pasts = [i for i in graph.input if i.name.startswith(PAST_PREFIXES)]
    unpaired = sorted(i.name for i in pasts if i.name not in {past_name(o) for o in outputs if o != "logits"})
    layers = {int(i.name.split(".")[1]) for i in pasts}
    kv_lengths = {i.type.tensor_type.shape.dim[2].dim_value for i in pasts if i.name.startswith("past_key_values.")}
    expected = {"max_seq_len": str(max_seq_len), "vocab_size": checkpoint.vocab_size, "unpaired_past": [],
                "layers_beyond_checkpoint": [], "kv_cache_length": [max_seq_len] if kv_lengths else []}
    actual = {"max_seq_len": meta.get("max_seq_len"), "vocab_size": outputs.get("logits", [None])[-1],
              "unpaired_past": unpaired,
              "layers_beyond_checkpoint": sorted(i for i in layers if i >= len(checkpoint.layers)),
              "kv_cache_length": sorted(kv_lengths)}
    wrong = {name: {"expected": expected[name], "actual": actual[name]} for name in expected
             if actual[name] != expected[name]}
    return {"stage": "metadata", "checked": sorted(expected), "mismatches": wrong, "passed": not wrong,
            "runtime": "onnxruntime (no genai_config.json)"}
