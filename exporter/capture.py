"""Capture a wrapped decoder with ``torch.export`` under a dynamic sequence length."""

from __future__ import annotations

import warnings

import torch
from torch.export import Dim, ExportedProgram


def export_buffer_decoder(wrapper, max_seq_len: int) -> ExportedProgram:
    """Export ``BufferCacheDecoder.forward(tokens [1,S], input_pos [S])`` with S in [1, max_seq_len].

    Non-strict capture: the cache buffers are registered on the wrapper, so their in-place writes are recorded
    as buffer mutations; strict (dynamo) capture gives the [1, S] input a free symbolic stride that ExecuTorch
    memory planning cannot resolve ("vr must not be None").
    """
    seq = Dim("seq_len", min=1, max=max_seq_len)
    example_len = min(2, max_seq_len)
    tokens = torch.zeros(1, example_len, dtype=torch.long)
    input_pos = torch.arange(example_len, dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(
            wrapper, (tokens, input_pos), dynamic_shapes={"tokens": {1: seq}, "input_pos": {0: seq}}, strict=False
        )
    wrapper.reset_cache()
    return program
