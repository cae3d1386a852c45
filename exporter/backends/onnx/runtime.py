"""Run an ``.onnx`` decoder through plain onnxruntime as a step session (``exporter.backends.base.Session``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from exporter.backends.onnx.lower import PAST_PREFIXES, past_name


class OnnxSession:
    """An ``.onnx`` decoder with its KV cache passed in and out (see ``exporter.backends.onnx.lower``), either
    contract:

    - static (shared buffer): past/present ``[B, KVH, max_seq_len, D]``, this step written at slots ``T-S..T-1``;
    - dynamic (concatenating): past ``[B, KVH, P, D]`` (``P = 0`` at the start), present ``[B, KVH, P+S, D]``.
    Either way the attention mask is ``[1, T]`` ones and each present becomes the next step's past (state layers'
    ``present.N.conv`` / ``.recurrent`` too: fixed shapes, zeros after ``reset()``). A step at position 0 without
    ``reset()`` starts a new sequence on the buffers as they are (static: the previous sequence's entries stay in
    the slots, as in an app that reuses its buffers, and the graph reads the states as zeros; dynamic: an empty
    past, the contract's only start). ``position_ids`` is fed when the graph has it.
    """

    def __init__(self, path: Path, threads: int | None = None):
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith(PAST_PREFIXES)]
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_seq_len = int(self.session.get_modelmeta().custom_metadata_map["max_seq_len"])
        # a symbolic cache length = the concatenating contract
        self.dynamic_cache = any(isinstance(spec.shape[2], str) or spec.shape[2] is None for spec in self.past_inputs
                                 if spec.name.startswith("past_key_values."))
        self.reset()

    def reset(self) -> None:
        self.past = {}
        for spec in self.past_inputs:
            shape = [1, *spec.shape[1:]]
            if spec.name.startswith("past_key_values.") and self.dynamic_cache:
                shape[2] = 0
            self.past[spec.name] = np.zeros(shape, dtype=np.float16 if "16" in spec.type else np.float32)

    def step(self, token_ids: list[int], start_pos: int) -> np.ndarray:
        seq_len = len(token_ids)
        total = start_pos + seq_len
        if self.dynamic_cache:
            if start_pos == 0:
                self.reset()
            past_len = next(iter(self.past.values())).shape[2]
            if past_len != start_pos:
                raise ValueError(f"dynamic cache holds {past_len} positions, step starts at {start_pos}")
        feeds = {
            "input_ids": np.array([token_ids], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            "position_ids": np.arange(start_pos, total, dtype=np.int64)[None],
            **self.past,
        }
        feeds = {name: value for name, value in feeds.items() if name in self.input_names}
        outputs = self.session.run(None, feeds)
        for name, value in zip(self.output_names[1:], outputs[1:]):
            self.past[past_name(name)] = value
        return outputs[0][0].astype(np.float32)
