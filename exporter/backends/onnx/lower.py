"""Convert the captured IO-cache decoder to ONNX with ``torch.onnx.export(dynamo=True)``.

Graph contract (ONNX Runtime GenAI, ``past_present_share_buffer: true``):
inputs ``input_ids [B,S] int64``, ``attention_mask [B,T] int64``, ``position_ids [B,S] int64``,
``past_key_values.N.key/value [B,KVH,max_len,D]``; outputs ``logits [B,S,V]`` and
``present.N.key/value [B,KVH,max_len,D]`` (the past with this step's entries written at slots T-S..T-1).
The graph's metadata carries ``max_seq_len``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.export import ExportedProgram


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the decoder graph, in positional order."""
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_onnx(program: ExportedProgram, num_layers: int, max_seq_len: int, path: Path,
                translation_table: dict | None = None) -> None:
    """Write ``path`` (+ ``path.data`` external weights) from the captured ``IOCacheDecoder`` program (or its
    GroupQueryAttention sibling, whose custom op ``translation_table`` maps to the contrib op)."""
    input_names, output_names = io_names(num_layers)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=input_names, output_names=output_names,
                                         optimize=True, verbose=False,
                                         custom_translation_table=translation_table)
        onnx_program.model.metadata_props["max_seq_len"] = str(max_seq_len)
        onnx_program.save(str(path), external_data=True)
