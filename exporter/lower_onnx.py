"""Export the IO-cache decoder to ONNX with ``torch.onnx.export(dynamo=True)``.

Graph contract (ONNX Runtime GenAI, ``past_present_share_buffer: true``):
inputs ``input_ids [B,S] int64``, ``attention_mask [B,T] int64``, ``position_ids [B,S] int64``,
``past_key_values.N.key/value [B,KVH,max_len,D]``; outputs ``logits [B,S,V]`` and
``present.N.key/value [B,KVH,max_len,D]`` (the past with this step's entries written at slots T-S..T-1).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.export import Dim


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the decoder graph, in positional order."""
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_onnx(wrapper, path: Path) -> None:
    """Write ``path`` (+ ``path.data`` external weights) for ``IOCacheDecoder`` ``wrapper``; batch, S and T dynamic."""
    max_len = wrapper.max_seq_len
    example_len = min(2, max_len)
    input_ids = torch.zeros(1, example_len, dtype=torch.long)
    attention_mask = torch.ones(1, example_len, dtype=torch.long)
    position_ids = torch.arange(example_len, dtype=torch.long)[None]
    past = wrapper.empty_past()
    batch = Dim("batch", min=1, max=64)
    seq = Dim("seq_len", min=1, max=max_len)
    total = Dim("total_len", min=1, max=max_len)
    cache_shape = {0: batch}
    dynamic_shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: total},
        {0: batch, 1: seq},
        tuple(cache_shape for _ in past),  # the *past_key_values varargs form one nested entry
    )
    input_names, output_names = io_names(wrapper.num_layers)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            (input_ids, attention_mask, position_ids, *past),
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
        program.model.metadata_props["max_seq_len"] = str(max_len)
        program.save(str(path), external_data=True)

