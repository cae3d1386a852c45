"""Capture the wrapped decoders with ``torch.export`` under a dynamic sequence length.

Non-strict capture: the cache buffers are registered on the wrapper, so their in-place writes are recorded as
buffer mutations; strict (dynamo) capture gives the [1, S] input a free symbolic stride that ExecuTorch memory
planning cannot resolve ("vr must not be None"). Guards the symbolic solver cannot prove for every S in range
(e.g. Llama 4's MoE reshape) become runtime asserts instead of failing the export.

The example sequence length is 2, never 1: transformers' state-layer mixers branch on ``seq_len == 1`` (a
single-token kernel); with an example of 2 that test is false, its guard is suppressed, and the graph keeps the
general (chunked / continue-from-state) path, which is exact for one token too. What the state kernels computed is
recorded on the wrapper (``wrapper.state_kernels``, ``exporter.state_kernels.recording``).
"""

from __future__ import annotations

import warnings

import torch
from torch.export import Dim, ExportedProgram

from exporter import state_kernels


def _export(module, args, dynamic_shapes) -> ExportedProgram:
    with torch.no_grad(), warnings.catch_warnings(), state_kernels.recording() as kernels:
        warnings.simplefilter("ignore")
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False,
                                      prefer_deferred_runtime_asserts_over_guards=True)
    if kernels:
        module.state_kernels = kernels
    return program


def export_buffer_decoder(wrapper, max_chunk: int) -> ExportedProgram:
    """Export ``BufferCacheDecoder.forward(tokens [1,S], input_pos [S])`` with S in [1, max_chunk] (the longest
    forward; a longer prompt is fed in chunks at increasing start positions)."""
    seq = Dim("seq_len", min=1, max=max_chunk)
    example_len = min(2, max_chunk)
    tokens = torch.zeros(1, example_len, dtype=torch.long)
    input_pos = torch.arange(example_len, dtype=torch.long)
    program = _export(wrapper, (tokens, input_pos), {"tokens": {1: seq}, "input_pos": {0: seq}})
    wrapper.reset_cache()
    return program


def export_io_decoder(wrapper) -> ExportedProgram:
    """Export ``IOCacheDecoder.forward(input_ids [B,S], attention_mask [B,T], position_ids [B,S], *past)`` with
    batch, S and T dynamic (S, T in [1, max_seq_len]); the past tensors keep their fixed cache length."""
    max_len = wrapper.max_seq_len
    example_len = min(2, max_len)
    example_batch = 2  # a batch of 1 would be specialised to the constant 1
    input_ids = torch.zeros(example_batch, example_len, dtype=torch.long)
    attention_mask = torch.ones(example_batch, example_len, dtype=torch.long)
    position_ids = torch.arange(example_len, dtype=torch.long)[None].expand(example_batch, -1).contiguous()
    past = wrapper.empty_past(example_batch)
    batch = Dim("batch", min=1, max=64)
    seq = Dim("seq_len", min=1, max=max_len)
    total = Dim("total_len", min=1, max=max_len)
    dynamic_shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: total},
        {0: batch, 1: seq},
        tuple({0: batch} for _ in past),  # the *past_key_values varargs form one nested entry
    )
    return _export(wrapper, (input_ids, attention_mask, position_ids, *past), dynamic_shapes)


def export_concat_decoder(wrapper) -> ExportedProgram:
    """Export ``ConcatCacheDecoder.forward(input_ids [B,S], attention_mask [B,P+S], position_ids [B,S], *past)``
    with batch, S, P dynamic (S in [1, max_seq_len], P in [0, max_seq_len - 1]); present is ``[B,KVH,P+S,D]``."""
    max_len = wrapper.max_seq_len
    example_len, example_past = min(2, max_len), 3
    example_batch = 2  # a batch of 1 would be specialised to the constant 1
    input_ids = torch.zeros(example_batch, example_len, dtype=torch.long)
    attention_mask = torch.ones(example_batch, example_past + example_len, dtype=torch.long)
    position_ids = (torch.arange(example_len, dtype=torch.long) + example_past)[None].expand(example_batch, -1)
    past = wrapper.empty_past(example_batch, example_past)
    batch = Dim("batch", min=1, max=64)
    seq = Dim("seq_len", min=1, max=max_len)
    past_len = Dim("past_len", min=0, max=max_len - 1)
    dynamic_shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: Dim.AUTO},  # = P + S: a sum of two dims is no Dim expression; AUTO lets export relate them
        {0: batch, 1: seq},
        tuple({0: batch, 2: past_len} for _ in past),
    )
    return _export(wrapper, (input_ids, attention_mask, position_ids.contiguous(), *past), dynamic_shapes)
